"""The readers' review of a run's candidates: ``review.jsonl`` and its state.

In the clinic the count is what trained readers confirm, not what the machine
calls ("2+1"): two readers decide every candidate independently (the second
does not see the first's decisions until both are done), an adjudicator decides
where they disagree (or where either is unsure), and the count is signed.

``review.jsonl`` in the run folder holds one sealed line
(`controller.runstore.chain`) per decision and one for the sign-off; nothing is
ever rewritten. A decision names the sha256 of the ``events.csv`` it was made
on: decisions on another version of the events (the run's outputs written
again since) no longer count. Who is who follows from the order of the lines:
the first two people to decide are the readers; once both have decided every
candidate, the disagreements go to an adjudicator, who is neither of them. A
sign-off is refused until every candidate is decided; after it, every decision
is refused (`ReviewLocked`).

The reviewed count is the candidates both readers call CTC plus those the
adjudicator calls CTC. Candidates are the machine's CTC calls and the objects
flagged for review (`analysis.review`): a reader may count a CTC that the
machine missed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from controller.errors import ScannerError
from controller.records import now
from controller.runstore.chain import GENESIS, append_sealed, link, unseal

__all__ = [
    "DECISIONS",
    "REVIEW_FILE",
    "DecisionLine",
    "ReviewError",
    "ReviewLocked",
    "ReviewState",
    "SignOffLine",
    "append_line",
    "candidates_of",
    "find_signoff",
    "fold",
    "ident",
    "read_lines",
    "signed_off",
]

REVIEW_FILE = "review.jsonl"

#: what a reader can say of a candidate
DECISIONS = ("ctc", "not_ctc", "unsure")
Decision = Literal["ctc", "not_ctc", "unsure"]

#: events.csv columns a reader sees as the candidate's features
FEATURES = (
    "diameter_um",
    "nucleus_inside",
    "ck_snr",
    "cd45_snr",
    "marker_snr",
    "solidity",
    "axis_ratio",
    "DAPI_mean",
)


class ReviewError(ScannerError):
    """A decision or sign-off that does not fit the review (HTTP 409/422)."""

    status = 409


class ReviewLocked(ReviewError):
    """The review is signed: nothing more can be decided."""


class _Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    t: str = Field(default_factory=now)
    reviewer: str


class DecisionLine(_Line):
    kind: Literal["decision"] = "decision"
    object_id: str
    decision: Decision
    comment: str = ""
    role: Literal["reader", "adjudicator"] = "reader"
    events_sha256: str


class SignOffLine(_Line):
    kind: Literal["signoff"] = "signoff"
    #: sha256 over the fields' checksums, the events and the decisions
    sha256: str
    fields_sha256: str
    events_sha256: str
    decisions_sha256: str
    machine_count: int
    reviewed_count: int
    readers: list[str]
    adjudicator: str | None = None
    kappa: float | None = None
    agreement: float | None = None
    candidates: int = 0


ReviewLine = Annotated[DecisionLine | SignOffLine, Field(discriminator="kind")]
_LINE: TypeAdapter[DecisionLine | SignOffLine] = TypeAdapter(ReviewLine)


def read_lines(
    path: Path,
) -> tuple[list[DecisionLine | SignOffLine], bytes, list[str]]:
    """The lines of a review file up to the first one whose seal does not hold
    (a torn last line, cut by a crash, is ignored), the file's bytes, and what
    is wrong with it: a line unsealed, changed, inserted, or no review line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], b"", []
    out: list[DecisionLine | SignOffLine] = []
    problems: list[str] = []
    prev = GENESIS
    for n, line in enumerate(raw.split(b"\n")[:-1], start=1):
        body, digest = unseal(line)
        if digest is None or digest != link(prev, body):
            problems.append(
                f"{path.name} line {n}: "
                + ("not sealed" if digest is None else "its seal does not hold")
                + ": a line was changed, removed or inserted"
            )
            break
        prev = digest
        try:
            out.append(_LINE.validate_json(body))
        except (ValidationError, ValueError):
            problems.append(f"{path.name} line {n}: not a review line")
            break
    return out, raw, problems


def find_signoff(raw: bytes) -> tuple[SignOffLine | None, bytes]:
    """The sign-off line of a review file's bytes, whatever their seals, and
    the bytes before it (the decisions it signed)."""
    pos = 0
    for line in raw.split(b"\n")[:-1]:
        body, _ = unseal(line)
        try:
            x = _LINE.validate_json(body)
        except (ValidationError, ValueError):
            x = None
        if isinstance(x, SignOffLine):
            return x, raw[:pos]
        pos += len(line) + 1
    return None, raw


def append_line(path: Path, line: DecisionLine | SignOffLine) -> None:
    """One sealed, fsync'd line (the caller holds the run folder's lock)."""
    append_sealed(path, line.model_dump_json())


