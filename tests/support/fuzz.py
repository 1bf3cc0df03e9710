"""Hypothesis strategies for fuzzing the API with JSON that Python's ``json.dumps`` would never
write: numbers too large for a float (``1e400``), lone surrogates (``"\\ud800"``), escaped NUL,
nesting deeper than a parser goes; besides plain wrong types, huge strings, unknown and missing
fields, and bytes that are not JSON at all.

A body is a tree of dicts, lists and scalars whose leaves (and keys) may be :class:`Raw` JSON
text, which :func:`dump` writes as it is. :func:`mutated` changes one place of a valid body and
says where (a :class:`Fuzzed`), so a test can ask that a refusal names that field.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

FUZZ = settings(
    deadline=None,
    derandomize=True,  # CI runs the same inputs every time
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each input says what it is
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""The settings of every fuzz test; each sets its own ``max_examples`` (:func:`examples`)."""


def examples(count: int, database_url: str) -> int:
    """``count`` random examples on SQLite, half on PostgreSQL: what differs there (NUL, column
    sizes) every field is sure to meet in the sweeps, and CI runs both."""
    return count if database_url.startswith("sqlite") else max(count // 2, 4)


Path = tuple[Any, ...]
"""Keys (str or :class:`Raw`) and list indexes, from the root of a body down."""


@dataclass(frozen=True)
class Raw:
    """JSON text, written as it is. ``whole``: the body parser refuses it without knowing
    where it sits (a number too large, NaN, nesting past the recursion limit), so a refusal
    may name only ``body``."""

    text: str
    whole: bool = False


def dump(value: Any) -> str:
    """The JSON text of ``value``, :class:`Raw` parts (values or keys) written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def short(value: Any) -> str:
    text = value if isinstance(value, str) else dump(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


@dataclass(frozen=True, repr=False)
class Fuzzed:
    """One generated request body: its bytes, what was done, and where (``path``: down to the
    changed value; ``()`` for a body not derived from a valid one)."""

    raw: bytes
    what: str
    path: Path = ()
    whole: bool = False

    @property
    def valid(self) -> bool:
        return self.what == "valid"

    @property
    def fields(self) -> list[str]:
        """The field names on the path: a refusal of the change names one of them."""
        return [p for p in self.path if isinstance(p, str)]

    def __str__(self) -> str:
        return f"{self.what}: {short(self.raw.decode('utf-8', 'replace'))}"

    __repr__ = __str__


# ---------------------------------------------------------------------------- values


def deep(depth: int) -> Raw:
    """A list nested ``depth`` levels deep (past about 900 the parser itself gives up)."""
    return Raw("[" * depth + "]" * depth, whole=depth >= 900)


NUMBERS = (
    Raw("1e400", whole=True),
    Raw("-1e400", whole=True),
    Raw("NaN", whole=True),
    Raw("-Infinity", whole=True),
    Raw("9" * 5000, whole=True),  # more digits than Python turns into an int
    Raw("1e-400"),
    Raw("-0"),
    Raw("-1"),
    Raw("0"),
    Raw("0.5"),
    Raw("1e2"),
    Raw("2147483648"),
    Raw("9223372036854775808"),
    Raw("-9223372036854775809"),
    Raw("123456789012345678901234567890"),
)
STRINGS = (
    Raw('"\\ud800"'),
    Raw('"x\\udfff"'),
    Raw('"\\udc80\\ud800"'),
    Raw('"\\ud83d\\ude00"'),  # a valid pair
    Raw('"a\\u0000b"'),
    Raw('"\\u0000"'),
    Raw('"\\u001f\\u007f"'),
    Raw('""'),
    Raw('" "'),
)
NESTINGS = (
    deep(63),
    deep(64),
    deep(65),
    deep(200),
    deep(5000),
    Raw('{"a":' * 100 + "1" + "}" * 100),
)


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Random JSON values, as ``json.dumps`` writes them."""
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def poison() -> st.SearchStrategy[Any]:
    """A value to put where a valid one was: a wrong type, an odd number or string, deep
    nesting, a huge string, a random JSON value."""
    return st.one_of(
        st.sampled_from(NUMBERS),
        st.sampled_from(STRINGS),
        st.sampled_from(NESTINGS),
        st.sampled_from([1_000, 70_000, 300_000]).map(lambda n: "x" * n),
        st.sampled_from([None, True, 0, -1, 1.5, "", [], {}, [1, 2], {"a": 1}, "x\x00y"]),
        json_values(6),
    )


KEYS = (  # near misses, and fields of other kinds of request and other routes
    "webhook_url",
    "webhook_idd",
    "webhok_url",
    "prompt",
    "messages",
    "input",
    "stream",
    "requests",
    "custom_id",
    "metadata",
    "model",
    "id",
    "url",
)


def unknown_keys() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(KEYS),
        st.text(string.ascii_letters + "_", min_size=1, max_size=12),
        st.text(max_size=8),
        st.sampled_from([Raw('"\\ud800"'), Raw('"k\\u0000"'), "k" * 5000]),
    )


