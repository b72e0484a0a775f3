"""Writing a store's events out: JSON Lines, CSV and Parquet, in position order.

Each exporter selects events with one query over the ``events`` view (user values travel as bound
parameters), streams the result in Arrow batches, and writes to a temporary file that replaces
``dest`` only when every event is written, so a failed export leaves no half file behind.

The JSON Lines shape is the common camelCase one, which
:func:`~esworkbench.sources.files.read_jsonl` reads back to the same events::

    {"eventId": "...", "eventType": "MoneyDeposited", "aggregateType": "Account",
     "aggregateId": "acc-1", "version": 2, "timestamp": "2024-05-01T12:00:00.000000Z",
     "schemaVersion": 1, "data": {...}, "metadata": {...}}

``timestamp`` is recorded_at; ``occurredAt`` appears only when it differs from recorded_at, and
``metadata`` only when the event has some. ``data`` and ``metadata`` are the stored JSON text,
written verbatim (only line breaks between tokens are removed, which JSON Lines cannot hold), so
numbers keep their exact spelling. ``correlationId``, ``causationId`` and ``userId`` appear at the
top level only when the metadata does not already say the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esworkbench import _checks
from esworkbench.errors import EsWorkbenchError
from esworkbench.events import EVENT_SCHEMA
from esworkbench.query import Params
from esworkbench.store import Store

if TYPE_CHECKING:
    from esworkbench.upcasting import Upcasters

__all__ = ["Compression", "export_csv", "export_jsonl", "export_parquet"]

Compression = Literal["gzip", "zstd"]
"""How a JSON Lines or CSV export is compressed."""

_BATCH: Final = 65_536
_WINDOW: Final = 262_144  # positions sorted at a time (at least 8 batches)
_EVENTS: Final = "__esw_events__"  # where the selection goes in a query that wraps it
_INSTANT: Final = "strftime({}, '%Y-%m-%dT%H:%M:%S.%fZ')"
_SPACE: Final = r"""'("(?:[^"\\]|\\.)*")|[ \t\n\r]+'"""
_SUFFIXES: Final[dict[str, Compression]] = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_IDS: Final = (("correlation_id", "correlationId"), ("causation_id", "causationId"),
               ("user_id", "userId"))  # fmt: skip


def _one_line(column: str) -> str:
    """The JSON text of ``column`` without line breaks (compact only where it has any)."""
    return (
        f"CASE WHEN contains({column}, chr(10)) OR contains({column}, chr(13))"
        f" THEN regexp_replace({column}, {_SPACE}, '\\1', 'g') ELSE {column} END"
    )


def _jsonl_line() -> str:
    ids = []
    for i, (name, key) in enumerate(_IDS):
        # At the top level only when the metadata does not hold the same string (as JSON text:
        # the reader takes the first key of the two whose value is not null).
        derived = f"coalesce(nullif(_m[{2 * i + 1}], 'null'), nullif(_m[{2 * i + 2}], 'null'))"
        ids.append(
            f"CASE WHEN {name} IS NOT NULL AND to_json({name}) IS DISTINCT FROM {derived}"
            f""" THEN ',"{key}":' || to_json({name}) ELSE '' END"""
        )
    paths = "['$.correlationId', '$.correlation_id', '$.causationId', '$.causation_id', " + (
        "'$.userId', '$.user_id']"
    )
    return f"""
    SELECT '{{"eventId":' || to_json(event_id)
        || ',"eventType":' || to_json(event_type)
        || ',"aggregateType":' || to_json(aggregate_type)
        || ',"aggregateId":' || to_json(aggregate_id)
        || ',"version":' || version
        || ',"timestamp":"' || {_INSTANT.format("recorded_at")} || '"'
        || CASE WHEN occurred_at <> recorded_at
                THEN ',"occurredAt":"' || {_INSTANT.format("occurred_at")} || '"' ELSE '' END
        || ',"schemaVersion":' || schema_version
        || ',"data":' || {_one_line("data")}
        || CASE WHEN metadata IS NOT NULL THEN ',"metadata":' || {_one_line("metadata")} ELSE '' END
        || {" || ".join(ids)}
        || '}}' || chr(10) AS line
    FROM (SELECT *, CASE WHEN json_valid(metadata)
                         THEN json_extract(metadata, {paths})::VARCHAR[] END AS _m FROM ({_EVENTS}))
    """


_JSONL_LINE: Final = _jsonl_line()
_CSV_COLUMNS: Final = ", ".join(
    _INSTANT.format(name) + f" AS {name}" if name in ("recorded_at", "occurred_at") else name
    for name in EVENT_SCHEMA.names
)


@dataclass(frozen=True)
class _Selection:
    """Which events to export: a SQL condition and the values it binds."""

    condition: str
    values: Sequence[object] | Mapping[str, object]

    def windows(self, store: Store, size: int) -> Iterator[tuple[str, Params]]:
        """One query per window of ``size`` positions, as :meth:`Store.read_all` reads, so that
        DuckDB sorts one window at a time; the window ends at the head when the export began."""
        store.refresh()
        head = store.head_position()
        named = isinstance(self.values, Mapping)
        low, high = ("$esw_low", "$esw_high") if named else ("?", "?")
        query = (
            f"SELECT * FROM events WHERE {self.condition} AND position > {low}"
            f" AND position <= {high} ORDER BY position"
        )
        for start in range(0, head, size):
            bounds = (start, min(start + size, head))
            if isinstance(self.values, Mapping):
                yield query, {**self.values, "esw_low": bounds[0], "esw_high": bounds[1]}
            else:
                yield query, [*self.values, *bounds]


def _selection(
    where: str | None,
    params: Params,
    since: datetime | None,
    until: datetime | None,
    aggregate_types: Sequence[str] | None,
) -> _Selection:
    """The events to export; user values only as bound parameters."""
    _checks.check_bound(since, "since")
    _checks.check_bound(until, "until")
    if isinstance(aggregate_types, str):
        raise EsWorkbenchError(
            f"aggregate_types must be a list of names, got the string {aggregate_types!r}. "
            f"Hint: pass [{aggregate_types!r}]"
        )
    named = isinstance(params, Mapping)
    values: Any = dict(params) if isinstance(params, Mapping) else list(params or [])
    clauses = [f"({where})"] if where else ["true"]
    ours = {
        "since": ("recorded_at >= {}", since),
        "until": ("recorded_at <= {}", until),
        "aggregate_types": (
            "aggregate_type IN (SELECT unnest(CAST({} AS VARCHAR[])))",
            None if aggregate_types is None else list(aggregate_types),
        ),
    }
    for name, (clause, value) in ours.items():
        if value is None:
            continue
        if named:
            values[f"esw_{name}"] = value
            clauses.append(clause.format(f"$esw_{name}"))
        else:
            values.append(value)
            clauses.append(clause.format("?"))
    return _Selection(" AND ".join(clauses), values)


def _batches(
    store: Store,
    select: str,
    selection: _Selection,
    batch_size: int,
    upcasters: Upcasters | None = None,
) -> Iterator[pa.RecordBatch]:
    """The selected events in position order, ``select`` wrapped around each window's query."""
    if upcasters:
        yield from _upcast_batches(store, select, selection, batch_size, upcasters)
        return
    for query, values in selection.windows(store, max(batch_size * 8, _WINDOW)):
        relation = store.sql(select.replace(_EVENTS, query) if select else query, values)
        yield from relation.to_arrow_reader(batch_size)