def signed_off(run_root: Path) -> SignOffLine | None:
    """The sign-off of the run's review, if it has one."""
    lines, _, _ = read_lines(Path(run_root) / REVIEW_FILE)
    return next((x for x in lines if isinstance(x, SignOffLine)), None)


def candidates_of(
    events_csv: bytes,
) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]]]:
    """The review candidates of an events.csv (machine CTC calls, then the
    objects flagged for review, each in file order), the machine's count and
    every row."""
    try:
        reader = csv.DictReader(io.StringIO(events_csv.decode("utf-8")))
        rows: list[dict[str, Any]] = list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        raise ReviewError(f"events.csv cannot be read: {e}") from None
    missing = {"object_id", "field", "label"} - set(reader.fieldnames or ())
    if missing:
        raise ReviewError(f"events.csv has no column {sorted(missing)[0]}")
    seen: set[str] = set()
    for r in rows:
        oid = r.get("object_id") or ""
        if not oid or oid in seen:
            raise ReviewError(
                f"events.csv names object {oid!r} twice, or an object without id"
            )
        seen.add(oid)
    ctc = [r for r in rows if r.get("label") == "CTC"]
    flagged = [r for r in rows if r.get("label") != "CTC" and r.get("review")]
    return ctc + flagged, len(ctc), rows


def ident(name: str) -> str:
    """A person's identity in a review: the name in Unicode compatibility form,
    case-folded, with runs of white space as one space."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two readers' decisions on the same items (None when
    chance agreement is total, e.g. every decision the same)."""
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pe = sum((a.count(k) / n) * (b.count(k) / n) for k in DECISIONS)
    if pe >= 1.0:
        return None
    return round((po - pe) / (1 - pe), 4)


@dataclass
class ReviewState:
    """The review of one version of the events, folded from its lines."""

    candidates: list[str]
    machine_count: int
    events_sha256: str
    readers: list[str] = field(default_factory=list)
    #: who is who: a name's identity (`ident`) -> the name first used for it
    names: dict[str, str] = field(default_factory=dict)
    #: what is wrong with the review file or its events: nothing is written
    problems: list[str] = field(default_factory=list)
    #: reviewer -> object id -> decision (the reviewer's latest)
    decisions: dict[str, dict[str, str]] = field(default_factory=dict)
    comments: dict[str, dict[str, str]] = field(default_factory=dict)
    adjudicator: str | None = None
    adjudicated: dict[str, str] = field(default_factory=dict)
    signoff: SignOffLine | None = None
    #: decisions made on another version of events.csv (no longer counted)
    stale: int = 0

    def who(self, name: str, *, register: bool = False) -> str:
        """The name a person has in this review: names that differ only by
        case, Unicode form or compatibility characters are one person."""
        key = ident(name)
        if register:
            self.names.setdefault(key, name)
        return self.names.get(key, name)

    def done(self, reviewer: str) -> int:
        return len(self.decisions.get(reviewer, {}))

    def complete(self, reviewer: str) -> bool:
        return self.done(reviewer) == len(self.candidates)

    @property
    def readers_done(self) -> bool:
        return len(self.readers) == 2 and all(self.complete(r) for r in self.readers)

    @property
    def state(self) -> Literal["open", "adjudication", "signed"]:
        if self.signoff is not None:
            return "signed"
        if self.readers_done or not self.candidates:
            return "adjudication"
        return "open"

    def _pair(self, oid: str) -> tuple[str, str]:
        r1, r2 = self.readers
        return self.decisions[r1][oid], self.decisions[r2][oid]

    @property
    def disagreements(self) -> list[str]:
        """Candidates the readers decided differently, or either as unsure
        (only once both are done: before that nobody may see it)."""
        if not self.readers_done:
            return []
        out = []
        for oid in self.candidates:
            a, b = self._pair(oid)
            if a != b or a == "unsure":
                out.append(oid)
        return out

    @property
    def pending(self) -> list[str]:
        """Disagreements the adjudicator has not decided yet."""
        return [o for o in self.disagreements if o not in self.adjudicated]

    @property
    def ready_to_sign(self) -> bool:
        return self.signoff is None and (
            not self.candidates or (self.readers_done and not self.pending)
        )

    @property
    def final(self) -> dict[str, str]:
        """Object id -> the review's decision (once both readers are done)."""
        if not self.readers_done:
            return {}
        out = {}
        for oid in self.candidates:
            a, b = self._pair(oid)
            out[oid] = self.adjudicated.get(oid, "?") if a != b or a == "unsure" else a
        return out

    @property
    def reviewed_count(self) -> int | None:
        if not self.candidates:
            return 0
        if not self.readers_done or self.pending:
            return None
        return sum(v == "ctc" for v in self.final.values())

    @property
    def agreement(self) -> float | None:
        if not self.readers_done or not self.candidates:
            return None
        same = sum(a == b for a, b in map(self._pair, self.candidates))
        return round(same / len(self.candidates), 4)

    @property
    def kappa(self) -> float | None:
        if not self.readers_done:
            return None
        pairs = [self._pair(o) for o in self.candidates]
        return cohen_kappa([a for a, _ in pairs], [b for _, b in pairs])

    def check(self, reviewer: str, object_id: str, decision: str) -> str:
        """The role `reviewer` decides `object_id` in, or the reason it may not.

        Raises
        ------
        ReviewError
            The decision does not fit the review's state (409), or names no
            candidate (422).
        """
        if self.signoff is not None:
            raise ReviewLocked(
                f"the review was signed by {self.signoff.reviewer} at "
                f"{self.signoff.t}: no more decisions"
            )
        if self.problems:
            raise ReviewError(
                f"the review cannot go on: {self.problems[0]} (ctcscan verify "
                "lists every problem)"
            )
        reviewer = self.who(reviewer)
        if object_id not in self.candidates:
            e = ReviewError(f"object_id: {object_id!r} is no candidate of this run")
            e.status = 422
            raise e
        if reviewer in self.readers:
            if self.readers_done:
                raise ReviewError(
                    "both readers are done: their decisions are final and the "
                    "disagreements go to the adjudicator"
                )
            return "reader"
        if len(self.readers) < 2:
            return "reader"
        if not self.readers_done:
            raise ReviewError(
                f"{self.readers[0]} and {self.readers[1]} are reading this run; "
                "the adjudicator decides once both are done"
            )
        if self.adjudicator not in (None, reviewer):
            raise ReviewError(f"{self.adjudicator} is adjudicating this run")
        if object_id not in self.disagreements:
            raise ReviewError(
                f"{object_id}: the readers agree on it; the adjudicator decides "
                "only their disagreements"
            )
        if decision == "unsure":
            e = ReviewError("decision: the adjudicator decides ctc or not_ctc")
            e.status = 422
            raise e
        return "adjudicator"

    def progress(self) -> dict[str, Any]:
        """Per reviewer: decided and total (never what they decided)."""
        n = len(self.candidates)
        out = {
            r: {"role": "reader", "done": self.done(r), "total": n}
            for r in self.readers
        }
        if self.adjudicator:
            out[self.adjudicator] = {
                "role": "adjudicator",
                "done": len(self.adjudicated),
                "total": len(self.disagreements),
            }
        return out

    def summary(self) -> dict[str, Any]:
        """What the report shows of a signed review."""
        return {
            "machine_count": self.machine_count,
            "reviewed_count": self.reviewed_count,
            "candidates": len(self.candidates),
            "readers": list(self.readers),
            "adjudicator": self.adjudicator,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "disagreements": len(self.disagreements),
            "signoff": None
            if self.signoff is None
            else {
                "reviewer": self.signoff.reviewer,
                "t": self.signoff.t,
                "sha256": self.signoff.sha256,
            },
        }