# ---------------------------------------------------------------------------- mutations


def _walk(value: Any, here: Path = ()) -> list[tuple[Path, Any]]:
    """Every (path, value) in ``value``, the root first."""
    out: list[tuple[Path, Any]] = [(here, value)]
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            out.extend(_walk(v, (*here, k)))
    return out


def _at(value: Any, path: Path) -> Any:
    for p in path:
        value = value[p]
    return value


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _whole(value: Any) -> bool:
    return any(isinstance(v, Raw) and v.whole for _, v in _walk(value))


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Fuzzed:
    """``base`` with one place changed: a value replaced, a key removed or added, a list
    emptied or grown past any limit, or a string tainted with an escaped NUL or a lone
    surrogate."""
    body = _copy(base)
    places = _walk(body)
    op = draw(st.sampled_from(["replace", "replace", "remove", "add", "resize", "taint", "taint"]))
    texts = [p for p, v in places if p and isinstance(v, str)]
    if op == "taint" and texts:
        path = draw(st.sampled_from(texts))
        escape = draw(st.sampled_from(["\\u0000", "\\ud800", "\\udfff", "\\u0000\\ud83d"]))
        value = Raw(json.dumps(_at(body, path))[:-1] + escape + '"')
        _at(body, path[:-1])[path[-1]] = value
        return Fuzzed(dump(body).encode(), f"taint {list(path)} with {escape}", path)
    if op == "replace" and len(places) > 1:
        path = draw(st.sampled_from([p for p, _ in places[1:]]))
        value = draw(poison())
        _at(body, path[:-1])[path[-1]] = value
        what = f"replace {list(path)} with {short(value)}"
        return Fuzzed(dump(body).encode(), what, path, _whole(value))
    keyed = [p for p, _ in places if p and isinstance(p[-1], str)]
    if op == "remove" and keyed:
        path = draw(st.sampled_from(keyed))
        del _at(body, path[:-1])[path[-1]]
        return Fuzzed(dump(body).encode(), f"remove {list(path)}", path)
    lists = [p for p, v in places if isinstance(v, list) and v]
    if op == "resize" and lists:
        path = draw(st.sampled_from(lists))
        items = _at(body, path)
        size = draw(st.sampled_from([0, 5, 51]))
        items[:] = [_copy(items[i % len(items)]) for i in range(size)]
        return Fuzzed(dump(body).encode(), f"resize {list(path)} to {size}", path)
    path = draw(st.sampled_from([p for p, v in places if isinstance(v, dict)]))
    key = draw(unknown_keys())
    value = draw(st.one_of(json_values(4), poison()))
    _at(body, path)[key] = value
    where = (*path, key)
    what = f"add {[short(p) for p in where]} = {short(value)}"
    return Fuzzed(dump(body).encode(), what, where, _whole(value))


