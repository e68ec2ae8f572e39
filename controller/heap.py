"""The scanning process's heap: fewer glibc malloc arenas, free pages returned.

A scan allocates whole frames and fields (5-11 MB each) on several threads
(acquisition, storage, detection results). glibc gives each thread that meets
contention an arena of its own, and a freed 11 MB block stays in the arena that
made it, so a run's peak RSS grew with the threads by tens of MB (measured,
60 fields of the simulated cartridge: 320 MB peak with the default arenas,
270 MB with two, the same CPU time and 60 % fewer page faults). One is better
still: a second arena's heaps are 64 MB mappings, which the 11-33 MB blocks
of frames, fields and the simulator's drawings fragment, and which glibc
shrinks and grows again as blocks come and go (bench_soak, 3 full cartridges,
peak RSS of the scanning process 249-265 MB with one arena against 271-293 MB
with two; 13-22 thousand page faults a cartridge against 15-27 thousand, and
no more CPU time: the threads' small blocks come from their own caches, only
the large ones share the arena's lock). `limit_arenas` caps them at one
(``ARENA_MAX``). glibc settles the limit the first time the
process needs more than a handful of arenas and never again, so it must be
called before the process has threads: importing `controller` calls it.
`release_free_memory` hands free pages back between cartridges. Both do
nothing where the C library is not glibc, and `limit_arenas` leaves a
``MALLOC_ARENA_MAX`` the operator set alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

__all__ = ["ARENA_MAX", "keep_freed_blocks", "limit_arenas", "release_free_memory"]

logger = logging.getLogger("ctcscan.memory")

#: malloc arenas of a scanning process: the main one, shared by its threads
ARENA_MAX = 1

_M_ARENA_MAX = -8  # mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def limit_arenas(n: int = ARENA_MAX) -> bool:
    """At most `n` malloc arenas for this process from now on; True if set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, n))


def release_free_memory() -> None:
    """Return the heap's free pages to the system (``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_blocks(
    mmap_threshold: int = 32 * 2**20, trim_threshold: int = 256 * 2**20
) -> bool:
    """Keep freed large blocks in the heap for the next allocation; True if set.

    For a process that allocates and frees the same few-MB arrays over and over
    (the detection worker: a field's full-frame maps, 50 MB a field). By default
    glibc maps blocks that large afresh and unmaps them when freed, or trims
    the heap's free top, so every field touches new pages: measured 2,200 page
    faults and 11-13 ms of system time a field, against 24 faults and 2 ms with
    these thresholds, at the same peak RSS (the pages are reused, not added).
    `mmap_threshold` at most 32 MiB (glibc's limit); thresholds the operator set
    in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``)
    are left alone.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for env, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_threshold),
    ):
        if env not in os.environ:
            ok = bool(libc.mallopt(param, value)) and ok
    return ok
