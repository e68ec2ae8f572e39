"""Hostile input: every parser of outside input, fed arbitrary and malformed bytes.

The rule under test: whatever the bytes, a parser returns a valid model or raises
the project's own error (`ScannerError` and its subclasses, `RecordError`,
`LoaderError`, `FieldReadError`) with a one-line message; never another exception
type, never a message of several lines, never a hang (every call runs under a
time limit).

Parsers covered:

- instrument, assay, layout and holder YAML (`InstrumentConfig.from_file`,
  `AssayConfig.from_file`, `get_layout`, `HolderConfig.from_file`): arbitrary
  bytes, YAML token soup, structured YAML (NaN, inf, huge integers, deep nesting,
  tags, small alias bombs, self-referencing aliases) and the shipped files with one
  value replaced or removed; layout names that are no file;
- ledger and journal lines (`parse_line`, `Ledger.read`): arbitrary bytes and JSON
  objects of every record kind with random field values;
- cartridge loader replies: the reply parser on arbitrary bytes and the real
  `CartridgeLoader` over a pseudo-terminal, with garbage and with correctly
  framed (valid checksum) replies of nonsense content;
- field files (`inspect_field_file`, `read_field_file`): arbitrary bytes, and
  small valid OME-TIFFs whose OME-XML, axes or dtype are altered.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import select
import threading
import tty
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pytest
import serial
import tifffile
from hypothesis import (
    HealthCheck,
    currently_in_test_context,
    event,
    example,
    given,
    settings,
)
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from analysis.fieldio import (
    FieldFile,
    FieldReadError,
    inspect_field_file,
    read_field_file,
)
from analysis.settings import DetectionSettings
from controller.config import (
    AssayConfig,
    CameraSettings,
    ChannelSettings,
    FocusSettings,
    Indication,
    InstrumentConfig,
    LoaderSettings,
    SimulationSettings,
    StageLimits,
)
from controller.errors import ScannerError
from controller.hardware.loader import (
    CartridgeLoader,
    LoaderError,
    LoaderFault,
    LoaderStatus,
    _Corrupt,
)
from controller.layouts import LAYOUTS, CartridgeLayout, get_layout
from controller.records import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    Record,
    RecordError,
    Started,
    Stored,
    dump_line,
    parse_line,
)
from controller.runs.queue import HolderCartridge, HolderConfig
from controller.runstore.ledger import Ledger
from hardware_configs import CONFIG_DIR
from simulators.loader import frame

PROJECT_ERRORS: tuple[type[BaseException], ...] = (
    ScannerError,
    RecordError,
    LoaderError,
    FieldReadError,
)
#: longer than this is a hang (every call here takes milliseconds)
HANG_S = 10.0

#: every test: no example database, and a deadline far above the milliseconds an
#: example takes (a hang is caught by `bounded`)
BASE = settings(
    deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------- helpers


def bounded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread; a test failure after `HANG_S`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_S)
    if worker.is_alive():
        pytest.fail(f"{fn.__qualname__} did not return within {HANG_S:g} s (hang)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def assert_one_line(err: BaseException) -> None:
    msg = str(err)
    assert msg.strip(), f"{type(err).__name__} without a message"
    assert len(msg.splitlines()) == 1, f"{type(err).__name__} of several lines: {msg!r}"


def result_or_error(
    fn: Callable[..., Any],
    *args: Any,
    errors: tuple[type[BaseException], ...] = PROJECT_ERRORS,
    **kwargs: Any,
) -> Any:
    """What `fn` returns, or None when it raised one of `errors` in one line.

    Any other exception propagates and fails the test.
    """
    try:
        value = bounded(fn, *args, **kwargs)
    except errors as e:
        assert_one_line(e)
        value, outcome = None, type(e).__name__
    else:
        outcome = "result"
    if currently_in_test_context():  # shown by --hypothesis-show-statistics
        event(f"{fn.__name__}: {outcome}")
    return value


def assert_finite(value: Any, where: str = "") -> None:
    """Every float in a dumped model is finite (configs refuse inf and NaN)."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value}"
    elif isinstance(value, dict):
        for k, v in value.items():
            if f"{where}.{k}" != ".simulation.world":  # free-form overrides
                assert_finite(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            assert_finite(v, f"{where}[{i}]")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# ---------------------------------------------------------------- value strategies


@dataclass(frozen=True)
class Raw:
    """A fragment written into YAML or JSON text as it is (tags, huge numbers)."""

    text: str


#: marks a key to delete in a mutation
DELETE = Raw("<delete>")

INTS = st.integers() | st.sampled_from(
    [0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, -(10**400)]
)
FLOATS = st.floats() | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e308, -1e308, math.nan, math.inf, -math.inf]
)
#: integers at Python's int-from-text limit (4300 digits)
HUGE_INTS = st.integers(4290, 4400).map(lambda n: Raw("9" * n))
TEXTS = st.text(max_size=16) | st.sampled_from(
    [
        "",
        " ",
        "DAPI",
        "emulated",
        "nucleus",
        "metastatic-breast",
        "a\nb",
        "line\r",
        "\u2028",
        "\x85",
        "\x00",
        "\udcff",
        "µm",
        "x" * 300,
    ]
)
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXTS | HUGE_INTS


def _deep(n: int, opener: str, closer: str) -> Raw:
    return Raw(opener * n + closer * n)


