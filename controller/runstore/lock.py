"""One owner per run folder (and per queue folder): an exclusive lock.

The lock is an OS file lock (`filelock`, ``flock`` on Linux) on ``.lock`` in the
folder, taken before anything else is written there. The kernel drops it when
the holding process ends, however it ends, so a lock left by a killed process
is simply taken by the next one; nothing has to guess whether a pid is stale.
The holder writes who it is (pid, host, time, command) to ``.owner.json`` so a
second process can say whom it met.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from filelock import FileLock, Timeout

from controller.errors import StorageError
from controller.records import now
from controller.runstore.durable import write_durably

__all__ = ["FolderLock", "FolderLockedError", "in_use"]

LOCK_FILE = ".lock"
OWNER_FILE = ".owner.json"
#: how long a refused process waits for the holder's note to name it
HOLDER_WAIT_S = 1.0


class FolderLockedError(StorageError):
    """Another process owns the folder."""


class FolderLock:
    """Exclusive ownership of `folder` by this process (a context manager).

    Parameters
    ----------
    folder : Path
        The run or queue folder; created if missing.
    what : str
        How the folder is named in the error ("run folder", "queue folder").
    """

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.what = what
        # an OS lock or none: a marker file that a killed process could leave
        # behind would defeat the point
        self._lock = FileLock(
            str(self.folder / LOCK_FILE),
            timeout=0,
            thread_local=False,
            fallback_to_soft=False,
        )

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)

    def acquire(self) -> None:
        """Take the lock now or raise `FolderLockedError` naming the holder."""
        if self.held:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"{self.what} {self.folder} is not writable: {e.strerror or e}"
            ) from None
        note = self.folder / OWNER_FILE
        if note.is_symlink() or (note.exists() and _owner_note(note) is None):
            # not a note this program wrote (it writes one whole, in place):
            # someone's file, which taking the lock would replace
            raise StorageError(
                f"{self.what} {self.folder} holds a {OWNER_FILE} that is no "
                "ctcscan owner note (someone's file); choose another folder"
            )
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise FolderLockedError(
                f"{self.what} {self.folder} is in use by {self.holder()}; "
                "wait for it to finish or stop it first"
            ) from None
        except OSError as e:
            raise StorageError(
                f"{self.what} {self.folder} is not writable (cannot lock it): "
                f"{e.strerror or e}"
            ) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": now(),
            "command": " ".join(sys.argv[:1] + sys.argv[1:])[:500],
        }
        # the lock holds regardless; the note is a courtesy, replaced whole
        # so that no reader sees half of it
        with contextlib.suppress(OSError):
            write_durably(self.folder / OWNER_FILE, (json.dumps(owner) + "\n").encode())

    def holder(self, wait_s: float = HOLDER_WAIT_S) -> str:
        """Who holds the lock, as far as its owner note says. The holder
        writes its note just after taking the lock, so a process refused in
        between finds no note, or the note of a holder that has since ended:
        it waits up to `wait_s` for one from a living holder."""
        deadline = time.monotonic() + wait_s
        while True:
            o = _owner_note(self.folder / OWNER_FILE)
            if o is not None and _may_hold(o):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if o is None:
            return "another process"
        return f"pid {o['pid']} on {o['host']} (since {o['since']})"

    def release(self) -> None:
        if self.held:
            self._lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _owner_note(path: Path) -> dict[str, Any] | None:
    """The owner note at `path`, or None if there is none to read."""
    try:
        o = json.loads(path.read_text())
        return {"pid": int(o["pid"]), "host": o["host"], "since": o["since"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _may_hold(note: dict[str, Any]) -> bool:
    """Whether the note's writer may still hold a lock: on another host,
    or a process of this host that is still there."""
    if note["host"] != socket.gethostname():
        return True
    if note["pid"] <= 0:  # 0 and below name process groups, not a process
        return False
    try:
        os.kill(note["pid"], 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # there, but not ours to signal
        return True
    return True


def in_use(folder: str | Path) -> bool | None:
    """Whether another process holds `folder`'s lock now, read from the
    kernel's list of locks (``/proc/locks``) without touching the lock itself,
    so that a watcher never makes an owner's ``acquire`` fail. None where the
    kernel does not list its locks."""
    try:
        st = os.stat(Path(folder) / LOCK_FILE)
    except OSError:
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" when blocked)
        if len(parts) >= 6 and parts[1] != "->" and parts[1] == "FLOCK":
            try:
                major, minor, ino = parts[5].split(":")
                mine = int(parts[4]) == os.getpid()
                if (int(major, 16), int(minor, 16), int(ino)) == want and not mine:
                    return True
            except ValueError:
                continue
    return False
