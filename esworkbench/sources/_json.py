"""JSON sources: JSON Lines and JSON arrays of events, decoded by msgspec in batches.

Each event is decoded into a struct whose ``data`` and ``metadata`` are the source's raw JSON text
(``msgspec.Raw``), so numbers keep their exact spelling. Events that do not fit the struct (bad
JSON, a field of the wrong type, an unknown field, mixed naming) are read again one by one and
checked in Python, which names the field that is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from operator import attrgetter
from typing import Annotated, Any, Final, overload
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources import _stage
from esworkbench.sources._rows import SOURCE_SCHEMA, bad_row, check_row

__all__ = ["BOM", "array_items", "decode_batches", "line_items"]

Items = tuple[int, Sequence[bytes]]
"""A batch of JSON texts of events, and the source position of the first (the rest follow it)."""

BOM: Final = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some tools put first
_CHUNK: Final = 1 << 20
_BATCH_BYTES: Final = 64 << 20  # a batch also ends at this much JSON text: large payloads
_ABSENT: Final = msgspec.Raw(b"")
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_TEXT_FIELDS: Final = ("event_id", "event_type", "aggregate_type", "aggregate_id")
_STRUCT_FIELDS: Final[list[tuple[str, Any, Any]]] = [
    *((name, str | None, None) for name in _TEXT_FIELDS),
    ("version", _Int64 | None, None),
    ("recorded_at", str | None, None),
    ("recorded_alt", str | None, None),  # "recordedAt", a second spelling of recorded_at
    ("occurred_at", str | None, None),
    ("schema_version", _Int64 | None, None),
    ("data", msgspec.Raw, _ABSENT),
    ("metadata", msgspec.Raw, _ABSENT),
    *((name, str | None, None) for name in ("correlation_id", "causation_id", "user_id")),
    ("position", msgspec.Raw, _ABSENT),  # a source's own position: only its order counts
]
_CAMEL: Final = {
    "event_id": "eventId",
    "event_type": "eventType",
    "aggregate_type": "aggregateType",
    "aggregate_id": "aggregateId",
    "recorded_at": "timestamp",
    "recorded_alt": "recordedAt",
    "occurred_at": "occurredAt",
    "schema_version": "schemaVersion",
    "correlation_id": "correlationId",
    "causation_id": "causationId",
    "user_id": "userId",
}
_OPTIONS: Final[dict[str, Any]] = {"forbid_unknown_fields": True, "gc": False}
_CamelEvent = msgspec.defstruct("_CamelEvent", _STRUCT_FIELDS, rename=_CAMEL, **_OPTIONS)
_SnakeEvent = msgspec.defstruct(
    "_SnakeEvent", _STRUCT_FIELDS, rename={"recorded_alt": "recordedAt"}, **_OPTIONS
)
_decode_camel = msgspec.json.Decoder(_CamelEvent).decode
_decode_snake = msgspec.json.Decoder(_SnakeEvent).decode
_decode_camel_lines = msgspec.json.Decoder(_CamelEvent).decode_lines
_decode_snake_lines = msgspec.json.Decoder(_SnakeEvent).decode_lines
_decode_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError)


class _Lines(Sequence[bytes]):
    """A batch of JSON Lines kept as one block of text, split into lines only when asked."""

    def __init__(self, block: memoryview, count: int, *, braced: bool) -> None:
        self.block = block
        self.braced = braced  # every line starts with "{": no blank line, no leading space
        self._count = count
        self._lines: list[bytes] | None = None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if self._lines is None:
            self._lines = bytes(self.block).split(b"\n")
        return self._lines[index]


def line_items(stream: pa.NativeFile, batch_size: int) -> Iterator[Items]:
    """Batches of the lines of JSON Lines, numbered from 1.

    Blank lines stay in the batch (so that numbers follow from places) and are dropped when they
    fail to decode: they hold no event. A batch also ends at about ``_BATCH_BYTES`` of text.
    """
    parts: list[bytes] = []  # text read and not yet given out, from offset ``at`` of the first
    at = size = 0
    ends = np.empty(0, np.int64)  # where each line ends (at its newline), from the first part
    first = 1
    chunk = stream.read(_CHUNK).removeprefix(BOM)
    while True:
        if chunk:
            found = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            ends = np.concatenate([ends, found + size])
            parts.append(chunk)
            size += len(chunk)
        elif size > (ends[-1] + 1 if len(ends) else at):  # the last line has no newline
            ends = np.append(ends, size)
        while len(ends) and (not chunk or len(ends) >= batch_size or ends[-1] - at >= _BATCH_BYTES):
            count = min(batch_size, max(1, int(np.searchsorted(ends, at + _BATCH_BYTES))))
            if len(parts) > 1:
                parts = [b"".join(parts)]
            text = parts[0]
            stop = int(ends[count - 1])
            starts = np.concatenate([[at], ends[: count - 1] + 1])
            braced = bool((np.frombuffer(text, np.uint8)[starts] == ord("{")).all())
            yield first, _Lines(memoryview(text)[at:stop], count, braced=braced)
            first += count
            at = stop + 1
            ends = ends[count:]
        if not chunk:
            break
        if at:  # what is left of the text, from its start
            parts = [b"".join(parts)[at:]]
            ends -= at
            size -= at
            at = 0
        chunk = stream.read(_CHUNK)


# One step inside an array element: text up to the next bracket outside strings, and the bracket.
_TO_BRACKET: Final = re.compile(rb'(?:[^"{}\[\]]++|"(?:[^"\\]++|\\.)*+")*+([{}\[\]])')
_SCALAR: Final = re.compile(rb'(?:[^",\]]++|"(?:[^"\\]++|\\.)*+")*+')
_BLANK: Final = re.compile(rb"[ \t\n\r]*+")


class _Buffer:
    """The unread part of a stream, read on in chunks as an element needs more text."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self.stream = stream
        self.data: bytes = stream.read(_CHUNK).removeprefix(BOM)
        self.at = 0

    def more(self) -> bool:
        chunk = self.stream.read(max(_CHUNK, len(self.data) - self.at))
        if not chunk:
            return False
        self.data = self.data[self.at :] + chunk
        self.at = 0
        return True

    def peek(self) -> bytes:
        """The next byte that is not blank (b"" at the end of the stream)."""
        while True:
            self.at = _BLANK.match(self.data, self.at).end()  # type: ignore[union-attr]
            if self.at < len(self.data):
                return self.data[self.at : self.at + 1]
            if not self.more():
                return b""


