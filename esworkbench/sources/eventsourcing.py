"""Reading the history that the eventsourcing library (pyeventsourcing) recorded.

The library keeps one row per event: ``(originator_id, originator_version, topic, state)``, in
SQLite (table ``stored_events``, position ``rowid``) or PostgreSQL (table ``<app>_events``,
position ``notification_id``). ``state`` is the event's attributes as JSON bytes, with UUIDs,
Decimals and datetimes wrapped as ``{"_type_": "uuid_hex" | "decimal_str" | "datetime_iso",
"_data_": "..."}``. Each row becomes one event:

- ``event_type`` is the class name of the topic (``bank.domain:Account.Deposited`` ->
  ``Deposited``); ``aggregate_type`` is the class name of the ``originator_topic`` that the
  aggregate's first event carries (looked up per batch); ``metadata`` keeps the full ``topic``,
  the ``originator_topic`` where the state had one, and under ``transcoded`` the JSON pointer of
  each unwrapped value with its wrapper's name.
- ``aggregate_id`` is the originator id as canonical UUID text (SQLite keeps 32 hex digits);
  ids that are not UUIDs stay as they are.
- ``event_id``: the library has none, so it is derived: ``uuid5(EVENT_ID_NAMESPACE,
  f"{aggregate_id}/{version}")``. The same event gets the same id in SQLite and PostgreSQL, and on
  every re-import.
- ``recorded_at`` and ``occurred_at`` are the state's ``timestamp``; ``schema_version`` its
  ``class_version`` (1 when absent); ``data`` the other attributes, unwrapped: UUIDs as canonical
  text, datetimes as their ISO text, Decimals as JSON numbers with exactly their digits.

Compressed or encrypted states are not decoded: such rows come back with an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from json.encoder import encode_basestring as _quote  # C-accelerated, keeps non-ASCII text
from typing import Any, Final

import duckdb
import pyarrow as pa

from esworkbench.events import dumps_json, loads_exact
from esworkbench.sources import _sql
from esworkbench.sources._digest import ROW_HASH
from esworkbench.sources._recorder_hashes import raw_hashes, recorder_digest
from esworkbench.sources._recorders import Row, open_recorder
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources._sql import SNAPSHOT_SOURCE_SCHEMA

__all__ = [
    "EVENT_ID_NAMESPACE",
    "derived_event_id",
    "eventsourcing_digest",
    "eventsourcing_event_at",
    "read_eventsourcing",
    "read_eventsourcing_snapshots",
]

EVENT_ID_NAMESPACE: Final = uuid.UUID("0d7e1525-e2d9-5048-9e43-06a887cf6cc1")
"""``uuid5(NAMESPACE_URL, "https://github.com/pyeventsourcing/eventsourcing#event_id")``."""
_NAMESPACE: Final = EVENT_ID_NAMESPACE.bytes

Transcoding = Callable[[Any], object]
"""Turns a wrapper's ``_data_`` into a JSON value (Decimal allowed); raises ValueError if bad."""


class _UnreadableError(Exception):
    """A field of a stored event that cannot be read; its message is the row's error."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = repr(field)


_NESTED: Final = frozenset({dict, list})
_Stream = tuple[str | None, "str | _UnreadableError"]  # aggregate_id, aggregate_type


def _decimal(data: Any) -> Decimal:
    value = Decimal(data)
    if not value.is_finite():
        raise ValueError(f"{value} is not a number JSON can hold")
    return value


def _datetime(data: Any) -> str:
    datetime.fromisoformat(data)  # only checked: the ISO text is kept exactly
    return str(data)


STANDARD_TRANSCODINGS: Final[Mapping[str, Transcoding]] = {
    "uuid_hex": lambda data: str(uuid.UUID(data)),
    "decimal_str": _decimal,
    "datetime_iso": _datetime,
}
"""The library's own wrappers: ``UUIDAsHex``, ``DecimalAsStr``, ``DatetimeAsISO``."""


