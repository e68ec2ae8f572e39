"""`SimCore`: UniMMCore plus Python autofocus devices.

pymmcore-plus 0.18's `UniMMCore` routes cameras, stages, shutters and state
devices to Python devices but has no Python autofocus type: its autofocus calls
go to the C++ core, which does not know Python labels. `SimCore` routes the
Micro-Manager autofocus API (``setAutoFocusDevice``, ``fullFocus``,
``incrementalFocus``, ``getLastFocusScore``, ``getCurrentFocusScore``,
``get/setAutoFocusOffset``) to a Python device with ``full_focus()`` and
``current_score()`` (`simulators.devices.SimAutofocus`), and passes everything
else on, so the controller calls the same API as on real hardware.
"""

from __future__ import annotations

from typing import Any

from pymmcore_plus.experimental.unicore import UniMMCore

__all__ = ["SimCore"]


class SimCore(UniMMCore):
    """`UniMMCore` whose autofocus device may be a Python device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._py_autofocus: str | None = None
        super().__init__(*args, **kwargs)

    def _af(self) -> Any:
        label = self._py_autofocus
        if label is None or label not in self._pydevices:
            return None
        return self._pydevices[label]

    def setAutoFocusDevice(self, focusLabel: str) -> None:
        if focusLabel and focusLabel in self._pydevices:
            if not hasattr(self._pydevices[focusLabel], "full_focus"):
                raise RuntimeError(f"{focusLabel!r} is not an autofocus device")
            self._py_autofocus = focusLabel
            super().setAutoFocusDevice("")
            return
        self._py_autofocus = None
        super().setAutoFocusDevice(focusLabel)

    def getAutoFocusDevice(self) -> Any:
        return self._py_autofocus or super().getAutoFocusDevice()

    def fullFocus(self) -> None:
        if (dev := self._af()) is None:
            return super().fullFocus()
        with dev:
            dev.full_focus()

    def incrementalFocus(self) -> None:
        if (dev := self._af()) is None:
            return super().incrementalFocus()
        with dev:
            dev.full_focus()

    def getLastFocusScore(self) -> float:
        if (dev := self._af()) is None:
            return super().getLastFocusScore()
        return float(dev.last_score)

    def getCurrentFocusScore(self) -> float:
        if (dev := self._af()) is None:
            return super().getCurrentFocusScore()
        return float(dev.current_score())

    def setAutoFocusOffset(self, offset: float) -> None:
        if (dev := self._af()) is None:
            return super().setAutoFocusOffset(offset)
        dev.offset_um = float(offset)

    def getAutoFocusOffset(self) -> float:
        if (dev := self._af()) is None:
            return super().getAutoFocusOffset()
        return float(dev.offset_um)

    def unloadAllDevices(self) -> None:
        self._py_autofocus = None
        super().unloadAllDevices()
