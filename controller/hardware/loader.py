"""Driver of the cartridge loader (``hardware_configs/loader-protocol.md``).

`CartridgeLoader` receives its port by composition: a device path or any
pyserial URL (``/dev/ttyUSB0``, ``socket://host:port``, ``loop://``), opened
with `serial.serial_for_url`. Every reply's framing is checked; a missing or
corrupt reply is retried a bounded number of times; a vanished port is reopened
until `reconnect_s` runs out. Motion commands are never repeated blindly: after
an unclear reply the loader's state says whether the motion started.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial

from controller.config import InstrumentConfig
from controller.errors import ConfigError, ScannerError
from controller.events import RecordSink
from controller.records import DeviceEvent

__all__ = [
    "CartridgeLoader",
    "LoaderError",
    "LoaderFault",
    "LoaderStatus",
]

logger = logging.getLogger("ctcscan.loader")

_REPLY = re.compile(rb"^(OK|ER)( [\x20-\x29\x2b-\x7e]*)?\*([0-9A-F]{2})\r\n$")


#: what a vanished or broken port raises (on POSIX, pyserial's termios calls
#: raise termios.error on a hung-up tty)
_PORT_ERRORS: tuple[type[BaseException], ...] = (OSError, serial.SerialException)
try:
    import termios

    _PORT_ERRORS += (termios.error,)
except ImportError:  # Windows
    pass


class LoaderError(ScannerError):
    """The loader cannot be reached or does not answer properly."""


class LoaderFault(LoaderError):
    """The loader answered with an error code (``ER nn TEXT``)."""

    def __init__(self, code: int, text: str, command: str) -> None:
        super().__init__(f"loader refused {command!r}: error {code:02d} {text}")
        self.code, self.text, self.command = code, text, command


@dataclass(frozen=True)
class LoaderStatus:
    state: str  # IDLE | BUSY | FAULT
    slot: int | None  # slot whose cartridge is on the stage
    code: int  # last error code, 0 for none


def _checksum(body: bytes) -> str:
    ck = 0
    for b in body:
        ck ^= b
    return f"{ck:02X}"


class _Corrupt(Exception):
    """A reply that failed the framing check, or did not come."""


class CartridgeLoader:
    """A cartridge loader on a serial line.

    Parameters
    ----------
    port : str
        Device path or pyserial URL.
    timeout_s : float
        How long to wait for one reply.
    retries : int
        Extra attempts after a missing or corrupt reply.
    reconnect_s : float
        How long to keep reopening a port that vanished.
    motion_timeout_s : float
        Longest LOAD or UNLOAD.
    open_port : callable
        ``open_port(port, baudrate=..., timeout=...)`` -> a pyserial-like port;
        default `serial.serial_for_url`.
    sink : RecordSink, optional
        Receives a `DeviceEvent` (device ``loader``, what ``retry``,
        ``reconnect`` or ``fault``) for every recovery and fault.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        timeout_s: float = 0.5,
        retries: int = 2,
        reconnect_s: float = 10.0,
        motion_timeout_s: float = 60.0,
        poll_s: float = 0.1,
        open_port: Callable[..., Any] = serial.serial_for_url,
        sink: RecordSink | None = None,
    ) -> None:
        self.port_name = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self.retries = retries
        self.reconnect_s = reconnect_s
        self.motion_timeout_s = motion_timeout_s
        self.poll_s = poll_s
        self._open_port = open_port
        self.sink = sink
        self._port: Any = None

    # ------------------------------------------------------------------ port

    def open(self) -> CartridgeLoader:
        if self._port is None:
            self._port = self._connect(deadline=time.monotonic())
        return self

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(*_PORT_ERRORS):
                port.close()

    def __enter__(self) -> CartridgeLoader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, deadline: float, *, lost: bool = False) -> Any:
        """Open the port, trying until `deadline` (monotonic)."""
        while True:
            try:
                return self._open_port(
                    self.port_name, baudrate=self.baudrate, timeout=self.timeout_s
                )
            except _PORT_ERRORS as e:
                if time.monotonic() >= deadline:
                    why = f"gone for {self.reconnect_s:g} s" if lost else "unavailable"
                    raise LoaderError(
                        f"cartridge loader port {self.port_name} {why}: {e}"
                    ) from None
                time.sleep(0.2)

    def _event(self, kind: str, message: str) -> None:
        logger.warning("loader %s: %s", kind, message)
        if self.sink is not None:
            self.sink.emit(DeviceEvent(device="loader", what=kind, message=message))

    # ------------------------------------------------------------------ lines

    def _exchange(self, command: str) -> bytes:
        """Send one command, return the raw reply line; reconnect if needed."""
        deadline: float | None = None
        while True:
            if self._port is None:
                lost = deadline is not None
                self._port = self._connect(deadline or time.monotonic(), lost=lost)
            try:
                port = self._port
                port.reset_input_buffer()  # stale bytes belong to no command
                port.write(command.encode("ascii") + b"\r")
                port.flush()
                return bytes(port.read_until(b"\r\n", 128))
            except _PORT_ERRORS as e:
                self.close()
                if deadline is None:
                    deadline = time.monotonic() + self.reconnect_s
                    self._event("reconnect", f"port {self.port_name} lost ({e})")
                elif time.monotonic() >= deadline:
                    raise LoaderError(
                        f"cartridge loader port {self.port_name} gone for "
                        f"{self.reconnect_s:g} s: {e}"
                    ) from None
                time.sleep(0.2)

    def _drain(self) -> None:
        """After a missing or corrupt reply: let a late reply arrive, drop it."""
        time.sleep(self.timeout_s)
        try:
            if self._port is not None:
                self._port.reset_input_buffer()
        except _PORT_ERRORS:
            self.close()

    def _parse(self, raw: bytes, command: str) -> list[str]:
        if not raw:
            raise _Corrupt(f"no reply to {command!r} within {self.timeout_s:g} s")
        m = _REPLY.match(raw)
        if m is None:
            raise _Corrupt(f"malformed reply to {command!r}: {raw!r}")
        body = raw[: raw.index(b"*")]
        if _checksum(body) != m.group(3).decode():
            raise _Corrupt(f"checksum mismatch in reply to {command!r}: {raw!r}")
        fields = body.decode("ascii").split(" ")
        if fields[0] == "ER":
            if len(fields) < 3 or not fields[1].isdigit():
                raise _Corrupt(f"malformed error reply to {command!r}: {raw!r}")
            raise LoaderFault(int(fields[1]), " ".join(fields[2:]), command)
        return fields[1:]

    def _query(self, command: str, n_fields: int | None = None) -> list[str]:
        """A command safe to repeat: retried on a missing or corrupt reply."""
        last = ""
        for attempt in range(self.retries + 1):
            try:
                fields = self._parse(self._exchange(command), command)
            except _Corrupt as e:
                last = str(e)
                if attempt < self.retries:
                    self._event("retry", last)
                self._drain()
                continue
            if n_fields is not None and len(fields) != n_fields:
                last = f"reply to {command!r} has {len(fields)} fields: {fields}"
                self._event("retry", last)
                continue
            return fields
        raise LoaderError(f"cartridge loader: {last} ({self.retries + 1} attempts)")

    # ------------------------------------------------------------------ commands

    def identify(self) -> str:
        """Model, firmware and serial number."""
        return " ".join(self._query("ID?"))

    def status(self) -> LoaderStatus:
        state, slot, code = self._query("STAT?", 3)
        if (
            state not in ("IDLE", "BUSY", "FAULT")
            or not (slot == "-" or slot.isdigit())
            or not code.isdigit()
        ):
            raise LoaderError(
                f"cartridge loader: nonsense status {state} {slot} {code}"
            )
        return LoaderStatus(state, None if slot == "-" else int(slot), int(code))

    def inventory(self) -> dict[int, str | None]:
        """Barcode per magazine slot; None for an empty slot."""
        fields = self._query("INV?")
        try:
            n = int(fields[0])
            cells = dict(f.split("=", 1) for f in fields[1:])
            out = {int(k): (None if v == "-" else v) for k, v in cells.items()}
        except (ValueError, IndexError):
            raise LoaderError(
                f"cartridge loader: nonsense inventory {fields}"
            ) from None
        if len(fields) != n + 1 or sorted(out) != list(range(1, n + 1)):
            raise LoaderError(f"cartridge loader: inventory of {n} slots is {fields}")
        return out

    def barcode(self) -> str:
        """Barcode of the cartridge on the stage."""
        return self._query("BC?", 1)[0]

    def reset(self) -> None:
        self._query("RESET", 1)

    def load(self, slot: int) -> str:
        """Move slot `slot`'s cartridge onto the stage; returns its barcode."""
        self._motion(f"LOAD {slot}", lambda st: st.slot == slot)
        return self.barcode()

    def unload(self) -> None:
        """Return the stage's cartridge to its slot."""
        self._motion("UNLOAD", lambda st: st.slot is None)

    def _motion(self, command: str, done: Callable[[LoaderStatus], bool]) -> None:
        """Start a motion (once), then poll until it ends."""
        started = False
        last = ""
        for attempt in range(self.retries + 1):
            try:
                self._parse(self._exchange(command), command)
                started = True
                break
            except _Corrupt as e:
                last = str(e)
                self._drain()
                # did the loader hear us? Its state tells.
                st = self.status()
                if st.state == "BUSY" or (st.state == "IDLE" and done(st)):
                    started = True
                    self._event("retry", f"{last}; the loader started anyway")
                    break
                if st.state == "FAULT":
                    break
                if attempt < self.retries:
                    self._event("retry", last)
        if not started:
            st = self.status()
            if st.state != "FAULT":
                raise LoaderError(
                    f"cartridge loader: {last} ({self.retries + 1} attempts)"
                )
        t_end = time.monotonic() + self.motion_timeout_s
        while True:
            st = self.status()
            if st.state == "FAULT":
                self._event("fault", f"{command}: error {st.code:02d}")
                raise LoaderFault(st.code, _FAULT_TEXT.get(st.code, "FAULT"), command)
            if st.state == "IDLE" and done(st):
                return
            if st.state == "IDLE":
                raise LoaderError(
                    f"cartridge loader: {command} ended without effect ({st})"
                )
            if time.monotonic() > t_end:
                raise LoaderError(
                    f"cartridge loader: {command} still busy after "
                    f"{self.motion_timeout_s:g} s"
                )
            time.sleep(self.poll_s)