def derived_event_id(aggregate_id: str, version: int) -> str:
    """The event_id given to the event at ``version`` of ``aggregate_id``.

    Examples:
        >>> derived_event_id("7c9e6679-7425-40de-944b-e07fc1f90ae7", 1)
        '333bca63-d7df-5b0e-81c5-1e8d23921213'
    """
    # uuid.uuid5, written out: the same value in a third of the time.
    name = _NAMESPACE + f"{aggregate_id}/{version}".encode()
    digest = bytearray(hashlib.sha1(name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def class_name(topic: str) -> str:
    """The class name in a topic: ``module:Outer.Inner`` -> ``Inner``.

    Examples:
        >>> class_name("bank.domain:Account.Deposited"), class_name("bank:Account")
        ('Deposited', 'Account')
    """
    return topic.rpartition(":")[2].rpartition(".")[2]


def _pointer(path: str, key: str | int) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


class _Decoder:
    """Unwraps states, remembering where each wrapper was (as a JSON pointer)."""

    def __init__(self, extra: Mapping[str, Transcoding] | None) -> None:
        self.transcodings = {**STANDARD_TRANSCODINGS, **(extra or {})}

    def state(self, raw: bytes | str | None) -> dict[str, Any]:
        if raw is None:
            raise _UnreadableError("data", "the state is missing")
        try:
            text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _UnreadableError(
                "data", "the state is not UTF-8 JSON (compressed or encrypted states are not read)"
            ) from None
        try:
            value = loads_exact(text)  # Decimal digits as written; NaN refused
        except ValueError as exc:
            raise _UnreadableError("data", f"the state is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise _UnreadableError(
                "data", f"the state must be a JSON object, got {type(value).__name__}"
            )
        return value

    def json_text(self, value: Any, path: str, found: dict[str, str]) -> str:
        """Compact JSON of a parsed state: wrappers decoded, numbers with their exact digits.

        One walk both unwraps and writes; ``path`` is the JSON pointer of ``value``.
        """
        if isinstance(value, str):
            return _quote(value)
        if value is None or value is True or value is False:
            return "null" if value is None else "true" if value else "false"
        if isinstance(value, int | Decimal):
            return str(value)  # parse_float=Decimal: the digits as they were written
        if isinstance(value, list):
            items = (self.json_text(v, _pointer(path, i), found) for i, v in enumerate(value))
            return "[" + ",".join(items) + "]"
        if len(value) == 2 and "_type_" in value and "_data_" in value:
            name = value["_type_"]
            decode = self.transcodings.get(name) if isinstance(name, str) else None
            if decode is not None:
                return self._decoded(decode, name, value["_data_"], path, found)
        members = (
            _quote(k)
            + ":"
            + self.json_text(v, _pointer(path, k) if v.__class__ in _NESTED else path, found)
            for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"

    def _decoded(
        self, decode: Transcoding, name: str, data: Any, path: str, found: dict[str, str]
    ) -> str:
        try:
            if isinstance(data, dict | list):  # inner wrappers first, as JSONTranscoder does
                data = loads_exact(self.json_text(data, path, found))
            text = dumps_json(decode(data))
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise _UnreadableError(
                "data", f"{path or '/'} holds {name} {data!r}, which cannot be read: {exc}"
            ) from None
        found[path or "/"] = name
        return text


def _utf8(text: str) -> str:
    """Refuses text that UTF-8 cannot hold (a lone surrogate from a \\ud800 escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _UnreadableError("data", "holds a lone surrogate, which UTF-8 cannot store") from None
    return text


def _instant(wrapped: Any) -> datetime:
    if not isinstance(wrapped, dict) or wrapped.get("_type_") != "datetime_iso":
        raise _UnreadableError("recorded_at", "the state has no timestamp (datetime_iso)")
    try:
        value = datetime.fromisoformat(wrapped["_data_"])
    except (TypeError, ValueError):
        raise _UnreadableError(
            "recorded_at", f"timestamp {wrapped['_data_']!r} is not ISO 8601"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise _UnreadableError("recorded_at", f"timestamp {value.isoformat()} has no zone")
    return value.astimezone(UTC)


def _event(row: Row, stream: _Stream, decoder: _Decoder) -> dict[str, Any]:
    position, _, version, topic, raw = row
    aggregate_id, aggregate_type = stream
    out: dict[str, Any] = dict.fromkeys(SOURCE_SCHEMA.names)
    metadata: dict[str, Any] = {"topic": topic}
    out |= {"source_position": position, "aggregate_id": aggregate_id, "version": version}
    errors = []
    if isinstance(aggregate_type, _UnreadableError):
        errors.append(str(aggregate_type))
    else:
        out["aggregate_type"] = aggregate_type
    if isinstance(topic, str) and topic:
        out["event_type"] = class_name(topic)
    else:
        errors.append("field 'event_type': the topic is missing")
    if aggregate_id and isinstance(version, int):
        out["event_id"] = derived_event_id(aggregate_id, version)
    if not aggregate_id:
        errors.append("field 'aggregate_id': the originator_id is missing")
    if not isinstance(version, int) or version < 1:
        errors.append(f"field 'version': must be >= 1, got {version}")
    try:
        state = decoder.state(raw)
        out["recorded_at"] = out["occurred_at"] = _instant(state.pop("timestamp", None))
        if "originator_topic" in state:
            metadata["originator_topic"] = state.pop("originator_topic")
        class_version = state.pop("class_version", 1)
        if not isinstance(class_version, int) or not 1 <= class_version < 2**31:
            raise _UnreadableError(
                "schema_version", f"class_version {class_version!r} is not an integer >= 1"
            )
        out["schema_version"] = class_version
        found: dict[str, str] = {}
        out["data"] = _utf8(decoder.json_text(state, "", found))
        if found:
            metadata["transcoded"] = found
    except _UnreadableError as exc:
        errors.append(str(exc))
    out["metadata"] = decoder.json_text(metadata, "", {})
    out["error"] = "; ".join(errors) or None
    return out


def _streams(
    rows: Sequence[Row], first_states: Mapping[str, bytes], canonical: Callable[[str], str]
) -> dict[str, _Stream]:
    """originator_id -> (aggregate_id, class name of the first event's originator_topic)."""
    streams: dict[str, _Stream] = {}
    for originator_id in {row[1] for row in rows}:
        raw = first_states.get(originator_id)
        try:
            state = json.loads(bytes(raw).decode("utf-8")) if raw is not None else {}
        except (UnicodeDecodeError, ValueError):
            state = {}
        topic = state.get("originator_topic") if isinstance(state, dict) else None
        aggregate_type: str | _UnreadableError = _UnreadableError(
            "aggregate_type", "the aggregate's first event has no readable originator_topic"
        )
        if isinstance(topic, str) and topic:
            aggregate_type = class_name(topic)
        streams[originator_id] = (canonical(originator_id), aggregate_type)
    return streams


def read_eventsourcing(
    source: str | os.PathLike[str],
    *,
    app: str | None = None,
    schema: str | None = None,
    after: int = 0,
    batch_size: int = 100_000,
    transcodings: Mapping[str, Transcoding] | None = None,
    row_hashes: bool = False,
) -> Iterator[pa.Table]:
    """Streams the events an eventsourcing application recorded, in notification order.

    Args:
        source: ``sqlite:///path.db`` (or a path) for the SQLite recorder, otherwise a
            PostgreSQL URI or conninfo.
        app: the application's name, whose lowercase is the PostgreSQL tables' prefix
            (``Bank`` -> ``bank_events``); by default ``stored``. SQLite tables have no prefix.
        schema: the PostgreSQL schema (the library's POSTGRES_SCHEMA), if any.
        after: read only events whose notification id (SQLite rowid) is greater.
        batch_size: the most rows in one table.
        transcodings: wrapper name -> decoder, for an application's own transcodings (the
            library's UUID, Decimal and datetime wrappers are always read); unknown wrappers
            stay in the data as stored.
        row_hashes: add the hash of each stored row as a last column ``_esw_row_hash`` (see
            :func:`eventsourcing_digest`).

    Returns:
        Tables in :data:`~esworkbench.sources._rows.SOURCE_SCHEMA`, one row per stored event;
        rows that cannot be read name the field and reason in ``error``.

    Examples:
        >>> next(read_eventsourcing("sqlite:///bank.db"))  # doctest: +SKIP
    """
    _sql.check_batch_size(batch_size, after)
    decoder = _Decoder(transcodings)
    recorder = open_recorder(source, app, schema)
    hasher = duckdb.connect() if row_hashes else None
    try:
        for rows in recorder.events(after, batch_size):
            first_states = recorder.first_states(sorted({r[1] for r in rows}))
            streams = _streams(rows, first_states, recorder.canonical_id)
            events = [_event(row, streams[row[1]], decoder) for row in rows]
            table = _table(events, SOURCE_SCHEMA)
            if hasher is not None:
                table = table.append_column(ROW_HASH, pa.array(raw_hashes(rows, hasher)))
            yield table
    finally:
        recorder.close()
        if hasher is not None:
            hasher.close()


def eventsourcing_digest(
    source: str | os.PathLike[str],
    positions: Sequence[int],
    *,
    app: str | None = None,
    schema: str | None = None,
) -> list[tuple[int, int]]:
    """For each position (ascending), the stored events up to it and the sum of their hashes,
    as ``read_eventsourcing(..., row_hashes=True)`` gives them; their states are not decoded.

    Examples:
        >>> eventsourcing_digest("sqlite:///bank.db", [3, 5])  # doctest: +SKIP
        [(3, 16470523101853622271), (5, 2830744617101930331)]
    """
    recorder = open_recorder(source, app, schema)
    try:
        return recorder_digest(recorder, positions)
    finally:
        recorder.close()


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a table, built column by column (faster than row by row)."""
    return pa.table({name: [row[name] for row in rows] for name in schema.names}, schema=schema)


def eventsourcing_event_at(
    source: str | os.PathLike[str],
    position: int,
    *,
    app: str | None = None,
    schema: str | None = None,
) -> str | None:
    """The event_id :func:`read_eventsourcing` gives the event at ``position``, or None."""
    recorder = open_recorder(source, app, schema)
    try:
        found = recorder.at(int(position))
        return (
            None if found is None else derived_event_id(recorder.canonical_id(found[0]), found[1])
        )
    finally:
        recorder.close()


def read_eventsourcing_snapshots(
    source: str | os.PathLike[str],
    *,
    app: str | None = None,
    schema: str | None = None,
    batch_size: int = 100_000,
    transcodings: Mapping[str, Transcoding] | None = None,
) -> Iterator[pa.Table]:
    """Streams the application's snapshots (``stored_snapshots`` or ``<app>_snapshots``).

    Returns:
        Tables in :data:`~esworkbench.sources._sql.SNAPSHOT_SOURCE_SCHEMA` ordered by
        (aggregate_id, version): the aggregate's state unwrapped as for events, ``taken_at`` from
        the snapshot's timestamp, the topics and unwrapped pointers in ``metadata``.
    """
    _sql.check_batch_size(batch_size)
    decoder = _Decoder(transcodings)
    recorder = open_recorder(source, app, schema)
    try:
        for rows in recorder.snapshots(batch_size):
            snapshots = [_snapshot(row, decoder, recorder.canonical_id) for row in rows]
            yield _table(snapshots, SNAPSHOT_SOURCE_SCHEMA)
    finally:
        recorder.close()


def _snapshot(row: Row, decoder: _Decoder, canonical: Callable[[str], str]) -> dict[str, Any]:
    _, originator_id, version, topic, raw = row
    out: dict[str, Any] = dict.fromkeys(SNAPSHOT_SOURCE_SCHEMA.names)
    out |= {"aggregate_id": canonical(originator_id), "version": version}
    metadata: dict[str, Any] = {"topic": topic}
    try:
        state = decoder.state(raw)
        out["taken_at"] = _instant(state.get("timestamp"))
        aggregate_topic = state.get("topic")
        if not isinstance(aggregate_topic, str) or not isinstance(state.get("state"), dict):
            raise _UnreadableError("state", "the snapshot has no topic and state")
        out["aggregate_type"] = class_name(aggregate_topic)
        metadata["aggregate_topic"] = aggregate_topic
        found: dict[str, str] = {}
        out["state"] = _utf8(decoder.json_text(state["state"], "", found))
        if found:
            metadata["transcoded"] = found
    except _UnreadableError as exc:
        field = {"'recorded_at'": "'taken_at'", "'data'": "'state'"}
        out["error"] = str(exc).replace(exc.field, field.get(exc.field, exc.field))
    out["metadata"] = decoder.json_text(metadata, "", {})
    return out