GARBAGE = (
    b"",
    b" ",
    b"{",
    b'{"model": ',
    b"[]",
    b"null",
    b"0",
    b'"text"',
    b"\xef\xbb\xbf{}",  # a byte order mark
    b"\xff\xfe{\x00}\x00",
    b'{"a": 1}{"b": 2}',
    b"{'single': 'quotes'}",
    b'{"a": 1,}',
    b'{"\\ud800": 1}',
    b'{"a": "\\x00"}',
    b"\x00",
    b"\xed\xa0\x80",  # a surrogate written in UTF-8
)


def bodies(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Fuzzed]:
    """What a JSON route is sent: valid bodies, valid bodies with one place changed, random
    JSON, and bytes that are not JSON."""
    changed = valid.flatmap(mutated)
    return st.one_of(
        valid.map(lambda b: Fuzzed(dump(b).encode(), "valid")),
        changed,
        changed,
        changed,
        changed,
        json_values().map(lambda v: Fuzzed(dump(v).encode(), f"random {short(v)}")),
        st.sampled_from(GARBAGE).map(lambda b: Fuzzed(b, f"garbage {b!r}", whole=True)),
        st.binary(max_size=40).map(lambda b: Fuzzed(b, f"bytes {b!r}", whole=True)),
    )


def junk() -> st.SearchStrategy[Fuzzed]:
    """A body for a route that reads none."""
    return st.one_of(
        st.just(Fuzzed(b"", "no body")),
        json_values().map(lambda v: Fuzzed(dump(v).encode(), f"random {short(v)}")),
        st.sampled_from(GARBAGE).map(lambda b: Fuzzed(b, f"garbage {b!r}", whole=True)),
    )


def path_ids() -> st.SearchStrategy[str | None]:
    """An id for a route's path: ``None`` for an object that exists (the test picks it), or
    something that names nothing."""
    return st.one_of(
        st.none(),
        st.none(),
        st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=21),
        st.text(string.ascii_letters, max_size=10).map(lambda t: t + "\x00"),
        # not longer: a 404 quotes the whole id (store/*.py NotFound messages)
        st.sampled_from(["\x00", "a\x00b", "x" * 500, "..", "%", " ", "é", "msg_1", "\ufffd"]),
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
    )


def idempotency_keys() -> st.SearchStrategy[str | None]:
    """An ``Idempotency-Key`` header, mostly none."""
    return st.one_of(
        st.none(),
        st.none(),
        st.none(),
        st.text(string.printable.strip(), min_size=1, max_size=40),
        st.sampled_from(["", "k" * 256, "k" * 255]),
    )


# ---------------------------------------------------------------------------- multipart uploads

BOUNDARY = b"fuzz-7MA4YWxkTrZu0gW"
PLAIN_NAMES = st.text(string.ascii_letters + string.digits + "._- é", min_size=1, max_size=40)
ODD_NAMES = (
    b"",
    b"../../etc/passwd",
    b"C:\\temp\\in.jsonl",
    b"a\x00b.jsonl",
    b"\x1b[31mred\x7f",
    b"\xff\xfe.jsonl",
    b"\xed\xa0\x80.jsonl",
    "é".encode() * 300,
    b"x" * 1000,
    b'a\\"b',
)
PURPOSES = (
    b"",
    b"batch_output",
    b"fine-tune",
    b"BATCH",
    b"batch\x00",
    b"\xed\xa0\x80",
    b"x" * 70_000,
)


@dataclass(frozen=True, repr=False)
class Upload:
    """A multipart body for ``POST /v1/files``; ``content`` is the file's bytes when the form is
    well formed, with one file, a plain file name and purpose ``batch`` (it must be accepted)."""

    body: bytes
    content_type: str | None
    what: str
    content: bytes | None

    def __repr__(self) -> str:
        return f"Upload({self.what}, {len(self.body)} bytes)"


