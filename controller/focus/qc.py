"""Per-field focus QC: judge each field's focus frame, re-focus poor ones.

`FocusQC.check` scores the first (focus-channel) frame of a field with
`analysis.focus.field_sharpness` against the anchors' in-focus sharpness; a
field below ``qc_min_relative`` of it is searched locally (`Focuser.search`)
and its frame re-taken at the found z, through the run's `Hardware`. The engine
(`controller.acquisition.engine`) calls it and takes the field's other channels
at the kept z. `FocusQC.judge` is the score alone (pure, thread-safe): the
engine computes it while the camera takes the field's next channel and hands
it to `check`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from analysis.focus import FieldSharpness, field_sharpness
from controller.focus.mapper import Focuser

__all__ = ["FieldFocus", "FocusQC"]


@dataclass
class FieldFocus:
    """Focus QC of one field: the first acquisition and, if re-focused, the second."""

    z_planned_um: float
    z_um: float
    sharpness: float | None
    first_sharpness: float | None
    second_z_um: float | None = None
    second_sharpness: float | None = None
    refocused: bool = False
    reason: str = ""
    search_snaps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in asdict(self).items()
        }


class FocusQC:
    """Judges each field's first (focus-channel) frame; re-focuses poor ones.

    Parameters
    ----------
    focuser : Focuser
        Device access; the engine has already set the focus channel.
    reference : float
        The anchors' in-focus sharpness.
    """

    def __init__(self, focuser: Focuser, reference: float) -> None:
        self.focuser = focuser
        self.settings = focuser.settings
        self.reference = reference
        self.preset = focuser.channel.preset
        self.seconds = 0.0
        self.refocused = 0

    def threshold(self) -> float:
        return self.settings.qc_min_relative * self.reference

    def judge(self, image: np.ndarray) -> tuple[FieldSharpness, float]:
        """The sharpness of a focus-channel frame and the seconds it took to
        measure; no device is touched (safe on any thread)."""
        t0 = time.perf_counter()
        return field_sharpness(image), time.perf_counter() - t0

    def poor(self, judged: FieldSharpness) -> bool:
        """Whether a frame so judged is re-focused."""
        return judged.sharpness is not None and judged.sharpness < self.threshold()

    def check(
        self,
        image: np.ndarray,
        z: float,
        judged: tuple[FieldSharpness, float] | None = None,
    ) -> tuple[np.ndarray, FieldFocus]:
        """Judge `image` (taken at `z`); re-focus and re-acquire if it is poor.

        `judged`: what `judge` said of `image`, if it was already asked (the
        camera may since have taken other channels: the focus channel is then
        selected again before a re-focus). Returns the frame to keep and what
        was done; the focus drive is left at the kept frame's z.
        """
        t0 = time.perf_counter()
        if judged is None:
            first, _ = self.judge(image)
        else:  # measured elsewhere: its time counts too
            first, spent = judged
            t0 -= spent
        info = FieldFocus(z, z, first.sharpness, first.sharpness)
        if not self.poor(first):
            info.reason = "no content" if first.sharpness is None else ""
            self.seconds += time.perf_counter() - t0
            info.seconds = round(time.perf_counter() - t0, 4)
            return image, info
        fz = self.focuser
        snaps0 = fz.snaps
        keep, kept = image, first
        try:
            if judged is not None:
                fz.select_channel()
            search = fz.search(z, self.settings.refocus_range_um)
            if search.z is None:
                info.reason = f"re-focus found no focus: {search.reason}"
                fz.move_z(z)
            elif abs(search.z - z) < self.settings.fine_step_um:
                info.reason = "re-focus confirmed the planned z"
                fz.move_z(z)
            else:
                second = fz.snap_at(search.z)
                s2 = field_sharpness(second)
                info.refocused = True
                info.second_z_um = round(search.z, 3)
                info.second_sharpness = s2.sharpness
                if _better(s2, first):
                    keep, kept, info.z_um = second, s2, round(search.z, 3)
                    info.reason = "re-focused"
                else:
                    info.reason = "re-focused frame no sharper; first kept"
                    fz.move_z(z)
        except Exception as e:  # keep the first frame; the field is not lost
            info.reason = f"re-focus failed: {type(e).__name__}: {e}"
            keep, kept, info.z_um = image, first, z
        info.sharpness = kept.sharpness
        info.search_snaps = fz.snaps - snaps0
        info.seconds = round(time.perf_counter() - t0, 4)
        self.seconds += time.perf_counter() - t0
        self.refocused += int(info.refocused)
        return keep, info


def _better(a: FieldSharpness, b: FieldSharpness) -> bool:
    return (a.sharpness or 0.0) >= (b.sharpness or 0.0)
