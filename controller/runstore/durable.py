"""Durable writes: a crash leaves either nothing or the whole file.

Kept free of the run folder's other modules (its ledger's records): the
detection workers write their results with it and import only this.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "TMP_SUFFIX",
    "forget_cached",
    "temporary_name",
    "write_durably",
    "write_durably_from",
]

#: what a file is called while it is being written
TMP_SUFFIX = ".tmp"


def temporary_name(path: Path, *, unique: bool = False) -> Path:
    """Where `path` is written before it is renamed into place:
    ``NAME.tmp``, or with `unique` ``NAME.<8 hex digits>.tmp``, a name of this
    writer's own. A file two processes may write at once (a field's result:
    a Dask worker that outlived its scheduler, and the resumed run) takes a
    unique one, so that neither truncates the other's half-written file."""
    tag = f".{secrets.token_hex(4)}" if unique else ""
    return path.with_name(f"{path.name}{tag}{TMP_SUFFIX}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
    path: Path, data: bytes | memoryview, *, unique: bool = False
) -> None:
    """Write `data` to `path` so that a crash leaves either nothing or all of it
    (`unique`: through a temporary of this writer's own, `temporary_name`)."""
    write_durably_from(path, lambda f: f.write(data), unique=unique)


def write_durably_from(
    path: Path,
    write: Callable[[BinaryIO], object],
    *,
    hasher: Callable[[], Any] | None = None,
    unique: bool = False,
) -> tuple[str, int]:
    """As `write_durably`, the bytes written by ``write(file)`` (which may
    seek). With `hasher` (``hashlib.sha256``), the digest of the file as
    written is taken before it is renamed into place (read back from the page
    cache through a memory map: no copy). Returns ``(hex digest or "", size)``.
    """
    tmp = temporary_name(path, unique=unique)
    digest = ""
    try:
        with open(tmp, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
            if hasher is not None:
                h = hasher()
                if size:
                    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
                        h.update(m)
                digest = h.hexdigest()
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest, size


def forget_cached(path: Path) -> None:
    """Let the system drop `path`'s pages from its page cache: a file written
    durably (so its pages are clean) that this process will not read again.

    A scan writes 2 GB of fields a cartridge and reads each back once, to
    detect it. Left cached, those pages crowd out everything else in memory
    over a night's queue, and every field is written into pages the system
    must find afresh; dropped, the next field's pages are the ones just
    freed. Measured on a 2-core VM, 11 MB written and fsync'd: 100-170 ms
    into fresh pages, 7-8 ms when each file's pages were dropped two files
    later. Advice only: nothing where the system has no ``posix_fadvise``,
    no error if the file is gone, and no wait if something else (a pipe) has
    taken its name.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