def array_items(stream: pa.NativeFile, batch_size: int) -> Iterator[Items]:
    """Batches of (element index + 1, element) of a JSON array, read with bounded memory.

    Raises:
        EsWorkbenchError: the array itself is broken (unbalanced brackets, an unterminated
            string, text after the closing bracket), so no later element can be found.
    """
    buffer = _Buffer(stream)
    if buffer.peek() != b"[":
        raise _broken(0, "it does not start with [")
    buffer.at += 1
    index = size = 0
    batch: list[bytes] = []
    done = buffer.peek() == b"]"
    buffer.at += done
    while not done:
        if not buffer.peek():
            raise _broken(index, "the file ends inside the array")
        while (end := _element_end(buffer.data, buffer.at)) is None:
            if not buffer.more():
                raise _broken(index, "the file ends inside an element")
        index += 1
        batch.append(buffer.data[buffer.at : end])
        size += end - buffer.at
        buffer.at = end
        separator = buffer.peek()
        if separator not in (b",", b"]"):
            raise _broken(index, f"{separator!r} follows it instead of , or ]")
        buffer.at += 1
        done = separator == b"]"
        if len(batch) >= batch_size or size >= _BATCH_BYTES:
            yield index - len(batch) + 1, batch
            batch, size = [], 0
    if batch:
        yield index - len(batch) + 1, batch
    if buffer.peek():
        raise _broken(index, "text follows the closing ]")


def _broken(index: int, reason: str) -> EsWorkbenchError:
    return EsWorkbenchError(
        f"the JSON array cannot be read past element {index}: {reason}. Hint: the file is not "
        "valid JSON; check it with a JSON linter, or write it as JSON Lines"
    )


def _element_end(buffer: bytes, at: int) -> int | None:
    """Where the element starting at ``at`` ends, or None if the buffer ends first."""
    if buffer[at : at + 1] not in (b"{", b"["):
        match = _SCALAR.match(buffer, at)
        end = match.end() if match else at
        return None if end == len(buffer) else at + len(buffer[at:end].rstrip())
    depth = 0
    position = at
    while True:
        match = _TO_BRACKET.match(buffer, position)
        if match is None:
            return None
        position = match.end()
        depth += 1 if match.group(1) in (b"{", b"[") else -1
        if depth == 0:
            return position


def decode_batches(
    batches: Iterator[Items], *, unit: str, zone: ZoneInfo | None
) -> Iterator[pa.Table]:
    """Turns batches of JSON events into checked tables (see :mod:`esworkbench.sources._stage`).

    While one batch is checked in DuckDB, the next is decoded.
    """
    with _stage.connect() as connection:
        jobs = (_decode(first, texts, unit, zone, connection) for first, texts in batches)
        yield from _stage.pipelined(jobs)


