"""Frame checks: a frame that came back but cannot be right.

`FrameChecker.check` raises `FrameError` for a black frame (flat, at the dark
frame's level), a saturated one (most pixels at full scale) or a stale one
(identical to the previous frame). The engine hands it to `Hardware.snap`, so a
bad frame is taken again under the one retry policy, like a failed snap.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SATURATED_FRACTION", "FrameChecker", "FrameError", "noise"]

#: a frame with more than this fraction of pixels at full scale is a bad frame
SATURATED_FRACTION = 0.5


class FrameError(RuntimeError):
    """A frame that came back but cannot be right (black, saturated, stale)."""


def noise(a: np.ndarray) -> float:
    """Pixel noise of `a` from neighbour differences (robust to edges)."""
    d = np.diff(a.astype(np.float32), axis=1)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


class FrameChecker:
    """Checks frames against a dark frame, full scale and the previous frame.

    Parameters
    ----------
    dark : ndarray or None
        A frame taken with the shutter closed; None skips the black check.
    full_scale : float
        The camera's full-scale value; 0 skips the saturation check.
    """

    def __init__(self, dark: np.ndarray | None, full_scale: float) -> None:
        if dark is None:
            self.dark: tuple[float, float] | None = None
        else:
            sub = np.asarray(dark, dtype=np.float32)[::8, ::8]
            self.dark = (float(np.median(sub)), max(noise(sub), 1.0))
        self.full_scale = full_scale
        self.last: np.ndarray | None = None

    def check(self, img: np.ndarray) -> None:
        """Raise `FrameError` for a black, saturated or stale frame; remember
        a good frame as the previous one.

        Black: flat (no structure beyond noise, where any lit field shows at
        least its vignetted background) and no brighter than the dark frame.
        """
        a = np.asarray(img)
        sub = a[::8, ::8]
        last = self.last
        if (
            last is not None
            and a.shape == last.shape
            and np.array_equal(sub, last[::8, ::8])
            and np.array_equal(a, last)
        ):
            raise FrameError("stale frame (identical to the previous one)")
        if self.dark is not None:
            level, dark_noise = self.dark
            f = sub.astype(np.float32)
            # the level first: a lit frame is above it, and then its flatness
            # (two percentiles and a noise estimate) need not be computed
            if float(np.median(f)) <= level + 10 * dark_noise:
                lo, hi = np.percentile(f, (0.1, 99.9))
                if hi - lo <= 10 * max(noise(f), dark_noise):
                    raise FrameError("black frame (flat, at the dark frame's level)")
        if self.full_scale and np.mean(sub >= self.full_scale) > SATURATED_FRACTION:
            raise FrameError("saturated frame (most pixels at full scale)")
        self.last = a
