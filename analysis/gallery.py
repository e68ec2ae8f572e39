"""Candidate images for review: a composite overlay and one tile per channel."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["candidate_panels", "candidate_png"]

#: Composite colours (R, G, B) by channel role.
_ROLE_COLOUR = {
    "nucleus": (0.3, 0.4, 1.0),
    "epithelial": (0.1, 1.0, 0.2),
    "leukocyte": (1.0, 0.2, 0.2),
    "marker": (1.0, 0.8, 0.0),
}


def _stretch(tile: np.ndarray, background: float, top: float) -> np.ndarray:
    span = max(top - background, 1.0)
    return np.clip((tile.astype(np.float32) - background) / span, 0, 1)


def candidate_png(
    path: str | Path,
    field: np.ndarray,
    channel_names: Sequence[str],
    roles: Mapping[str, str],
    center: tuple[float, float],
    *,
    pixel_size_um: float,
    background: Mapping[str, float],
    noise: Mapping[str, float] | None = None,
    title: str = "",
    half_size_um: float = 20.0,
    zoom: int = 3,
) -> Path:
    """Write a review image of one object: overlay, then one tile per channel.

    Parameters
    ----------
    path : path
        The PNG to write (written to a temporary name, then renamed).
    field : ndarray, shape (C, Y, X)
        The field's pixels.
    center : (row, col)
        Object centroid in field pixels.
    background : mapping
        Channel name -> background level; the display range of each tile runs
        from it to the tile's own maximum, but never less than 40 x the channel's
        `noise`, so an unstained channel looks dark instead of showing its noise
        stretched into apparent staining.
    half_size_um : float
        Half the tile width, in um; a 10 um scale bar is drawn on every tile.
    """
    path = Path(path)
    panels = candidate_panels(
        field,
        channel_names,
        roles,
        center,
        pixel_size_um=pixel_size_um,
        background=background,
        noise=noise,
        half_size_um=half_size_um,
    )
    half = panels[0][1].shape[0] // 2
    side = 2 * half * zoom
    gap, label_h = 4, 14
    canvas = Image.new(
        "RGB", (len(panels) * (side + gap) - gap, side + label_h), (0, 0, 0)
    )
    draw = ImageDraw.Draw(canvas)
    bar = round(10.0 / pixel_size_um * zoom)
    for k, (name, img) in enumerate(panels):
        im = Image.fromarray((img * 255).astype(np.uint8)).resize(
            (side, side), Image.Resampling.NEAREST
        )
        x = k * (side + gap)
        canvas.paste(im, (x, label_h))
        draw.text((x + 2, 1), name, fill=(255, 255, 255))
        y = label_h + side - 6
        draw.rectangle([x + 4, y, x + 4 + bar, y + 2], fill=(255, 255, 255))
    if title:
        draw.text((canvas.width - 7 * len(title) - 2, 1), title, fill=(200, 200, 200))
    draw.text((4, label_h + side - 18), "10 um", fill=(255, 255, 255))
    # a name of this writer's own: a Dask worker that outlived its scheduler
    # may still be writing the picture that a resumed run writes
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def candidate_panels(
    field: np.ndarray,
    channel_names: Sequence[str],
    roles: Mapping[str, str],
    center: tuple[float, float],
    *,
    pixel_size_um: float,
    background: Mapping[str, float],
    noise: Mapping[str, float] | None = None,
    half_size_um: float = 20.0,
) -> list[tuple[str, np.ndarray]]:
    """The overlay and one tile per channel around `center`, as
    ``(name, RGB float array in 0..1)``; each channel with its own contrast
    (see `candidate_png`)."""
    half = max(4, round(half_size_um / pixel_size_um))
    r, c = round(center[0]), round(center[1])
    _, h, w = field.shape
    r0, c0 = max(r - half, 0), max(c - half, 0)
    r1, c1 = min(r + half, h), min(c + half, w)
    tiles = []
    composite = np.zeros((2 * half, 2 * half, 3), np.float32)
    for i, name in enumerate(channel_names):
        t = np.zeros((2 * half, 2 * half), np.float32)
        crop = field[i, r0:r1, c0:c1]
        bg = float(background.get(name, np.median(field[i, ::8, ::8])))
        floor = 40.0 * float((noise or {}).get(name, 0.0))
        top = max(float(crop.max()) if crop.size else bg + 1, bg + floor)
        t[r0 - (r - half) : r1 - (r - half), c0 - (c - half) : c1 - (c - half)] = (
            _stretch(crop, bg, top)
        )
        tiles.append((name, t))
        colour = _ROLE_COLOUR.get(roles.get(name, ""), (0.6, 0.6, 0.6))
        composite += t[..., None] * np.array(colour, np.float32)
    return [("overlay", np.clip(composite, 0, 1))] + [
        (n, np.repeat(t[..., None], 3, axis=2)) for n, t in tiles
    ]
