"""Pictures for the station's pages, made from stored field files on request.

A field is read with a stride (every `step`-th row and column of the channels
asked for): from an uncompressed file through a memory map, so only the rows
shown are touched; from a compressed one page by page. Thumbnails are kept per
file (name, size and modification time), so the cartridge picture costs each
field one read. Contrast is per channel: from its 1st to its 99.9th percentile.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from analysis.gallery import candidate_panels

__all__ = [
    "Thumbnails",
    "candidate_tile_png",
    "field_png",
    "mosaic_png",
    "png_bytes",
]


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) uint8 or (H, W) array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _strided(path: Path, channels: Sequence[int], step: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        out = []
        try:
            mm = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or not contiguous: decode the pages
            mm = None
        for c in channels:
            if mm is not None and mm.ndim == 3:
                out.append(np.asarray(mm[c, ::step, ::step], np.float32))
            else:
                page = pages[c]
                out.append(np.asarray(page.asarray()[::step, ::step], np.float32))
        return np.stack(out)


class Thumbnails:
    """Strided reads of field files, kept per file version (bounded)."""

    def __init__(self, max_items: int = 2048) -> None:
        self._cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._max = max_items
        self._lock = threading.Lock()

    def get(self, path: Path, channels: Sequence[int], step: int) -> np.ndarray:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, tuple(channels), step)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        arr = _strided(path, channels, step)
        with self._lock:
            self._cache[key] = arr
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return arr


def _contrast(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1.0, 99.9])
    return np.clip((a - lo) / max(float(hi - lo), 1.0), 0, 1)


def field_png(thumbs: np.ndarray, names: Sequence[str]) -> bytes:
    """The channels of one field side by side, each with its own contrast."""
    c, h, w = thumbs.shape
    gap, label = 4, 14
    canvas = Image.new("RGB", (c * (w + gap) - gap, h + label), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i in range(c):
        g = (_contrast(thumbs[i]) * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(g).convert("RGB"), (i * (w + gap), label))
        draw.text((i * (w + gap) + 2, 1), names[i], fill=(255, 255, 255))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mosaic_png(
    tiles: Mapping[tuple[int, int], np.ndarray], rows: int, cols: int
) -> tuple[bytes, int, int]:
    """The cartridge from (grid row, col) -> (2, h, w) thumbnails of the
    nucleus and cytokeratin channels (blue and green, each with its contrast
    over the whole cartridge); fields not stored yet stay dark. Returns the
    PNG and one tile's width and height."""
    if not tiles:
        return png_bytes(np.zeros((8, 8, 3), np.uint8)), 0, 0
    h, w = next(iter(tiles.values())).shape[1:]
    both = np.stack(list(tiles.values()))
    scale = []
    for ch in range(2):
        lo, hi = np.percentile(both[:, ch, ::2, ::2], [1.0, 99.9])
        scale.append((float(lo), max(float(hi - lo), 1.0)))
    img = np.zeros((rows * h, cols * w, 3), np.float32)
    for (r, c), t in tiles.items():
        if t.shape[1:] != (h, w):
            continue
        dapi = np.clip((t[0] - scale[0][0]) / scale[0][1], 0, 1)
        ck = np.clip((t[1] - scale[1][0]) / scale[1][1], 0, 1)
        region = img[r * h : (r + 1) * h, c * w : (c + 1) * w]
        region[..., 0] = 0.3 * dapi
        region[..., 1] = np.maximum(ck, 0.4 * dapi)
        region[..., 2] = dapi
    return png_bytes((img * 255).astype(np.uint8)), w, h


def candidate_tile_png(
    field: np.ndarray,
    names: Sequence[str],
    roles: Mapping[str, str],
    center: tuple[float, float],
    panel: str,
    *,
    pixel_size_um: float,
    background: Mapping[str, float],
    noise: Mapping[str, float],
    zoom: int = 3,
) -> bytes:
    """One panel (``overlay`` or a channel name) around a candidate."""
    panels = dict(
        candidate_panels(
            field,
            names,
            roles,
            center,
            pixel_size_um=pixel_size_um,
            background=background,
            noise=noise,
        )
    )
    img = (panels[panel] * 255).astype(np.uint8)
    big = np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)
    return png_bytes(big)