def _upcast_batches(
    store: Store, select: str, selection: _Selection, batch_size: int, upcasters: Upcasters
) -> Iterator[pa.RecordBatch]:
    """As :func:`_batches`, with each batch upcast before ``select`` runs over it."""
    import duckdb

    with duckdb.connect() as connection:
        connection.execute("SET TimeZone = 'UTC'")  # as the store's session: instants in UTC
        for query, values in selection.windows(store, max(batch_size * 8, _WINDOW)):
            for raw in store.sql(query, values).to_arrow_reader(batch_size):
                rows = upcasters.apply(pa.Table.from_batches([raw]))
                if not select:
                    yield from rows.to_batches()
                    continue
                connection.register("_esw_upcast", rows)
                try:
                    wrapped = select.replace(_EVENTS, "SELECT * FROM _esw_upcast")
                    yield from connection.sql(wrapped).to_arrow_table().to_batches()
                finally:
                    connection.unregister("_esw_upcast")


@contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` that becomes ``dest`` when the block succeeds."""
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        yield temporary
        temporary.replace(dest)
    finally:
        temporary.unlink(missing_ok=True)


def _compression(dest: Path, compression: Compression | None) -> Compression | None:
    if compression is None:
        return _SUFFIXES.get(dest.suffix.lower())
    if compression not in ("gzip", "zstd"):
        raise EsWorkbenchError(
            f"compression must be 'gzip', 'zstd' or None, got {compression!r}. "
            "Hint: None picks it from the file's suffix (.gz, .zst)"
        )
    return compression


def _write_stream(
    dest: Path, compression: Compression | None, write: Callable[[pa.NativeFile], int]
) -> int:
    with _replacing(dest) as temporary:
        if compression is None:
            with pa.OSFile(str(temporary), "wb") as sink:
                return write(sink)
        with pa.CompressedOutputStream(str(temporary), compression) as sink:
            return write(sink)


def _text_bytes(lines: pa.Array) -> pa.Buffer:
    """The bytes of a string array's values, back to back (the lines end in newlines already)."""
    if len(lines) == 0:
        return pa.py_buffer(b"")
    width = np.int64 if pa.types.is_large_string(lines.type) else np.int32
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=width)[[lines.offset, lines.offset + len(lines)]]
    return data.slice(int(bounds[0]), int(bounds[1] - bounds[0]))


def export_jsonl(
    store: Store,
    dest: str | os.PathLike[str],
    *,
    where: str | None = None,
    params: Params = None,
    since: datetime | None = None,
    until: datetime | None = None,
    aggregate_types: Sequence[str] | None = None,
    compression: Compression | None = None,
    batch_size: int = _BATCH,
    upcasters: Upcasters | None = None,
) -> int:
    """Writes events as JSON Lines in the common camelCase shape, in position order.

    Args:
        store: the store.
        dest: the file to write (replaced when the export succeeds).
        where: a SQL condition over the ``events`` columns, for example
            ``"event_type = ? AND version > 1"``; its values go in ``params``.
        params: the values of the placeholders in ``where`` (a list for ``?``, a dict for
            ``$name``).
        since: only events with ``recorded_at >= since`` (an aware datetime).
        until: only events with ``recorded_at <= until`` (an aware datetime).
        aggregate_types: only events of these aggregate types.
        compression: ``"gzip"``, ``"zstd"``, or None to pick it from the suffix
            (``.gz``, ``.zst``; anything else is not compressed).
        batch_size: events fetched from DuckDB at a time.
        upcasters: bring old payload shapes up to date on the way out
            (:meth:`~esworkbench.Upcasters.apply`: event_type, schema_version and data change;
            numbers keep their digits).

    Returns:
        The number of events written.

    Examples:
        >>> import tempfile, pathlib, decimal, esworkbench as esw
        >>> from esworkbench.sources.files import read_jsonl
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> store = esw.open_store(folder / "bank")
        >>> amount = decimal.Decimal("10.10")
        >>> store.append("acc-1", [{"eventType": "Deposited", "data": {"amount": amount},
        ...     "timestamp": "2024-05-01T12:00:00Z"}], aggregate_type="Account")
        1
        >>> export_jsonl(store, folder / "bank.jsonl.zst", where="event_type = ?",
        ...              params=["Deposited"])
        1
        >>> [table] = read_jsonl(folder / "bank.jsonl.zst")
        >>> table.select(["aggregate_id", "data"]).to_pylist()
        [{'aggregate_id': 'acc-1', 'data': '{"amount":10.10}'}]
    """
    selection = _selection(where, params, since, until, aggregate_types)
    target = Path(dest)

    def write(sink: pa.NativeFile) -> int:
        written = 0
        for batch in _batches(store, _JSONL_LINE, selection, batch_size, upcasters):
            lines = batch.column(0)
            sink.write(_text_bytes(lines))
            written += len(lines)
        return written

    return _write_stream(target, _compression(target, compression), write)


def export_csv(
    store: Store,
    dest: str | os.PathLike[str],
    *,
    where: str | None = None,
    params: Params = None,
    since: datetime | None = None,
    until: datetime | None = None,
    aggregate_types: Sequence[str] | None = None,
    compression: Compression | None = None,
    batch_size: int = _BATCH,
    upcasters: Upcasters | None = None,
) -> int:
    """Writes events as CSV with a header of the canonical column names, in position order.

    Instants are ISO 8601 text in UTC (``2024-05-01T12:00:00.000000Z``); ``data`` and
    ``metadata`` are the stored JSON text; a null is an empty cell, an empty string ``""``.
    Arguments are those of :func:`export_jsonl`.

    Returns:
        The number of events written.

    Examples:
        >>> import tempfile, pathlib, esworkbench as esw
        >>> from esworkbench.sources.files import read_csv
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> store = esw.open_store(folder / "bank")
        >>> store.append("acc-1", [{"eventType": "Opened", "data": {"owner": "Ann"}}],
        ...              aggregate_type="Account")
        1
        >>> export_csv(store, folder / "bank.csv.gz", aggregate_types=["Account"])
        1
        >>> [table] = read_csv(folder / "bank.csv.gz")
        >>> table.column("data").to_pylist()
        ['{"owner":"Ann"}']
    """
    selection = _selection(where, params, since, until, aggregate_types)
    target = Path(dest)
    select = f"SELECT {_CSV_COLUMNS} FROM ({_EVENTS})"

    def write(sink: pa.NativeFile) -> int:
        written = 0
        schema = pa.schema(
            [
                pa.field(f.name, pa.string() if f.name.endswith("_at") else f.type)
                for f in EVENT_SCHEMA
            ]
        )
        with pacsv.CSVWriter(sink, schema) as writer:
            for batch in _batches(store, select, selection, batch_size, upcasters):
                writer.write_batch(batch.cast(schema))
                written += batch.num_rows
        return written

    return _write_stream(target, _compression(target, compression), write)


def export_parquet(
    store: Store,
    dest: str | os.PathLike[str],
    *,
    where: str | None = None,
    params: Params = None,
    since: datetime | None = None,
    until: datetime | None = None,
    aggregate_types: Sequence[str] | None = None,
    compression: str = "zstd",
    batch_size: int = _BATCH,
    upcasters: Upcasters | None = None,
) -> int:
    """Writes events as one Parquet file of :data:`~esworkbench.EVENT_SCHEMA`, in position order.

    Arguments are those of :func:`export_jsonl`, except ``compression``, the Parquet codec
    (``"zstd"``, ``"snappy"``, ``"gzip"``, ``"none"``, ...). Each batch is a row group.

    Returns:
        The number of events written.

    Examples:
        >>> import tempfile, pathlib, esworkbench as esw
        >>> from esworkbench.sources.files import read_table
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> store = esw.open_store(folder / "bank")
        >>> store.append("acc-1", [{"eventType": "Opened", "data": {}}], aggregate_type="Account")
        1
        >>> export_parquet(store, folder / "bank.parquet")
        1
        >>> [table] = read_table(folder / "bank.parquet")
        >>> table.column("event_type").to_pylist()
        ['Opened']
    """
    selection = _selection(where, params, since, until, aggregate_types)
    target = Path(dest)
    written = 0
    with (
        _replacing(target) as temporary,
        pq.ParquetWriter(str(temporary), EVENT_SCHEMA, compression=compression) as writer,
    ):
        for batch in _batches(store, "", selection, batch_size, upcasters):
            writer.write_batch(batch.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA))
            written += batch.num_rows
    return written