def fold(
    lines: Iterable[DecisionLine | SignOffLine],
    candidates: list[str],
    machine_count: int,
    events_sha256: str,
) -> ReviewState:
    """The review state of `lines` for the events whose sha256 is given."""
    st = ReviewState(list(candidates), machine_count, events_sha256)
    for x in lines:
        if isinstance(x, SignOffLine):
            # signed is signed: events changed since are a problem, not a reopening
            if st.signoff is None:
                st.signoff = x
                if x.events_sha256 != events_sha256:
                    st.problems.append(
                        "events.csv has changed since the review was signed"
                    )
            continue
        if x.events_sha256 != events_sha256:
            st.stale += 1
            continue
        who = st.who(x.reviewer, register=True)
        if x.role == "adjudicator":
            st.adjudicator = st.adjudicator or who
            st.adjudicated[x.object_id] = x.decision
            continue
        if who not in st.readers:
            st.readers.append(who)
        st.decisions.setdefault(who, {})[x.object_id] = x.decision
        if x.comment:
            st.comments.setdefault(who, {})[x.object_id] = x.comment
    if len(st.readers) > 2:
        st.problems.append(
            f"{len(st.readers)} readers in review.jsonl: it was written by hand"
        )
        st.readers = st.readers[:2]
    return st


def signoff_digest(
    fields: Mapping[str, str], events_sha256: str, decisions: bytes
) -> tuple[str, str, str]:
    """(sha256 over all, fields' sha256, decisions' sha256) of a sign-off:
    `fields` maps field name -> the stored file's sha256."""
    f = hashlib.sha256(
        json.dumps(dict(sorted(fields.items())), separators=(",", ":")).encode()
    ).hexdigest()
    d = hashlib.sha256(decisions).hexdigest()
    whole = hashlib.sha256(f"{f}\n{events_sha256}\n{d}\n".encode()).hexdigest()
    return whole, f, d
