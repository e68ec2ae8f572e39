"""Per-field image quality figures: background, noise and saturation per channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["channel_qc"]


def channel_qc(
    field: np.ndarray,
    channel_names: Sequence[str],
    *,
    saturation: float | None = None,
    step: int = 4,
) -> dict[str, dict[str, Any]]:
    """Robust background, noise and saturation of each channel of a field.

    Parameters
    ----------
    field : ndarray, shape (C, Y, X)
        Any integer or float dtype.
    channel_names : sequence of str
        One name per channel.
    saturation : int, optional
        The saturating value; default the dtype maximum (integers) or the image max.
    step : int
        Subsampling step for the background estimate (every `step`-th pixel in
        both axes), which keeps this cheap on full frames.

    Returns
    -------
    dict
        ``{name: {"background", "noise", "saturated_fraction", "max"}}``; noise is
        the MAD of horizontal neighbour differences / sqrt(2), which ignores
        vignetting and sparse objects.
    """
    if field.ndim != 3 or field.shape[0] != len(channel_names):
        raise ValueError(
            f"field must be (C, Y, X) with C={len(channel_names)}, got {field.shape}"
        )
    if saturation is None:
        saturation = (
            int(np.iinfo(field.dtype).max) if field.dtype.kind in "ui" else None
        )
    out: dict[str, dict[str, Any]] = {}
    for name, plane in zip(channel_names, field, strict=True):
        sub = plane[::step, ::step].astype(np.float32)
        diff = np.diff(sub, axis=1) if sub.shape[1] > 1 else sub
        noise = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2)
        top = float(plane.max())
        sat = saturation if saturation is not None else top
        out[name] = {
            "background": float(np.median(sub)),
            "noise": round(noise, 3),
            "saturated_fraction": float(np.count_nonzero(plane >= sat)) / plane.size,
            "max": top,
        }
    return out
