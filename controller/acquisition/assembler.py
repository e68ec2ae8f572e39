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
from typing import Any

import numpy as np
import useq

from controller.acquisition.plan import FieldSpec
from controller.records import Failed, Record
from controller.runstore.fieldstore import AssembledField

__all__ = ["FieldAssembler"]


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
            spec = self.fields[p]
            stage = {"x_um": spec.x_um, "y_um": spec.y_um, "z_um": spec.z_um}
            stage.update(meta.get("ctcscan_stage") or {})
            focus = meta.get("ctcscan_focus")
            self.deliver(
                AssembledField(spec.name, buf, self.channel_names, stage, focus=focus)
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