def _decode_block(texts: Sequence[bytes]) -> list[Any] | None:
    """All the events of a block of JSON Lines in one call, when each line starts an object
    and the block decodes as one naming (else None: read line by line).

    One event a line exactly: no line is blank, and as many events as lines means no line holds
    two (``decode_lines`` would take them apart).
    """
    if not isinstance(texts, _Lines) or not texts.braced:
        return None
    for decode in (_decode_camel_lines, _decode_snake_lines):
        try:
            events = decode(texts.block)
        except _DECODE_ERRORS:
            continue
        return events if len(events) == len(texts) else None
    return None


def _decode(
    first: int, texts: Sequence[bytes], unit: str, zone: ZoneInfo | None, connection: Any
) -> Callable[[], pa.Table]:
    """Decodes a batch; returns the rest of the work, to run in the checking thread."""
    try:
        events = _decode_block(texts)
        if events is None:
            events = [_decode_camel(text) for text in texts]
        fast = list(range(len(texts)))
    except _DECODE_ERRORS:
        events, fast = [], []
        for k, text in enumerate(texts):
            try:
                events.append(_decode_camel(text))
            except _DECODE_ERRORS:
                try:
                    events.append(_decode_snake(text))
                except _DECODE_ERRORS:
                    continue
            fast.append(k)

    def slow(indices: Iterable[int]) -> list[dict[str, Any]]:
        rows = (_slow(first + k, texts[k], unit, zone) for k in indices)
        return [row for row in rows if row is not None]

    try:
        table = _columns(events, [first + k for k in fast]) if events else None
    except (UnicodeEncodeError, pa.ArrowException):  # a lone surrogate in a string, say
        table, fast = None, []
    others = sorted(set(range(len(texts))) - set(fast)) if len(fast) < len(texts) else []

    def check() -> pa.Table:
        parts = [pa.Table.from_pylist(slow(others), schema=SOURCE_SCHEMA)] if others else []
        if table is not None:
            recorded, again = table["recorded_at"], table["recorded_alt"]
            checked = _stage.finish(
                table.set_column(1, "recorded_at", pc.coalesce(recorded, again)),
                connection,
                zone=zone,
                json_checked=True,
                recheck=lambda indices: slow(fast[i] for i in indices),
                suspect=pc.and_(pc.is_valid(recorded), pc.is_valid(again)),
            )
            parts.append(checked)
        if len(parts) == 1:
            return parts[0]
        return pa.concat_tables(parts).sort_by("source_position")

    return check


def _columns(events: list[Any], positions: list[int]) -> pa.Table:
    """The decoded events as columns: source_position, recorded_at, then the other fields."""
    columns: dict[str, pa.Array] = {"source_position": pa.array(positions, pa.int64())}
    columns["recorded_at"] = pa.array(list(map(attrgetter("recorded_at"), events)), pa.string())
    for name, kind, _ in _STRUCT_FIELDS:
        if name in columns or name == "position":
            continue
        values = list(map(attrgetter(name), events))
        if kind is msgspec.Raw:
            text = _raw_text(values)
            columns[name] = pc.if_else(pc.is_in(text, _NO_OBJECT), None, text)
        elif name in ("version", "schema_version"):
            columns[name] = pa.array(values, pa.int64())
        else:
            columns[name] = pa.array(values, pa.string())
    return pa.table(columns)


_NO_OBJECT: Final = pa.array(["", "null"])  # absent, or null


def _raw_text(values: list[msgspec.Raw]) -> pa.Array:
    """One string array of raw JSON texts (UTF-8 already checked by the decoder), without copies
    of each text as bytes."""
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, values), np.int64, len(values)), out=offsets[1:])
    data = pa.py_buffer(b"".join(values))
    return pa.Array.from_buffers(
        pa.large_string(), len(values), [None, pa.py_buffer(offsets), data]
    )


def _slow(position: int, text: bytes, unit: str, zone: ZoneInfo | None) -> dict[str, Any] | None:
    """Reads one event in Python, keeping every field that can be read (None for a blank line)."""
    if not text or text.isspace():
        return None
    try:
        fields = _decode_object(text)
    except msgspec.ValidationError:
        kind = _kind(text)
        return bad_row(position, f"{unit} {position} is not a JSON object but {kind}")
    except msgspec.DecodeError as exc:
        reason = str(exc).removeprefix("JSON is malformed: ")
        return bad_row(position, f"{unit} {position} is not JSON: {reason}")
    values = {key: _value(key, bytes(raw)) for key, raw in fields.items()}
    return check_row(position, values, zone=zone)


def _value(key: str, raw: bytes) -> object:
    if key in ("data", "metadata") and raw.startswith(b"{"):
        return raw.decode()  # the exact text: numbers keep their spelling
    return json.loads(raw, parse_float=Decimal)


def _kind(text: bytes) -> str:
    """What a JSON value that is not an object is."""
    kinds = {b"[": "an array", b'"': "a string", b"t": "true", b"f": "false", b"n": "null"}
    return kinds.get(text.lstrip()[:1], "a number")