_FAULT_TEXT = {5: "JAM", 8: "FAULT"}


#: The module with the loader's emulator (``port: emulated``).
EMULATOR = "simulators.loader"


@contextlib.contextmanager
def open_loader(
    cfg: InstrumentConfig,
    workdir: Path,
    *,
    source: str = "",
    sink: RecordSink | None = None,
) -> Iterator[CartridgeLoader]:
    """The instrument's cartridge loader, open for the duration of the block.

    ``port: emulated`` (simulated instruments) runs the simulator's loader on a
    pseudo-terminal whose state lives in `workdir`; any other port is opened
    as a serial device or pyserial URL.
    """
    lc = cfg.loader
    if lc is None:
        raise ConfigError(f"{source or cfg.name}: the instrument has no loader section")
    kw: dict[str, Any] = {
        "baudrate": lc.baudrate,
        "timeout_s": lc.timeout_s,
        "retries": lc.retries,
        "reconnect_s": lc.reconnect_s,
        "motion_timeout_s": lc.motion_timeout_s,
        "sink": sink,
    }
    if lc.port != "emulated":
        with CartridgeLoader(lc.port, **kw) as loader:
            yield loader
        return
    emulator = importlib.import_module(EMULATOR).LoaderEmulator
    slots = lc.slots or {1: "SIM-0001"}
    # the pty's stable name lives in the (locked) queue folder, not in /tmp:
    # nothing is left behind elsewhere if the process is killed
    port_dir = workdir / ".loader-port"
    port_dir.mkdir(exist_ok=True)
    emu = emulator(
        slots,
        port_dir / "port",
        state_file=workdir / ".loader-emulator.json",
        script=lc.faults,
    )
    try:
        with emu, CartridgeLoader(str(emu.port), **kw) as loader:
            loader.emulator = emu  # type: ignore[attr-defined]
            yield loader
    finally:
        with contextlib.suppress(OSError):
            (port_dir / "port").unlink(missing_ok=True)
            port_dir.rmdir()
