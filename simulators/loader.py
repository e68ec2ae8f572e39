"""Emulated cartridge loader on a pseudo-terminal, faults included.

`LoaderEmulator` speaks the protocol of ``hardware_configs/loader-protocol.md``
on the master side of a pty; a driver opens the slave side like any serial port,
through a stable symlink (`port`) that survives unplugging and replugging (each
plug is a new pty, as a USB adapter gets a new device node).

Faults are queued with `inject` and consumed by the next command(s):

``jam``       the next motion jams: `STAT?` shows FAULT, code 05, until `RESET`
``garble``    the next reply has one byte changed (checksum no longer matches)
``truncate``  the next reply is cut off before its checksum and terminator
``late``      the next reply comes `late_s` after the command
``silence``   the next command gets no reply at all
``busy``      the next motion takes `busy_s` instead of `motion_s`

`unplug` / `replug` make the port vanish and come back.

`script` schedules faults by number instead: ``{"garble": [3]}`` garbles the
reply to command 3 (0-based, every command counts); ``jam`` and ``busy``
count motion commands (LOAD, UNLOAD) instead; ``unplug`` unplugs the port for
`unplug_s` when command n arrives (the command is lost).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

__all__ = ["FAULTS", "LoaderEmulator", "checksum", "frame"]

FAULTS = ("jam", "garble", "truncate", "late", "silence", "busy")
_BARCODE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")


def checksum(body: str) -> str:
    """XOR of the bytes of `body`, as two upper-case hex digits."""
    ck = 0
    for b in body.encode("ascii"):
        ck ^= b
    return f"{ck:02X}"


def frame(body: str) -> bytes:
    """A complete reply line for `body` (``OK ...`` or ``ER ...``)."""
    return f"{body}*{checksum(body)}\r\n".encode("ascii")


class LoaderEmulator:
    """A cartridge loader with `slots` on a pty reachable at `port`.

    Parameters
    ----------
    slots : mapping of int to str or None
        Barcode per slot (1-based); None for an empty slot.
    port : path
        Where the symlink to the current pty is made.
    motion_s : float
        Duration of a LOAD or UNLOAD.
    state_file : path, optional
        Where the loader remembers which cartridge is on the stage (it stays
        there when the host process dies).
    """

    def __init__(
        self,
        slots: Mapping[int, str | None],
        port: str | Path,
        *,
        motion_s: float = 0.05,
        late_s: float = 1.0,
        busy_s: float = 1.0,
        firmware: str = "2.1.0",
        serial_no: str = "SIM0001",
        state_file: str | Path | None = None,
        script: Mapping[str, Iterable[int]] | None = None,
        unplug_s: float = 0.5,
    ) -> None:
        if not slots or min(slots) < 1:
            raise ValueError("slots are numbered from 1")
        for bc in slots.values():
            if bc is not None and not _BARCODE.match(bc):
                raise ValueError(f"invalid barcode {bc!r}")
        self.n_slots = max(slots)
        self.magazine: dict[int, str | None] = {
            i: slots.get(i) for i in range(1, self.n_slots + 1)
        }
        self.port = str(port)
        self.motion_s, self.late_s, self.busy_s = motion_s, late_s, busy_s
        self.firmware, self.serial_no = firmware, serial_no
        self.stage: int | None = None  # slot whose cartridge is on the stage
        # a real loader keeps its cartridge on the stage when the host dies
        self.state_file = Path(state_file) if state_file is not None else None
        if self.state_file is not None and self.state_file.exists():
            with contextlib.suppress(ValueError, KeyError, OSError):
                self.stage = json.loads(self.state_file.read_text())["stage"]
        self.state = "IDLE"
        self.code = 0
        self.commands: list[str] = []  # every command received, for tests
        self.motions = 0
        self.script = {k: set(v) for k, v in (script or {}).items()}
        for k in self.script:
            if k not in (*FAULTS, "unplug"):
                raise ValueError(f"unknown fault {k!r} in script")
        self.unplug_s = unplug_s
        self._motion: tuple[float, int | None, bool] | None = None
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life

    def start(self) -> LoaderEmulator:
        self._plug()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, name="loader-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._unplug()

    def __enter__(self) -> LoaderEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def unplug(self) -> None:
        """The port vanishes (the open file of a driver starts failing)."""
        with self._lock:
            self._unplug()

    def replug(self) -> None:
        """The port comes back (a new pty behind the same `port` path)."""
        with self._lock:
            self._plug()

    def inject(self, fault: str, count: int = 1) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            self._faults.extend([fault] * count)

    # ------------------------------------------------------------------ pty

    def _plug(self) -> None:
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)
        self._master, self._slave = master, slave
        link = Path(self.port)
        tmp = link.with_name(link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(link)

    def _unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.port).unlink()
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        buf = b""
        while not self._stop.is_set():
            master = self._master
            if master is None:
                time.sleep(0.01)
                buf = b""
                continue
            try:
                ready, _, _ = select.select([master], [], [], 0.02)
                chunk = os.read(master, 256) if ready else b""
            except OSError:  # unplugged meanwhile, or nobody has the port open
                time.sleep(0.01)
                continue
            buf += chunk
            while b"\r" in buf:
                line, buf = buf.split(b"\r", 1)
                self._answer(master, line.decode("ascii", "replace").strip())

    def _answer(self, master: int, command: str) -> None:
        with self._lock:
            n = len(self.commands)
            self.commands.append(command)
            motion = command.split()[:1] in (["LOAD"], ["UNLOAD"])
            m = -1
            if motion:
                m = self.motions
                self.motions += 1
            for kind, when in self.script.items():
                hit = (motion and m in when) if kind in ("jam", "busy") else n in when
                if hit and kind == "unplug":
                    self._unplug()
                    threading.Timer(self.unplug_s, self.replug).start()
                    return
                if hit:
                    self._faults.appendleft(kind)
            fault = self._faults.popleft() if self._faults else None
            if fault in ("jam", "busy"):  # motion faults wait for a motion
                self._faults.appendleft(fault)
                fault = None
                if command.split()[:1] in (["LOAD"], ["UNLOAD"]):
                    fault = self._faults.popleft()
            body = self._handle(command, fault)
        if fault == "silence":
            return
        data = frame(body)
        if fault == "garble":
            i = len(body) // 2
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        elif fault == "truncate":
            data = data[: len(body) - 1]
        elif fault == "late":
            time.sleep(self.late_s)
        with contextlib.suppress(OSError):
            os.write(master, data)

    def _settle(self) -> None:
        """Finish a motion whose time is up."""
        if self._motion is None:
            return
        done_at, slot, jam = self._motion
        if time.monotonic() < done_at:
            return
        self._motion = None
        if jam:
            self.state, self.code = "FAULT", 5
            return
        self.state = "IDLE"
        # LOAD: the cartridge leaves its slot; UNLOAD: back to its slot
        self.stage = slot
        self._save()

    def _save(self) -> None:
        if self.state_file is not None:
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps({"stage": self.stage}))
            tmp.replace(self.state_file)

    def _start_motion(self, slot: int | None, fault: str | None) -> None:
        duration = self.busy_s if fault == "busy" else self.motion_s
        self.state = "BUSY"
        self._motion = (time.monotonic() + duration, slot, fault == "jam")

    def _handle(self, command: str, fault: str | None) -> str:
        self._settle()
        parts = command.split()
        if not parts:
            return "ER 01 UNKNOWN-COMMAND"
        cmd, args = parts[0], parts[1:]
        if cmd == "ID?" and not args:
            return f"OK CTL8 {self.firmware} {self.serial_no}"
        if cmd == "INV?" and not args:
            cells = " ".join(
                f"{i}={'-' if bc is None or i == self.stage else bc}"
                for i, bc in self.magazine.items()
            )
            return f"OK {self.n_slots} {cells}"
        if cmd == "STAT?" and not args:
            slot = "-" if self.stage is None else str(self.stage)
            return f"OK {self.state} {slot} {self.code}"
        if cmd == "BC?" and not args:
            if self.stage is None or self.state == "BUSY":
                return "ER 07 NO-CARTRIDGE"
            return f"OK {self.magazine[self.stage]}"
        if cmd == "RESET" and not args:
            if self.state == "FAULT":  # cleared by hand: back in its slot
                self.stage = None
                self._save()
            self._motion = None
            self.state, self.code = "IDLE", 0
            return "OK RESET"
        if cmd == "LOAD":
            if len(args) != 1 or not args[0].isdigit():
                return "ER 02 BAD-ARGUMENT"
            n = int(args[0])
            if not 1 <= n <= self.n_slots:
                return "ER 02 BAD-ARGUMENT"
            if err := self._motion_refused():
                return err
            if self.stage is not None:
                return "ER 04 STAGE-OCCUPIED"
            if self.magazine[n] is None:
                return "ER 03 SLOT-EMPTY"
            self._start_motion(n, fault)
            return f"OK LOAD {n}"
        if cmd == "UNLOAD" and not args:
            if err := self._motion_refused():
                return err
            if self.stage is None:
                return "ER 07 NO-CARTRIDGE"
            back = self.stage
            self._start_motion(None, fault)
            return f"OK UNLOAD {back}"
        if cmd in ("ID?", "INV?", "STAT?", "BC?", "RESET", "UNLOAD"):
            return "ER 02 BAD-ARGUMENT"
        return "ER 01 UNKNOWN-COMMAND"

    def _motion_refused(self) -> str | None:
        if self.state == "FAULT":
            return "ER 08 FAULT"
        if self.state == "BUSY":
            return "ER 06 BUSY"
        return None


@contextlib.contextmanager
def emulated_loader(
    slots: Mapping[int, str | None], port: str | Path, **kw: float
) -> Iterator[LoaderEmulator]:
    """A running `LoaderEmulator` for the duration of the block."""
    emu = LoaderEmulator(slots, port, **kw)  # type: ignore[arg-type]
    with emu:
        yield emu
