"""Field assembly: channel frames from the acquisition thread -> whole fields.

`FieldAssembler.frame_ready` is connected synchronously to the runner's
``frameReady`` signal. It keeps the frame (a camera's frames are new arrays:
no 2.8 MB copy on the acquisition thread) in the field's channel slot and,
when the last channel arrives, hands the field to `deliver` (a bounded enqueue;
the storage thread stacks the frames).
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

from controller.acquisition.plan import FieldSpec
from controller.records import Failed, Record
from controller.runstore.fieldstore import AssembledField

__all__ = ["FieldAssembler"]


@dataclass
class _Partial:
    """A field being assembled: its buffer and, per channel, what its frame said."""

    frames: list[np.ndarray | None]
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    have: list[bool] = field(default_factory=list)
    exposure_ms: list[float | None] = field(default_factory=list)
    stage: list[dict[str, float]] = field(default_factory=list)


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

    Subscribe `on_record` to the run's events: a `Failed` field's partial
    frames are dropped and its later frames ignored.
    """

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        channel_names: Sequence[str],
        deliver: Callable[[AssembledField], None],
    ) -> None:
        self.fields = list(fields)
        self._index = {f.name: p for p, f in enumerate(self.fields)}
        self.channel_names = tuple(channel_names)
        self.deliver = deliver
        self._partial: dict[int, _Partial] = {}
        self._failed: set[int] = set()
        self._lock = threading.Lock()

    def frame_ready(
        self, img: np.ndarray, event: useq.MDAEvent, meta: Mapping[str, Any]
    ) -> None:
        """Slot for ``frameReady``: place one frame, deliver a complete field.

        The field's acquisition time is its first frame's arrival; each
        frame's exposure (``exposure_ms``) and stage position
        (``ctcscan_stage``) are kept per channel.
        """
        p, c = event.index.get("p", 0), event.index.get("c", 0)
        spec = self.fields[p]
        stage = {"x_um": spec.x_um, "y_um": spec.y_um, "z_um": spec.z_um}
        stage.update(meta.get("ctcscan_stage") or {})
        exposure = meta.get("exposure_ms")
        with self._lock:
            if p in self._failed:
                return
            if (part := self._partial.get(p)) is None:
                n = len(self.channel_names)
                part = self._partial[p] = _Partial(
                    [None] * n,
                    have=[False] * n,
                    exposure_ms=[None] * n,
                    stage=[stage] * n,
                )
            part.frames[c] = img
            part.have[c] = True
            part.exposure_ms[c] = (
                float(exposure) if isinstance(exposure, int | float) else None
            )
            part.stage[c] = stage
            done = all(part.have)
            if done:
                del self._partial[p]
        if done:
            self.deliver(
                AssembledField(
                    spec.name,
                    tuple(f for f in part.frames if f is not None),
                    self.channel_names,
                    stage,
                    focus=meta.get("ctcscan_focus"),
                    acquired_at=part.started,
                    exposure_ms=tuple(part.exposure_ms),
                    plane_stage=tuple(part.stage),
                )
            )

    def on_record(self, record: Record) -> None:
        """A failed field: drop its partial frames, ignore its later frames."""
        if not isinstance(record, Failed) or record.field not in self._index:
            return
        p = self._index[record.field]
        with self._lock:
            self._failed.add(p)
            self._partial.pop(p, None)

    @property
    def incomplete(self) -> list[FieldSpec]:
        """Fields with some but not all channels (e.g. after a cancel)."""
        with self._lock:
            return [self.fields[p] for p in self._partial]