YAML_RAW = st.sampled_from(
    [
        Raw("!!python/object/apply:os.system ['true']"),
        Raw("!!python/object:collections.OrderedDict {}"),
        Raw("!!python/name:os.system"),
        Raw("!!binary aGVsbG8="),
        Raw("!!binary '!!'"),
        Raw("!!timestamp 2001-12-14"),
        Raw("2001-13-45"),
        Raw("2001-02-30 25:61:61"),
        Raw("2001-01-01T00:00:00+99:00"),
        Raw("!!set {a, b}"),
        Raw("!!omap [{a: 1}, {a: 2}]"),
        Raw("!!pairs [{a: 1}]"),
        Raw("!!float nan"),
        Raw("!!float x"),
        Raw("!!int 0x_"),
        Raw("!!str"),
        Raw("!!map [1]"),
        Raw("!custom 1"),
        Raw("!<tag:example.com,2000:x> 1"),
        Raw("1:2:3"),
        Raw("190:20:30.15"),
        Raw("0b1012"),
        Raw("0o9"),
        Raw("0x" + "f" * 5000),
        Raw("~"),
        Raw(".NaN"),
        Raw("-.inf"),
        Raw("'unterminated"),
        Raw("&self [*self]"),
        Raw("&me {k: *me}"),
        Raw("*undefined"),
        Raw("caf\udce9"),  # Latin-1, not UTF-8
        Raw("\udcff\udcfe"),
        _deep(50, "[", "]"),
        _deep(600, "[", "]"),  # beyond the recursion limit of PyYAML's composer
        _deep(600, "{a: ", "}"),
    ]
)


@st.composite
def alias_bombs(draw: st.DrawFn) -> Raw:
    """A "billion laughs" value of YAML aliases, defined inline, kept small."""
    levels = draw(st.integers(2, 8))
    width = draw(st.integers(2, 8))
    as_map = draw(st.booleans())

    def node(i: int) -> str:
        inner = "lol" if i == 0 else node(i - 1)
        refs = [f"*a{i - 1}"] * (width - 1) if i else ["lol"] * (width - 1)
        items = [inner, *refs]
        if as_map:
            body = ", ".join(f"k{j}: {it}" for j, it in enumerate(items))
            return f"&a{i} {{{body}}}"
        return f"&a{i} [{', '.join(items)}]"

    return Raw(node(levels - 1))


#: every key of the config models, so structured documents hit real fields
CONFIG_KEYS = sorted(
    {
        name
        for model in (
            InstrumentConfig,
            ChannelSettings,
            StageLimits,
            CameraSettings,
            SimulationSettings,
            FocusSettings,
            LoaderSettings,
            AssayConfig,
            Indication,
            DetectionSettings,
            CartridgeLayout,
            HolderConfig,
            HolderCartridge,
        )
        for name in model.model_fields
    }
)
KEYS = st.sampled_from(CONFIG_KEYS) | TEXTS | INTS

