"""The one error tree of ctcscan.

Every error a user can cause or meet at the bench derives from `ScannerError`, so
the CLI can print it as one line instead of a traceback. Bad values also derive
from `ValueError`.
"""

from __future__ import annotations

from collections.abc import Mapping

#: the characters `str.splitlines` breaks a line at
_LINE_BREAKS = str.maketrans(
    {c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
)


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (``\\n``): a one-line message even
    when it quotes a file's keys, names or paths."""
    return text.translate(_LINE_BREAKS)


class ScannerError(Exception):
    """Root of every ctcscan error that is reported to the user."""


class ConfigError(ScannerError, ValueError):
    """A configuration file or value is missing or invalid."""


class UnknownLayoutError(ConfigError, KeyError):
    """A cartridge layout name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DeviceLoadError(ScannerError):
    """One or more devices of an instrument failed to load or initialise.

    Parameters
    ----------
    failures : Mapping[str, str]
        Device label -> reason, for every device that failed (not only the first).
    source : str
        The configuration file the devices came from.
    """

    def __init__(self, failures: Mapping[str, str], source: str = "") -> None:
        self.failures = dict(failures)
        self.source = source
        names = ", ".join(f"{label} ({why})" for label, why in self.failures.items())
        where = f" from {source}" if source else ""
        super().__init__(f"devices failed to load{where}: {names}")


class StorageError(ScannerError):
    """The run folder cannot be used or a field cannot be stored durably."""


class DiskSpaceError(StorageError):
    """Not enough free disk space for the planned scan."""


class AcquisitionError(ScannerError):
    """The instrument failed in a way the scan could not recover from."""


class HardwareHangError(AcquisitionError):
    """A hardware call did not return within the watchdog's limit.

    The call cannot be interrupted; the process must end (and the instrument be
    checked) before the run is resumed.
    """


class ClusterError(ScannerError):
    """The Dask scheduler cannot be reached, or was lost during the work."""


class FocusError(ScannerError):
    """The focus map could not be measured."""


class FocusCanceled(FocusError):
    """The scan was stopped while the focus map was measured."""
