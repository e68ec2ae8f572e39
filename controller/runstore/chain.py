"""Sealed lines: the hash chain of the ledger, the queue journal and the audit log.

Every line these files get is a JSON object that ends with its seal,

    {..., "chain": "<64 hex digits>"}

where the seal is the sha256 of the previous sealed line's seal, a newline and
the line's own bytes without the seal (``{...}``). A line therefore vouches for
its own content and for every sealed line before it: a changed byte, a line
removed, inserted or moved is found by `check_lines` (`ctcscan verify`).

The chain is tamper-evident, not tamper-proof: someone who rewrites a file
and recomputes every seal after the change is not found, nor is the removal of
the last lines (the run's other files are cross-checked for that). Lines
written before lines were sealed are read as before and reported as unsealed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "GENESIS",
    "ChainReport",
    "append_sealed",
    "check_lines",
    "last_seal",
    "link",
    "seal",
    "unseal",
]

_SEALED = re.compile(rb'^(\{.*),"chain":"([0-9a-f]{64})"\}$', re.DOTALL)

#: the seal "before" the first line of a file
GENESIS = ""


def link(prev: str, body: bytes) -> str:
    return hashlib.sha256(prev.encode("ascii") + b"\n" + body).hexdigest()


def seal(body: str, prev: str) -> tuple[bytes, str]:
    """The sealed line (newline included) of the JSON object `body`, which
    follows the line sealed `prev`; and its own seal."""
    raw = body.encode("utf-8")
    if not (raw.startswith(b"{") and raw.endswith(b"}")) or b"\n" in raw:
        raise ValueError("a sealed line is one JSON object on one line")
    if raw.replace(b" ", b"") == b"{}":
        raise ValueError("an empty object is no line")
    digest = link(prev, raw)
    return raw[:-1] + b',"chain":"' + digest.encode("ascii") + b'"}\n', digest


def unseal(line: bytes) -> tuple[bytes, str | None]:
    """The line's bytes as they were sealed (``{...}``) and its seal; a line
    without a seal comes back whole with None."""
    m = _SEALED.match(line.rstrip(b"\n"))
    if m is None:
        return line.rstrip(b"\n"), None
    return m.group(1) + b"}", m.group(2).decode("ascii")


def last_seal(fd: int, size: int) -> str:
    """The seal of the last sealed line of the open file `fd` (`size` bytes),
    or `GENESIS` when it has none. Reads backwards, a block at a time."""
    end, tail = size, b""
    while end > 0:
        start = max(0, end - 65536)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        lines = tail.split(b"\n")
        complete = lines[1:] if end > 0 else lines  # the first may be cut
        for line in reversed(complete):
            if (digest := unseal(line)[1]) is not None:
                return digest
        tail = lines[0] if end > 0 else b""
    return GENESIS


def append_sealed(path: str | os.PathLike[str], body: str) -> None:
    """Append the JSON object `body` to `path` as one sealed line, fsync'd.

    The seal follows the file's last sealed line. A torn last line (a crash
    mid-write) is left as it is and the new line starts on a fresh line.
    Several processes never append to one file at once (the folder's lock).

    Raises
    ------
    OSError
        The line could not be written whole.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        line, _ = seal(body, last_seal(fd, size))
        view = memoryview(b"\n" + line if torn else line)
        while view:  # a short write (a full disk) is not a line
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ChainReport:
    """What `check_lines` found in one file."""

    lines: int = 0
    sealed: int = 0
    #: lines before the first sealed one (written before lines were sealed)
    unsealed_before: int = 0
    #: the last line has no newline: a write cut short (the first problem)
    cut_short: bool = False
    #: numbers of lines after it that are no JSON at all: torn by a crash (a
    #: crash cuts a line short, and the next append starts afresh), vouching
    #: for nothing and read as nothing
    torn: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_lines(raw: bytes) -> ChainReport:
    """Check the chain of a file's bytes; see the module docstring.

    Problems: a sealed line whose seal does not match (changed, or a line
    before it changed, removed or inserted); an unsealed line after the first
    sealed one (changed or inserted), unless it is no JSON and the next sealed
    line follows on from the one before it, as after a crash (torn:
    `ChainReport.torn`); a last line without a newline.
    """
    rep = ChainReport()
    lines: Sequence[bytes] = raw.split(b"\n")
    if lines and lines[-1]:
        rep.cut_short = True
        rep.problems.append(
            f"line {len(lines)}: incomplete (no newline): a write cut short"
        )
    lines = lines[:-1]
    rep.lines = len(lines)
    prev: str | None = None  # None: no sealed line yet
    # lines of no JSON since the last sealed line: torn, if the chain goes on
    # past them from that line, as an append after a crash does
    cut: list[int] = []
    not_sealed = "not sealed: a whole line without a seal among sealed ones"
    for n, line in enumerate(lines, start=1):
        body, digest = unseal(line)
        if digest is None:
            if prev is None:
                rep.unsealed_before += 1
            elif _is_json(line):
                rep.problems.append(f"line {n}: {not_sealed}")
            else:
                cut.append(n)
            continue
        rep.sealed += 1
        if digest != link(GENESIS if prev is None else prev, body):
            rep.problems.append(
                f"line {n}: seal does not match: this line, or one before it, "
                "was changed, removed or inserted"
            )
            rep.problems += [f"line {c}: {not_sealed}" for c in cut]
        else:
            rep.torn += cut
        cut = []
        prev = digest
    # nothing sealed after them: no sign of the append that follows a crash,
    # unless that append was cut short too (a second crash)
    if rep.cut_short:
        rep.torn += cut
    else:
        rep.problems += [f"line {c}: {not_sealed}" for c in cut]
    return rep


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