def _part(name: bytes, value: bytes, filename: bytes | None = None) -> bytes:
    disposition = b'form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    head = b"Content-Disposition: " + disposition + b"\r\n"
    if filename is not None:
        head += b"Content-Type: application/jsonl\r\n"
    return b"--" + BOUNDARY + b"\r\n" + head + b"\r\n" + value + b"\r\n"


@st.composite
def uploads(draw: st.DrawFn) -> Upload:
    """Forms with or without a file and a purpose, odd file names and purposes, extra fields,
    two files; broken bodies (cut short, another boundary, not multipart at all)."""
    purpose = draw(st.one_of(st.just(b"batch"), st.none(), st.sampled_from(PURPOSES)))
    plain = draw(st.booleans())
    name = draw(PLAIN_NAMES.map(str.encode) if plain else st.sampled_from(ODD_NAMES))
    content = draw(
        st.one_of(
            st.binary(max_size=300),
            st.lists(json_values(4), max_size=5).map(
                lambda values: "".join(dump(v) + "\n" for v in values).encode()
            ),
            st.sampled_from([b"", b"\n" * 1000, b"y" * 200_000]),
        )
    )
    files = draw(st.sampled_from([1, 1, 1, 0, 2]))
    parts = [_part(b"file", content, name) for _ in range(files)]
    if purpose is not None:
        parts.append(_part(b"purpose", purpose))
    extra_names = st.sampled_from([b"note", b"", b"purpose", b"n" * 300])
    extras = draw(st.lists(st.tuples(extra_names, st.binary(max_size=20)), max_size=2))
    parts += [_part(k, v) for k, v in extras]
    body = b"".join(draw(st.permutations(parts))) + b"--" + BOUNDARY + b"--\r\n"
    content_type: str | None = "multipart/form-data; boundary=" + BOUNDARY.decode()
    damage = draw(st.sampled_from([None, None, None, "cut", "boundary", "json", "none", "end"]))
    if damage == "cut":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    elif damage == "boundary":
        content_type = "multipart/form-data; boundary=other"
    elif damage == "json":
        content_type = "application/json"
    elif damage == "none":
        content_type = None
    elif damage == "end":
        body = body.removesuffix(b"--\r\n")
    shown = purpose.decode("utf-8", "replace") if purpose is not None else None
    what = [
        f"{files} file(s) named {short(name.decode('utf-8', 'replace'))}",
        f"purpose {short(shown) if shown is not None else None}",
        f"extra fields {[short(k.decode()) for k, _ in extras]}",
        f"damage {damage}",
    ]
    well_formed = damage is None and all(k not in (b"purpose", b"file") for k, _ in extras)
    ok = well_formed and plain and files == 1 and purpose == b"batch"
    return Upload(body, content_type, ", ".join(what), content if ok else None)


def sweep(base: Any) -> list[Fuzzed]:
    """Every place of ``base`` changed in turn, the same few ways: a string tainted with an
    escaped NUL and with a lone surrogate, a value made a list or nested too deep, a key
    removed. Deterministic: what every field of a route is sure to be sent."""
    out: list[Fuzzed] = []
    for path, value in _walk(base)[1:]:
        changes: list[tuple[str, Any]] = [("[]", []), ("nested 70 deep", deep(70))]
        if isinstance(value, str):
            for escape in ("\\u0000", "\\ud800"):
                changes.append(
                    (f"tainted with {escape}", Raw(json.dumps(value)[:-1] + escape + '"'))
                )
        for said, change in changes:
            body = _copy(base)
            _at(body, path[:-1])[path[-1]] = change
            out.append(Fuzzed(dump(body).encode(), f"sweep {list(path)} {said}", path))
        if isinstance(path[-1], str):
            body = _copy(base)
            del _at(body, path[:-1])[path[-1]]
            out.append(Fuzzed(dump(body).encode(), f"sweep {list(path)} removed", path))
    return out
