"""Field assembly: channel frames from the acquisition thread -> whole fields.

`FieldAssembler.frame_ready` is connected synchronously to the runner's
``frameReady`` signal. It copies the frame into the field's (C, Y, X) buffer and,
when the last channel arrives, hands the field to `deliver` (a bounded enqueue).
Frames are placed by their event index, so a missing frame can never shift later
frames into the wrong slot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import useq

from controller.plan import FieldSpec

__all__ = ["AssembledField", "FieldAssembler"]


@dataclass
class AssembledField:
    """All channels of one field, as acquired.

    Attributes
    ----------
    data : ndarray, shape (C, Y, X)
        Pixels, channel order as in `channel_names`.
    stage : dict
        Stage position read back at acquisition: ``x_um``, ``y_um``, ``z_um``.
    focus : dict or None
        The field's focus QC record (`controller.focus.FieldFocus`), if judged.
    """

    spec: FieldSpec
    data: np.ndarray
    channel_names: tuple[str, ...]
    stage: dict[str, float]
    focus: dict[str, Any] | None = None
    acquired_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


class FieldAssembler:
    """Collects frames per field; see module docstring.

    Parameters
    ----------
    fields : sequence of FieldSpec
        The fields of the sequence being run, in sequence order (index ``p``).
    channel_names : sequence of str
        Channel names, in sequence order (index ``c``).
    deliver : callable
        Receives each complete `AssembledField`; must return quickly.
    on_failed : callable
        Receives ``(spec, reason, attempts)`` for each field that failed.
    """

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        channel_names: Sequence[str],
        deliver: Callable[[AssembledField], None],
        on_failed: Callable[[FieldSpec, str, int], None],
    ) -> None:
        self.fields = list(fields)
        self.channel_names = tuple(channel_names)
        self.deliver = deliver
        self.on_failed = on_failed
        self._partial: dict[int, tuple[np.ndarray, list[bool]]] = {}
        self._failed: set[int] = set()
        self._lock = threading.Lock()

    def frame_ready(
        self, img: np.ndarray, event: useq.MDAEvent, meta: Mapping[str, Any]
    ) -> None:
        """Slot for ``frameReady``: place one frame, deliver a complete field."""
        p, c = event.index.get("p", 0), event.index.get("c", 0)
        with self._lock:
            if p in self._failed:
                return
            if p not in self._partial:
                buf = np.empty((len(self.channel_names), *img.shape), img.dtype)
                self._partial[p] = (buf, [False] * len(self.channel_names))
            buf, have = self._partial[p]
            buf[c] = img
            have[c] = True
            done = all(have)
            if done:
                del self._partial[p]
        if done:
            stage = dict(meta.get("ctcscan_stage") or {})
            focus = meta.get("ctcscan_focus")
            self.deliver(
                AssembledField(
                    self.fields[p], buf, self.channel_names, stage, focus=focus
                )
            )

    def failure(self, event: useq.MDAEvent, reason: str, attempts: int) -> None:
        """Engine failure hook: drop the field's partial frames, report it once."""
        p = event.index.get("p", 0)
        with self._lock:
            if p in self._failed:
                return
            self._failed.add(p)
            self._partial.pop(p, None)
        self.on_failed(self.fields[p], reason, attempts)

    @property
    def incomplete(self) -> list[FieldSpec]:
        """Fields with some but not all channels (e.g. after a cancel)."""
        with self._lock:
            return [self.fields[p] for p in self._partial]