YAML_VALUES = st.recursive(
    SCALARS | YAML_RAW | alias_bombs(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
    max_leaves=12,
)


def encode(text: str) -> bytes:
    """UTF-8 of `text`; the escapes U+DC80..U+DCFF become the bytes 0x80..0xFF
    that are no UTF-8 (``"caf\\udce9"`` is Latin-1 ``café``)."""
    return text.encode("utf-8", "surrogateescape")


def to_yaml(value: Any) -> str:
    """Flow-style YAML of `value` (`Raw` fragments verbatim)."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    if isinstance(value, dict):
        items = (f"{to_yaml(k)}: {to_yaml(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return "[" + ", ".join(to_yaml(v) for v in value) + "]"


def to_json(value: Any) -> str:
    """JSON of `value` (NaN and inf as Python writes them, `Raw` verbatim)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {to_json(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


YAML_TOKENS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b": ",
        b", ",
        b"- ",
        b"\n",
        b"\n  ",
        b"\t",
        b"? ",
        b"&a ",
        b"*a",
        b"<<: ",
        b"!!python/object:os.system ",
        b"!!binary ",
        b"!!timestamp ",
        b"!!int ",
        b"2001-13-01",
        b"9" * 4301,
        b".nan",
        b"-.inf",
        b"'",
        b'"',
        b"\\",
        b"\\x",
        b"# ",
        b"---\n",
        b"...\n",
        b"%YAML 1.1\n",
        b"%TAG ! tag:x,2000:\n",
        b"|\n",
        b">-\n",
        b"\xff",
        b"\xef\xbb\xbf",
        b"\x00",
        b"\xc3\x28",
        b"channels",
        b"name",
        b"focus",
        b"rows",
        b"cartridges",
        b"micromanager_config",
    ]
)
TOKEN_SOUP = st.lists(YAML_TOKENS | st.binary(max_size=8), max_size=40).map(b"".join)


# ---------------------------------------------------------------- 1. config YAML


def _load_instrument(path: Path) -> InstrumentConfig:
    return InstrumentConfig.from_file(path)


def _load_assay(path: Path) -> AssayConfig:
    return AssayConfig.from_file(path)


def _load_layout(path: Path) -> CartridgeLayout:
    return get_layout(str(path))


def _load_holder(path: Path) -> HolderConfig:
    return HolderConfig.from_file(path)


YAML_PARSERS: dict[str, tuple[Callable[[Path], Any], type[BaseModel]]] = {
    "instrument": (_load_instrument, InstrumentConfig),
    "assay": (_load_assay, AssayConfig),
    "layout": (_load_layout, CartridgeLayout),
    "holder": (_load_holder, HolderConfig),
}

LAYOUT_BASE: dict[str, Any] = {
    "name": "hostile-2x3",
    "rows": 2,
    "cols": 3,
    "center_x_um": 100.0,
    "center_y_um": -50.0,
    "wall_inset_um": 250.0,
    "description": "a layout file",
}
HOLDER_BASE: dict[str, Any] = {
    "cartridges": [
        {"id": "CART-A", "center_x_um": -10000.0, "center_y_um": 0.0},
        {"id": "CART-B", "center_x_um": 10000.0, "center_y_um": 0.0},
    ]
}


def _yaml_file(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


#: (parser, document) of every shipped or typical file, the seeds of mutations
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "simulated.yaml": ("instrument", _yaml_file(CONFIG_DIR / "simulated.yaml")),
    "real-scanner-template.yaml": (
        "instrument",
        _yaml_file(CONFIG_DIR / "real-scanner-template.yaml"),
    ),
    "assay-cellsearch.yaml": (
        "assay",
        _yaml_file(CONFIG_DIR / "assay-cellsearch.yaml"),
    ),
    "layout": ("layout", LAYOUT_BASE),
    "holder": ("holder", HOLDER_BASE),
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a document (dict keys and list indices)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the type of `value`, so that many mutations stay valid."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-2 * abs(value) - 3, 2 * abs(value) + 3) | INTS
    if isinstance(value, float):
        return st.floats(-2 * abs(value) - 1, 2 * abs(value) + 1) | FLOATS
    if isinstance(value, str):
        return st.sampled_from([value, value.upper(), value + "x", value[:1]]) | TEXTS
    return YAML_VALUES


def check_yaml(kind: str, path: Path, text: bytes) -> Any:
    """Write `text`, parse it as `kind`: a valid model or a one-line error."""
    path.write_bytes(text)
    parse, model = YAML_PARSERS[kind]
    got = result_or_error(parse, path)
    if got is not None:
        assert isinstance(got, model)
        assert_finite(got.model_dump(mode="python"))
    return got


@pytest.mark.parametrize("kind", list(YAML_PARSERS))
@settings(BASE, max_examples=150)
@given(data=st.binary(max_size=400) | TOKEN_SOUP)
@example(data=b"a: 2001-13-01\n")  # a date that is none
@example(data=b"a: " + b"9" * 4301 + b"\n")  # above the int-from-text limit
@example(data=b"[" * 600 + b"]" * 600)  # nesting beyond the recursion limit
@example(data=b'{"a\\nb": 1}')  # a line break in an unknown key
@example(data=b"a: !!timestamp x")  # tagged values that do not fit their tag
@example(data=b"a: !!bool x")
@example(data=b"a: !!int ''")
@example(data=b"a: !!int 0x_")
def test_yaml_bytes(workdir: Path, kind: str, data: bytes) -> None:
    check_yaml(kind, workdir / f"bytes-{kind}.yaml", data)


@pytest.mark.parametrize("kind", list(YAML_PARSERS))
@settings(BASE, max_examples=75)
@given(
    doc=st.dictionaries(KEYS, YAML_VALUES, max_size=6)
    | YAML_VALUES
    | alias_bombs().map(lambda b: {"world": b})
)
@example(doc={"channels": {"a\nb": "x"}})  # a line break in a key of a dict field
@example(doc={"indication": "x", "indications": [{"name": "a\nb", "cutoff": 1}]})
@example(  # YAML escapes "\ud800\udc00" give lone surrogates, quoted by a check
    doc={"indication": "x", "indications": [{"name": "\U00010000", "cutoff": 1}]}
)
def test_yaml_structured(workdir: Path, kind: str, doc: Any) -> None:
    check_yaml(
        kind,
        workdir / f"doc-{kind}.yaml",
        encode(to_yaml(doc)),
    )


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A shipped (or typical) file with one value replaced by a random one."""
    name = draw(st.sampled_from(sorted(BASES)))
    kind, doc = BASES[name]
    path = draw(st.sampled_from(sorted(_paths(doc), key=repr)))
    old = _get(doc, path)
    value = draw(_like(old) | st.just(DELETE) | SCALARS | YAML_RAW | YAML_VALUES)
    text = to_yaml(_replace(doc, path, value))
    return name, kind, encode(text)


@settings(BASE, max_examples=300)
@given(case=mutations())
@example(  # a non-numeric slot key of the loader's magazine, with a line break
    case=(
        "simulated.yaml",
        "instrument",
        to_yaml(
            _replace(BASES["simulated.yaml"][1], ("loader", "slots"), {"a\nb": 1})
        ).encode(),
    )
)
def test_yaml_mutated(workdir: Path, case: tuple[str, str, bytes]) -> None:
    name, kind, text = case
    check_yaml(kind, workdir / f"mutated-{name}", text)


@pytest.mark.parametrize("name", sorted(BASES))
def test_unmutated_bases_load(workdir: Path, name: str) -> None:
    """The mutation seeds, written by `to_yaml`, load as the original does."""
    kind, doc = BASES[name]
    got = check_yaml(kind, workdir / f"base-{name}", to_yaml(doc).encode())
    assert got is not None
    if name.endswith(".yaml"):
        parse, _ = YAML_PARSERS[kind]
        original = parse(CONFIG_DIR / name)
        skip = {"micromanager_config"}  # resolved against each file's folder
        assert got.model_dump(exclude=skip) == original.model_dump(exclude=skip)


@settings(BASE, max_examples=150)
@given(
    name=TEXTS
    | st.text(max_size=30).map(lambda s: s + ".yaml")
    | st.integers(200, 5000).map(lambda n: "a" * n)
    | st.integers(200, 5000).map(lambda n: "a" * n + ".yml")
    | st.sampled_from(sorted(LAYOUTS))
)
@example(name="a" * 5000)  # a name too long for the file system
@example(name="x\x00.yaml")  # an embedded NUL
@example(name="x\n.yaml")  # a line break in the file name
def test_layout_names(name: str) -> None:
    got = result_or_error(get_layout, name)
    if name in LAYOUTS:
        assert got is LAYOUTS[name]
    else:
        assert got is None  # no such file in the working folder


# ---------------------------------------------------------------- 2. records, ledger

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | INTS
    | FLOATS
    | TEXTS
    | HUGE_INTS
    | st.integers(900, 5000).map(lambda n: _deep(n, "[", "]")),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(TEXTS | st.sampled_from(["x_um", "z_um"]), kids, max_size=4)
    ),
    max_leaves=10,
)
KINDS = sorted(RECORD_TYPES)


def _typed(annotation: Any) -> st.SearchStrategy[Any]:
    """JSON-able values of a field's type (models as objects), else any JSON."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = annotation.model_fields.items()
        return st.fixed_dictionaries(
            {}, optional={k: _typed(f.annotation) for k, f in fields}
        )
    if _mentions_any(annotation):
        return JSON_VALUES
    return st.from_type(annotation)


def _mentions_any(annotation: Any) -> bool:
    return annotation is Any or any(
        _mentions_any(a) for a in typing.get_args(annotation)
    )


@st.composite
def record_objects(draw: st.DrawFn) -> tuple[str, bytes]:
    """A JSON object of a known kind whose fields take values of their type or
    random ones, some fields missing, some unknown ones added."""
    kind = draw(st.sampled_from(KINDS))
    model = RECORD_TYPES[kind].model_fields
    typed_only = draw(st.booleans())  # half the objects: no value of a wrong type
    values = {
        name: _typed(f.annotation) if typed_only else _typed(f.annotation) | JSON_VALUES
        for name, f in model.items()
        if name != "event"
    }
    required = {k for k, f in model.items() if f.is_required()} if typed_only else ()
    fields = draw(
        st.fixed_dictionaries(
            {k: v for k, v in values.items() if k in required},
            optional={k: v for k, v in values.items() if k not in required},
        )
    )
    extra = draw(st.dictionaries(TEXTS, JSON_VALUES, max_size=2))
    event = kind if typed_only else draw(st.just(kind) | JSON_VALUES)
    obj = {**extra, **fields, "event": Raw(to_json(event))}
    return kind, encode(to_json(obj))


@settings(BASE, max_examples=200)
@given(line=st.binary(max_size=300))
@example(line=b"[" * 100_000)  # nesting beyond the recursion limit
@example(line=b"9" * 4301)  # above the int-from-text limit
@example(line=b'{"event": []}')  # an unhashable kind
@example(line=b'{"event": {"a": 1}}')
def test_parse_line_bytes(line: bytes) -> None:
    got = result_or_error(parse_line, line)
    assert got is None or isinstance(got, Record)


@settings(BASE, max_examples=200)
@given(case=record_objects())
@example(  # a line break in a key of a dict field
    case=(
        "stored",
        b'{"event": "stored", "field": "f", "file": "f", "sha256": "0", '
        b'"bytes": 1, "stage": {"a\\nb": "x"}}',
    )
)
@example(case=("started", b'{"event": "started", "v": ' + b"9" * 4400 + b"}"))
@example(  # valid, but nested deeper than pydantic writes
    case=(
        "loader",
        b'{"event": "loader", "identity": ' + b"[" * 300 + b"]" * 300 + b"}",
    )
)
@example(case=("failed", b'{"event": "failed", "field": "\\udcff", "reason": ""}'))
def test_parse_line_records(case: tuple[str, bytes]) -> None:
    kind, line = case
    got = result_or_error(parse_line, line)
    if got is None:
        return
    assert type(got) is RECORD_TYPES[kind]
    assert got.v <= SCHEMA_VERSION
    if b"NaN" in line or b"Infinity" in line:  # JSON has neither: written as null
        return
    try:
        again = dump_line(got)  # a record read can be written again...
    except PydanticSerializationError as e:
        # ...unless a free-form field (identity, focus) nests deeper than the
        # 255 levels pydantic writes, or a string holds a lone surrogate (the
        # JSON escape "\udcff"), which UTF-8 cannot hold; nothing rewrites a
        # record it has read
        assert "depth exceeded" in str(e) or "surrogates not allowed" in str(e)
        return
    assert parse_line(again) == got


GOOD_LINES = [
    dump_line(Started(cartridge_id="CART-1", planned=12)).encode(),
    dump_line(
        Stored(field="field_000", file="f.ome.tif", sha256="0" * 64, bytes=9)
    ).encode(),
]


@settings(BASE, max_examples=150)
@given(
    parts=st.lists(
        st.sampled_from(range(len(GOOD_LINES))) | st.binary(max_size=60), max_size=12
    ),
    torn=st.booleans(),
)
@example(parts=[0, b'{"event": []}', 1, b"[" * 5000], torn=False)
def test_ledger_read(workdir: Path, parts: list[int | bytes], torn: bool) -> None:
    raw = b"\n".join(
        GOOD_LINES[p].rstrip(b"\n") if isinstance(p, int) else p for p in parts
    )
    if not torn and raw:
        raw += b"\n"
    path = workdir / "ledger.jsonl"
    path.write_bytes(raw)
    ledger = Ledger(path)
    records = bounded(ledger.read)  # a StorageError here would fail the test
    lines = [line for line in raw.split(b"\n")[:-1] if line.strip()]
    assert len(records) + len(ledger.skipped) == len(lines)
    for msg in ledger.skipped:
        assert len(msg.splitlines()) == 1, msg
    # every whole good line is read back, in order, whatever lies around it
    whole = parts if not torn else parts[:-1]
    wanted = [parse_line(GOOD_LINES[p]) for p in whole if isinstance(p, int)]
    it = iter(records)
    assert all(any(r == w for r in it) for w in wanted)


@settings(BASE, max_examples=150)
@given(raw=st.binary(max_size=2000))
def test_ledger_read_bytes(workdir: Path, raw: bytes) -> None:
    path = workdir / "ledger-bytes.jsonl"
    path.write_bytes(raw)
    ledger = Ledger(path)
    records = result_or_error(ledger.read)
    assert records is not None  # only an unreadable file may raise
    assert all(isinstance(r, Record) for r in records)
    assert all(len(m.splitlines()) == 1 for m in ledger.skipped)


# ---------------------------------------------------------------- 3. loader replies

REPLY_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("*"))
WORDS = st.sampled_from(
    [
        "IDLE",
        "BUSY",
        "FAULT",
        "idle",
        "-",
        "0",
        "3",
        "08",
        "-5",
        "+1",
        "1_0",
        "99999999999",
        "9" * 40,
        "1=CS-0001",
        "2=-",
        "1=",
        "=",
        "a=b=c",
        "",
    ]
) | st.text(alphabet=REPLY_CHARS.replace(" ", ""), max_size=12)
#: replies whose checksum is right and whose content is anything
FRAMED = st.builds(
    lambda status, words: frame(" ".join([status, *words])),
    st.sampled_from(["OK", "ER"]),
    st.lists(WORDS, max_size=6),
) | st.builds(
    lambda status, text: frame(status + text),
    st.sampled_from(["OK", "ER", "OK ", "ER "]),
    st.text(alphabet=REPLY_CHARS, max_size=110),
)
REPLIES = FRAMED | st.binary(max_size=140).map(lambda b: b + b"\r\n")


def _parse_reply(raw: bytes) -> list[str]:
    return CartridgeLoader("unused")._parse(raw, "STAT?")


@settings(BASE, max_examples=300)
@given(raw=st.binary(max_size=200) | FRAMED)
@example(raw=frame("ER 5"))  # an error reply without text
@example(raw=frame("ER x JAM"))
def test_loader_reply_parser(raw: bytes) -> None:
    got = result_or_error(_parse_reply, raw, errors=(_Corrupt, LoaderError))
    if got is not None:
        assert raw.endswith(b"\r\n") and raw.startswith(b"OK")
        assert all(isinstance(f, str) and " " not in f for f in got)


class ReplyScript:
    """The far side of a pseudo-terminal: answers each command with a set reply."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.replies: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.02)
            if not ready:
                continue
            try:
                buf += os.read(self.master, 256)
            except OSError:
                return
            while b"\r" in buf:
                line, buf = buf.split(b"\r", 1)
                reply = self.replies.get(line.decode("ascii", "replace"), b"")
                os.write(self.master, reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.master)
        os.close(self._slave)


#: how long the port waits for a reply line: replies here come at once, and
#: every one ends in CR LF, so only a stalled machine waits this long
PORT_TIMEOUT_S = 2.0


def _open_port(url: str, **kwargs: Any) -> serial.Serial:
    return serial.serial_for_url(url, **{**kwargs, "timeout": PORT_TIMEOUT_S})


@pytest.fixture(scope="module")
def pty_loader() -> Iterator[tuple[ReplyScript, CartridgeLoader]]:
    script = ReplyScript()
    # timeout_s only sets the pause after a bad reply here (see _open_port)
    loader = CartridgeLoader(
        script.port, timeout_s=0.005, retries=0, reconnect_s=0.5, open_port=_open_port
    )
    with loader:
        yield script, loader
    script.close()


#: what a reply must give: a value, a LoaderError (REFUSED), or anything valid
REFUSED = object()
ANY = object()
BARCODES = st.from_regex(r"[A-Za-z0-9_.\-]{1,32}", fullmatch=True)


#: a quick reply that means nothing (an empty one would wait for the timeout)
NOISE = b"?\r\n"


def _garbage(reply: bytes) -> tuple[object, bytes]:
    return ANY, reply


@st.composite
def status_replies(draw: st.DrawFn) -> tuple[object, bytes]:
    """A framed STAT? reply of three fields and the status it stands for."""
    fields = [
        draw(st.sampled_from(["IDLE", "BUSY", "FAULT"])),
        draw(st.just("-") | st.integers(0, 99).map(str)),
        draw(st.integers(0, 99).map(lambda c: f"{c:02d}")),
    ]
    spoilt = draw(st.integers(0, 3))  # the field replaced by a random word; 3: none
    if spoilt < 3:
        fields[spoilt] = draw(WORDS)
    state, slot, code = fields
    valid = (
        state in ("IDLE", "BUSY", "FAULT")
        and (slot == "-" or slot.isdigit())
        and code.isdigit()
    )
    want = (
        LoaderStatus(state, None if slot == "-" else int(slot), int(code))
        if valid
        else REFUSED
    )
    return want, frame(f"OK {state} {slot} {code}")


@st.composite
def inventory_replies(draw: st.DrawFn) -> tuple[object, bytes]:
    """A framed INV? reply, whole or with a cell dropped, repeated or added."""
    n = draw(st.integers(0, 8))
    cells = {i: draw(st.none() | BARCODES) for i in range(1, n + 1)}
    words = [f"{i}={'-' if bc is None else bc}" for i, bc in cells.items()]
    want: object = cells
    change = draw(st.sampled_from(["none", "drop", "repeat", "word"]))
    if change == "drop" and words:
        del words[draw(st.integers(0, len(words) - 1))]
        want = REFUSED
    elif change == "repeat" and words:
        words.append(f"{draw(st.integers(1, n))}={draw(BARCODES)}")
        want = REFUSED
    elif change == "word":
        words.insert(draw(st.integers(0, len(words))), draw(WORDS))
        want = ANY
    return want, frame(" ".join(["OK", str(n), *words]))


def _barcode_reply(bc: str) -> tuple[object, bytes]:
    return bc, frame(f"OK {bc}")


@settings(BASE, max_examples=80, deadline=10_000)
@given(
    stat=status_replies() | REPLIES.map(_garbage),
    inv=inventory_replies() | REPLIES.map(_garbage),
    ident=REPLIES,
    bc=BARCODES.map(_barcode_reply) | REPLIES.map(_garbage),
)
@example(  # a slot that is no number
    stat=(REFUSED, frame("OK IDLE x 0")), inv=(ANY, NOISE), ident=NOISE, bc=(ANY, NOISE)
)
@example(  # a slot count of 1e11
    stat=(ANY, NOISE),
    inv=(REFUSED, frame("OK 99999999999 1=A")),
    ident=NOISE,
    bc=(ANY, NOISE),
)
@example(  # a slot count beyond 64 bits
    stat=(ANY, NOISE),
    inv=(REFUSED, frame("OK " + "9" * 40)),
    ident=frame("OK CTL8 1.0 42"),
    bc=(ANY, NOISE),
)
@example(  # a slot listed twice
    stat=(ANY, NOISE),
    inv=(REFUSED, frame("OK 1 1=A 1=B")),
    ident=NOISE,
    bc=(ANY, NOISE),
)
def test_loader_over_pty(
    pty_loader: tuple[ReplyScript, CartridgeLoader],
    stat: tuple[object, bytes],
    inv: tuple[object, bytes],
    ident: bytes,
    bc: tuple[object, bytes],
) -> None:
    script, loader = pty_loader
    script.replies = {"STAT?": stat[1], "INV?": inv[1], "ID?": ident, "BC?": bc[1]}

    status = result_or_error(loader.status)
    inventory = result_or_error(loader.inventory)
    identity = result_or_error(loader.identify)
    barcode = result_or_error(loader.barcode)

    for (want, _), got in ((stat, status), (inv, inventory), (bc, barcode)):
        if want is REFUSED:
            assert got is None
        elif want is not ANY:
            assert got == want
    if status is not None:
        assert status.state in ("IDLE", "BUSY", "FAULT")
        assert (status.slot is None or status.slot >= 0) and status.code >= 0
    if inventory is not None:
        assert sorted(inventory) == list(range(1, len(inventory) + 1))
        assert all(v is None or isinstance(v, str) for v in inventory.values())
    if identity is not None:
        assert identity.isprintable()
    if barcode is not None:
        assert barcode.isprintable() and " " not in barcode


def test_loader_fault_reply_is_a_loader_fault(
    pty_loader: tuple[ReplyScript, CartridgeLoader],
) -> None:
    script, loader = pty_loader
    script.replies = {"BC?": frame("ER 07 NO-CARTRIDGE")}
    with pytest.raises(LoaderFault, match="NO-CARTRIDGE"):
        loader.barcode()


# ---------------------------------------------------------------- 4. field files

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def _ome_tiff(data: np.ndarray, description: str | None = None) -> bytes:
    """A small OME-TIFF of `data` (axes CYX); `description` replaces its OME-XML."""
    buf = io.BytesIO()
    if description is None:
        tifffile.imwrite(
            buf,
            data,
            ome=True,
            photometric="minisblack",
            metadata={
                "axes": "CYX",
                "Channel": {"Name": ["DAPI", "PE"][: data.shape[0]]},
                "PhysicalSizeX": 0.64,
                "PhysicalSizeXUnit": "µm",
                "Plane": {"PositionX": [1.5] * data.shape[0]},
            },
        )
    else:
        tifffile.imwrite(
            buf,
            data,
            photometric="minisblack",
            description=encode(description),
            metadata=None,
        )
    return buf.getvalue()


#: two channels of 64 x 64: no smaller than a field the analysis accepts
BASE_PIXELS = (np.arange(2 * 64 * 64) % 4096).astype(np.uint16).reshape(2, 64, 64)
BASE_TIFF = _ome_tiff(BASE_PIXELS)
with tifffile.TiffFile(io.BytesIO(BASE_TIFF)) as _tif:
    BASE_XML: str = _tif.ome_metadata or ""

OME_ATTRS = [
    "SizeC",
    "SizeX",
    "SizeY",
    "SizeZ",
    "Type",
    "DimensionOrder",
    "PhysicalSizeX",
    "PhysicalSizeXUnit",
    "Name",
    "SamplesPerPixel",
    "IFD",
    "PlaneCount",
    "PositionX",
    "TheC",
    "SignificantBits",
]
NUMBERS = (
    st.sampled_from(
        [
            "0",
            "-1",
            "-0.64",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "1e-400",
            "1e308",
            "9" * 5000,
            "0x10",
            "",
            " 1 ",
            "1,5",
            "uint8",
            "float64",
            "bit",
            "XYZCT",
            "CZYXT",
            "nm",
            "mm",
            "pc",
        ]
    )
    | st.floats().map(repr)
    | st.integers(-(10**6), 10**12).map(str)
)
ATTR_VALUES = NUMBERS | TEXTS


@st.composite
def attribute_mutations(draw: st.DrawFn) -> str:
    """The real OME-XML with one attribute's value replaced."""
    attr = draw(st.sampled_from(OME_ATTRS))
    hits = list(re.finditer(rf'\b{attr}="[^"]*"', BASE_XML))
    if not hits:
        return BASE_XML
    m = draw(st.sampled_from(hits))
    value = quoteattr(draw(ATTR_VALUES))
    return BASE_XML[: m.start()] + f"{attr}={value}" + BASE_XML[m.end() :]


@st.composite
def channel_removals(draw: st.DrawFn) -> str:
    """The real OME-XML with some Channel (or Plane) elements removed."""
    tag = draw(st.sampled_from(["Channel", "Plane", "TiffData"]))
    pattern = rf"<{tag}\b[^>]*/>|<{tag}\b[^>]*>.*?</{tag}>"
    hits = list(re.finditer(pattern, BASE_XML))
    keep = draw(st.lists(st.booleans(), min_size=len(hits), max_size=len(hits)))
    out, pos = [], 0
    for m, k in zip(hits, keep, strict=True):
        out.append(BASE_XML[pos : m.start()] + (m.group() if k else ""))
        pos = m.end()
    return "".join(out) + BASE_XML[pos:]


#: an element: (tag, attributes, children)
Element = tuple[str, dict[str, str], list[Any]]
ELEMENTS: st.SearchStrategy[Element] = st.recursive(
    st.builds(
        lambda tag, attrs: (tag, attrs, []),
        st.sampled_from(
            ["Image", "Pixels", "Channel", "Plane", "TiffData", "ModuloAlongZ", "Foo"]
        ),
        st.dictionaries(
            st.sampled_from(
                [*OME_ATTRS, "NumPlanes", "FirstC", "FirstZ", "Start", "End", "Step"]
            ),
            ATTR_VALUES,
            max_size=4,
        ),
    ),
    lambda kids: st.builds(
        lambda parent, children: (parent[0], parent[1], children),
        kids,
        st.lists(kids, max_size=3),
    ),
    max_leaves=8,
)


def _element_xml(el: Element) -> str:
    tag, attrs, children = el
    a = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    return f"<{tag}{a}>" + "".join(_element_xml(c) for c in children) + f"</{tag}>"


def _entity_bomb(levels: int, width: int) -> str:
    ents = ['<!ENTITY e0 "lol">'] + [
        f'<!ENTITY e{i} "{f"&e{i - 1};" * width}">' for i in range(1, levels)
    ]
    return (
        f'<?xml version="1.0"?><!DOCTYPE OME [{"".join(ents)}]>'
        f'<OME xmlns="{OME_NS}"><Image><Pixels PhysicalSizeX="1">'
        f'<Channel Name="&e{levels - 1};"/></Pixels></Image></OME>'
    )


OME_XML = st.one_of(
    attribute_mutations(),
    channel_removals(),
    st.lists(ELEMENTS, max_size=3).map(
        lambda els: (
            f'<?xml version="1.0"?><OME xmlns="{OME_NS}">'
            + "".join(_element_xml(e) for e in els)
            + "</OME>"
        )
    ),
    st.text(max_size=80).map(lambda t: f"<?xml {t}OME>"),
    st.just(""),  # no OME metadata at all
    st.builds(_entity_bomb, st.integers(2, 5), st.integers(2, 10)),
)
PIXELS = st.builds(
    lambda shape, dtype: np.ones(shape, dtype),
    st.sampled_from(
        [(2, 64, 64), (1, 64, 65), (64, 64), (3, 2, 2), (2, 2, 3, 3), (6, 5), (4, 1)]
    ),
    st.sampled_from(["uint8", "uint16", "int16", "int32", "float32", "float64"]),
)


#: a modulo axis of 10^8 labels, which tifffile builds with numpy.arange
MODULO_BOMB = (
    '<StructuredAnnotations><XMLAnnotation ID="Annotation:0" '
    'Namespace="openmicroscopy.org/omero/dimension/modulo"><Value>'
    '<Modulo namespace="http://www.openmicroscopy.org/Schemas/Additions/2011-09">'
    '<ModuloAlongC Type="lifetime" Start="0" End="100000000" Step="1"/>'
    "</Modulo></Value></XMLAnnotation></StructuredAnnotations>"
)


def check_field_file(path: Path, content: bytes, required: tuple[str, ...]) -> None:
    path.write_bytes(content)
    meta: FieldFile | None = result_or_error(
        inspect_field_file, path, required=required
    )
    full: FieldFile | None = result_or_error(read_field_file, path, required=required)
    for ff in (meta, full):
        if ff is None:
            continue
        assert ff.channel_names and all(isinstance(n, str) for n in ff.channel_names)
        assert set(required) <= set(ff.channel_names)
        px = ff.pixel_size_um
        assert px is None or (math.isfinite(px) and 0 < px < 1000), px
        assert set(ff.stage) <= {"x_um", "y_um", "z_um"}
        assert all(math.isfinite(v) for v in ff.stage.values()), ff.stage
        bits = ff.significant_bits
        assert bits is None or 1 <= bits < ff.data.dtype.itemsize * 8, bits
    if full is not None:
        assert full.data.ndim == 3
        assert full.data.shape[0] == len(full.channel_names)
        if meta is not None:
            assert meta.channel_names == full.channel_names
            assert meta.data.dtype == full.data.dtype


@settings(BASE, max_examples=200)
@given(
    content=st.binary(max_size=600)
    | st.builds(
        bytes.__add__,
        st.sampled_from([b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"]),
        st.binary(max_size=600),
    ),
    required=st.sampled_from([(), ("DAPI",)]),
)
@example(content=b"", required=())
def test_field_file_bytes(
    workdir: Path, content: bytes, required: tuple[str, ...]
) -> None:
    check_field_file(workdir / "bytes.ome.tif", content, required)


@settings(BASE, max_examples=150)
@given(
    xml=OME_XML,
    pixels=st.just(BASE_PIXELS) | PIXELS,
    required=st.sampled_from([(), ("DAPI",)]),
)
@example(  # a pixel size that is no number
    xml=BASE_XML.replace('PhysicalSizeX="0.64"', 'PhysicalSizeX="abc"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(  # a negative pixel size
    xml=BASE_XML.replace('PhysicalSizeX="0.64"', 'PhysicalSizeX="-1"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(  # a NaN pixel size
    xml=BASE_XML.replace('PhysicalSizeX="0.64"', 'PhysicalSizeX="NaN"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(  # a stage position that is no number
    xml=BASE_XML.replace('PositionX="1.5"', 'PositionX="x"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(  # a line break in a channel name, and the channel asked for missing
    xml=BASE_XML.replace('Name="DAPI"', 'Name="DA&#10;PI"'),
    pixels=BASE_PIXELS,
    required=("DAPI",),
)
@example(  # planes that tifffile would list one by one: seconds and gigabytes
    xml=BASE_XML.replace('SizeC="2"', 'SizeC="100000000"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(  # a plane of 10^10 x 64 pixels: 3 x 10^8 missing pages of 64 x 64
    xml=BASE_XML.replace('SizeY="64"', 'SizeY="10000000000"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(
    xml=BASE_XML.replace('PlaneCount="2"', 'PlaneCount="1000000000"'),
    pixels=BASE_PIXELS,
    required=(),
)
@example(
    xml=BASE_XML.replace("</OME>", MODULO_BOMB + "</OME>"),
    pixels=BASE_PIXELS,
    required=(),
)
def test_field_file_ome_xml(
    workdir: Path, xml: str, pixels: np.ndarray, required: tuple[str, ...]
) -> None:
    check_field_file(workdir / "mutated.ome.tif", _ome_tiff(pixels, xml), required)


@pytest.mark.parametrize(
    ("value", "unit"),
    [("0.64", "µm"), ("640", "nm"), ("6.4e-7", "m"), ("6.4e-5", "cm"), ("6400", "Å")],
)
def test_a_pixel_size_is_read_in_its_unit(workdir: Path, value: str, unit: str) -> None:
    xml = re.sub(r'PhysicalSizeX="[^"]*"', f'PhysicalSizeX="{value}"', BASE_XML)
    xml = re.sub(r'PhysicalSizeXUnit="[^"]*"', f'PhysicalSizeXUnit="{unit}"', xml)
    path = workdir / "unit.ome.tif"
    path.write_bytes(_ome_tiff(BASE_PIXELS, xml))
    assert read_field_file(path).pixel_size_um == pytest.approx(0.64)


@pytest.mark.parametrize(
    ("y", "unit", "ok"),
    [
        ("0.64", "µm", True),
        ("640", "nm", True),
        ("0.7", "µm", False),
        ("0.64", "m", False),
    ],
)
def test_oblong_pixels_are_refused(workdir: Path, y: str, unit: str, ok: bool) -> None:
    xml = BASE_XML.replace(
        "<Pixels ", f'<Pixels PhysicalSizeY="{y}" PhysicalSizeYUnit="{unit}" ', 1
    )
    path = workdir / "oblong.ome.tif"
    path.write_bytes(_ome_tiff(BASE_PIXELS, xml))
    if ok:
        assert read_field_file(path).pixel_size_um == pytest.approx(0.64)
        return
    with pytest.raises(FieldReadError, match="PhysicalSize") as e:
        read_field_file(path)
    assert_one_line(e.value)


def test_a_pixel_size_in_a_unit_not_known_is_refused(workdir: Path) -> None:
    xml = re.sub(r'PhysicalSizeXUnit="[^"]*"', 'PhysicalSizeXUnit="furlong"', BASE_XML)
    path = workdir / "furlong.ome.tif"
    path.write_bytes(_ome_tiff(BASE_PIXELS, xml))
    with pytest.raises(FieldReadError, match="furlong") as e:
        read_field_file(path)
    assert_one_line(e.value)


@pytest.mark.parametrize(("bits", "saturation"), [("12", 4095.0), ("16", None)])
def test_a_field_s_bit_depth_gives_its_saturation(
    workdir: Path, bits: str, saturation: float | None
) -> None:
    xml = BASE_XML.replace("<Pixels ", f'<Pixels SignificantBits="{bits}" ', 1)
    path = workdir / "bits.ome.tif"
    path.write_bytes(_ome_tiff(BASE_PIXELS, xml))
    assert read_field_file(path).saturation == saturation


def test_field_file_base_reads(workdir: Path) -> None:
    """The unmutated seed reads back whole (so the mutations start from valid)."""
    path = workdir / "base.ome.tif"
    path.write_bytes(_ome_tiff(BASE_PIXELS, BASE_XML))
    ff = read_field_file(path, required=("DAPI", "PE"))
    assert ff.channel_names == ["DAPI", "PE"] and ff.pixel_size_um == 0.64
    assert ff.stage == {"x_um": 1.5}
    np.testing.assert_array_equal(ff.data, BASE_PIXELS)
