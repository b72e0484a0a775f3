"""The Python engine: events decoded in batches and fed to a fold, one stream or every stream.

Events reach a fold as :class:`Event` objects built per Arrow batch: ``data`` is decoded for the
whole batch at once (msgspec over the joined JSON lines), the other columns are converted only when
a handler first asks for them. :class:`Folder` is the one place a fold step runs; every tool
(replay, timelines, steps, snapshots) and :mod:`esworkbench.parallel`, which folds every stream
of a type in worker processes, go through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Protocol

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.aggregates import Aggregate, FoldError, Piece, plain_number
from esworkbench.errors import EsWorkbenchError

if TYPE_CHECKING:
    from esworkbench.query import Params

__all__ = ["Event", "Folder", "Source", "decode_events", "fold_chunk", "fold_events"]

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_PLAIN: Final = msgspec.json.Decoder()
_EXACT: Final = msgspec.json.Decoder(float_hook=Decimal)
# Columns a fold's events are built from, in this order.
COLUMNS: Final = (
    "aggregate_id",
    "version",
    "event_type",
    "data",
    "schema_version",
    "position",
    "event_id",
    "aggregate_type",
    "recorded_at",
    "occurred_at",
    "metadata",
    "correlation_id",
    "causation_id",
    "user_id",
)
SELECT_COLUMNS: Final = ", ".join(COLUMNS)
# What the every-stream engine reads up front. Strings such as metadata and event_id cost five
# times the rest to read and sort; a fold that asks for one gets it read and its chunk refolded.
EAGER: Final = (
    "aggregate_id",
    "version",
    "event_type",
    "data",
    "schema_version",
    "position",
    "recorded_at",
    "occurred_at",
)


class MissingColumn(BaseException):
    """A fold asked for a column the engine did not read: the engine reads it and folds again.

    A BaseException, so that a handler's own ``except Exception`` does not swallow it.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Source(Protocol):
    """What replay reads from: a Store or an attached lake."""

    def sql(self, query: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        """Runs SQL over the ``events`` view."""
        ...  # pragma: no cover

    def read_stream(
        self,
        aggregate_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> pa.Table:
        """Reads one stream in version order."""
        ...  # pragma: no cover


class _Rows:
    """One Arrow batch; its columns become Python lists only when some event asks for them."""

    __slots__ = ("_batch", "_lists", "decoder")

    def __init__(
        self, batch: pa.RecordBatch | pa.Table, decoder: msgspec.json.Decoder[Any]
    ) -> None:
        self._batch = batch
        self._lists: dict[str, list[Any]] = {}
        self.decoder = decoder

    def column(self, name: str) -> list[Any]:
        values = self._lists.get(name)
        if values is None:
            if name not in self._batch.schema.names:
                raise MissingColumn(name)
            array = self._batch.column(name)
            if pa.types.is_timestamp(array.type):
                array = array.cast(pa.int64())
            values = self._lists[name] = array.to_pylist()
        return values


class Event(msgspec.Struct, gc=False):
    """One event as a fold sees it.

    ``event_type``, ``data``, ``version`` and ``aggregate_id`` are plain attributes; the others
    (``metadata``, ``position``, ``event_id``, ``recorded_at``, ``occurred_at``,
    ``schema_version``, ``aggregate_type``, ``correlation_id``, ``causation_id``, ``user_id``)
    are read on first use. Instants are aware UTC datetimes. (A msgspec Struct: building one
    costs a tenth of a plain class's ``__init__``, and a fold sees millions.)

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("AccountOpened", {"owner": "Ann"})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> [event] = decode_events(store.read_stream("acc-1"), esw.generic("Account"))
        >>> event.event_type, event.data, event.version, event.recorded_at.tzinfo
        ('AccountOpened', {'owner': 'Ann'}, 1, datetime.timezone.utc)
    """

    _rows: _Rows
    _i: int
    aggregate_id: str
    version: int
    event_type: str
    data: Any
    _schema_version: int | None = None

    def __repr__(self) -> str:
        return f"Event({self.event_type!r}, {self.aggregate_id!r}, version={self.version})"

    def _get(self, name: str) -> Any:
        return self._rows.column(name)[self._i]

    @property
    def metadata(self) -> Any:
        """The event's metadata, decoded like its data (``{}`` when the event has none)."""
        text = self._get("metadata")
        return {} if text is None else self._rows.decoder.decode(text)

    @property
    def position(self) -> int:
        """The event's position in the store."""
        return int(self._get("position"))

    @property
    def event_id(self) -> str:
        """The event's id."""
        return str(self._get("event_id"))

    @property
    def aggregate_type(self) -> str:
        """The stream's aggregate_type."""
        return str(self._get("aggregate_type"))

    @property
    def recorded_at(self) -> datetime:
        """When the store learned of the event (UTC)."""
        return EPOCH + timedelta(microseconds=self._get("recorded_at"))

    @property
    def occurred_at(self) -> datetime:
        """When the event took effect in the domain (UTC)."""
        return EPOCH + timedelta(microseconds=self._get("occurred_at"))

    @property
    def schema_version(self) -> int:
        """The payload's schema version (after upcasting, if any ran)."""
        if self._schema_version is not None:
            return self._schema_version
        return int(self._get("schema_version"))

    @property
    def correlation_id(self) -> str | None:
        """The correlation id promoted from metadata."""
        return self._get("correlation_id")  # type: ignore[no-any-return]

    @property
    def causation_id(self) -> str | None:
        """The causation id promoted from metadata."""
        return self._get("causation_id")  # type: ignore[no-any-return]

    @property
    def user_id(self) -> str | None:
        """The user id promoted from metadata."""
        return self._get("user_id")  # type: ignore[no-any-return]


def _decode_column(
    column: pa.Array | pa.ChunkedArray, decoder: msgspec.json.Decoder[Any]
) -> list[Any]:
    """Decodes a column of JSON texts in one call: the texts joined as JSON lines."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return []
    if column.null_count:
        column = pc.fill_null(column, "null")
    # A newline inside a JSON text is whitespace, never part of a value, so joining is safe as
    # long as no text is empty (an empty text is not JSON: the store never holds one).
    lists = pa.ListArray.from_arrays(pa.array([0, len(column)], pa.int32()), column)
    joined = pc.binary_join(lists, "\n")[0].as_buffer()
    values: list[Any] = decoder.decode_lines(joined)
    if len(values) != len(column):
        raise EsWorkbenchError(
            f"{len(column)} JSON texts decoded into {len(values)} values. "
            "Hint: a data or metadata text in the store is not one JSON value; run a validation"
        )
    return values


def decode_events(batch: pa.RecordBatch | pa.Table, aggregate: Aggregate) -> list[Event]:
    """Turns a batch of canonical rows into the events a fold sees (upcast, data decoded).

    Examples:
        >>> import esworkbench as esw
        >>> decode_events(esw.EVENT_SCHEMA.empty_table(), esw.generic("Account"))
        []
    """
    decoder = _EXACT if aggregate.decimals else _PLAIN
    rows = _Rows(batch, decoder)
    datas = _decode_column(batch.column("data"), decoder)
    ids = rows.column("aggregate_id")
    versions = rows.column("version")
    event_types = rows.column("event_type")
    count = len(datas)
    events = list(map(Event, repeat(rows, count), range(count), ids, versions, event_types, datas))
    upcasters = aggregate.upcasters
    if upcasters is not None and upcasters:
        schema_versions = rows.column("schema_version")
        for event, schema_version in zip(events, schema_versions, strict=True):
            if upcasters.touches(event.event_type, schema_version):
                event.event_type, event._schema_version, event.data = upcasters.upcast(
                    event.event_type, schema_version, event.data, where=event
                )
    return events


# -- folding -----------------------------------------------------------------------------------


def unknown_type(
    aggregate: Aggregate, event_type: str, aggregate_id: str, version: int
) -> FoldError:
    """The error of a fold with ``unknown="error"`` meeting an event type it does not take.

    Examples:
        >>> import esworkbench as esw
        >>> print(unknown_type(esw.Aggregate("A", on={}), "Closed", "a-1", 3))
        aggregate 'A' has no handler for event type 'Closed' (stream 'a-1', version 3). Hint: \
add a handler, or pass unknown='ignore'
    """
    return FoldError(
        f"aggregate {aggregate.name!r} has no handler for event type {event_type!r} (stream "
        f"{aggregate_id!r}, version {version}). Hint: add a handler, or pass unknown='ignore'",
        aggregate_id=aggregate_id,
        version=version,
    )


class Cursor:
    """The running state of one stream: the state a handler sees and the declared accumulators."""

    __slots__ = ("acc", "event", "state")

    def __init__(self, state: Any, acc: list[Any]) -> None:
        self.state = state
        self.acc = acc
        self.event: Event | None = None


class Folder:
    """Applies one aggregate's fold to events; shared by every engine and tool.

    Examples:
        >>> import esworkbench as esw
        >>> folder = Folder(esw.Aggregate("Account", fields={"n": esw.count()}))
        >>> folder.start().state
        {'n': 0}
    """

    def __init__(self, aggregate: Aggregate) -> None:
        self.aggregate = aggregate
        self.pieces: list[tuple[str, Piece, dict[str, Any]]] = [
            (name, piece, dict(piece.statuses)) for name, piece in aggregate.fields.items()
        ]
        self.on = dict(aggregate.on)
        self.strict = aggregate.unknown == "error"
        self.simple = not self.pieces and not self.strict and not aggregate.merge

    def start(self) -> Cursor:
        """A cursor at the initial state."""
        return Cursor(self.aggregate.start(), [p.initial() for _, p, _ in self.pieces])

    def apply(self, cursor: Cursor, event: Event) -> None:
        """Folds one event into the cursor; raises FoldError when the fold fails."""
        aggregate = self.aggregate
        if self.strict and not aggregate.handles(event.event_type):
            raise unknown_type(aggregate, event.event_type, event.aggregate_id, event.version)
        if self.pieces:
            self._declared(cursor, event)
        handler = self.on.get(event.event_type)
        try:
            if handler is not None:
                cursor.state = handler(cursor.state, event)
            elif aggregate.merge and isinstance(event.data, dict):
                cursor.state = {**cursor.state, **event.data}
        except Exception as exc:
            raise FoldError(
                f"the {event.event_type!r} handler of aggregate {aggregate.name!r} raised "
                f"{type(exc).__name__}: {exc} at stream {event.aggregate_id!r} version "
                f"{event.version}. Hint: esw.steps(...) shows the state it received",
                aggregate_id=event.aggregate_id,
                version=event.version,
            ) from exc
        cursor.event = event

    def _declared(self, cursor: Cursor, event: Event) -> None:
        changed: dict[str, Any] = {}
        for index, (name, piece, statuses) in enumerate(self.pieces):
            before = cursor.acc[index]
            after = _step(piece, statuses, before, event)
            if after is not before:
                cursor.acc[index] = after
                changed[name] = self.present(piece, after)
        if changed:
            cursor.state = {**cursor.state, **changed}

    def present(self, piece: Piece, value: Any) -> Any:
        """A declared accumulator as the state shows it (sums exact, or float without decimals)."""
        if piece.kind == "sum" and isinstance(value, Decimal):
            return value if self.aggregate.decimals else float(value)
        if piece.kind in ("min", "max") and value is not None:
            return value[1]
        return value


def _exact(value: int | float | Decimal) -> int | Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else value


def _step(piece: Piece, statuses: dict[str, Any], value: Any, event: Event) -> Any:
    """One declared piece's accumulator after one event (the same object when unchanged)."""
    kind, event_type = piece.kind, event.event_type
    if kind == "status":
        return statuses.get(event_type, value)
    if piece.types is not None and event_type not in piece.types:
        return value
    if kind == "first_at":
        return getattr(event, piece.instant) if value is None else value
    if kind == "last_at":
        return getattr(event, piece.instant)
    data = event.data
    name = piece.field
    carried = name is None or (isinstance(data, dict) and name in data)
    if kind == "count":
        return value + 1 if carried else value
    if not carried:
        return value
    new = data[name]
    if kind == "last":
        return new
    if not plain_number(new):
        return value
    if kind == "sum":
        with localcontext() as context:
            context.prec = 60
            return value + _exact(new) if isinstance(new, float | Decimal) else value + new
    if value is None or (_exact(new) < value[0] if kind == "min" else _exact(new) > value[0]):
        return (_exact(new), new)
    return value


def fold_events(folder: Folder, events: Sequence[Event], cursor: Cursor | None = None) -> Cursor:
    """Folds events (of one stream, in version order) into a cursor.

    Examples:
        >>> import esworkbench as esw
        >>> folder = Folder(esw.generic("Account"))
        >>> fold_events(folder, []).state
        {}
    """
    cursor = cursor if cursor is not None else folder.start()
    for event in events:
        folder.apply(cursor, event)
    return cursor


# -- every stream ------------------------------------------------------------------------------

Row = tuple[str, int, int, Any]  # aggregate_id, version, last recorded_at (µs), state


def fold_chunk(folder: Folder, batch: pa.RecordBatch | pa.Table) -> list[Row]:
    """Folds a chunk of whole streams sorted by (aggregate_id, version); one row per stream.

    Each row is (aggregate_id, last version, its recorded_at in µs, state).

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("Opened", {"owner": "Ann"})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> [(stream, version, _, state)] = fold_chunk(
        ...     Folder(esw.generic("Account")), store.read_stream("acc-1"))
        >>> stream, version, state
        ('acc-1', 1, {'owner': 'Ann'})
    """
    batch = in_stream_order(batch)
    events = decode_events(batch, folder.aggregate)
    if not events:
        return []
    recorded = pc.cast(batch.column("recorded_at"), pa.int64()).to_pylist()
    ids = batch.column("aggregate_id")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    # Where each stream starts, found by Arrow: the Python loop below only runs the fold.
    changed = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    starts = (np.flatnonzero(changed.to_numpy(zero_copy_only=False)) + 1).tolist()
    bounds = list(zip([0, *starts], [*starts, len(events)], strict=True))
    rows: list[Row] = []
    if folder.simple:
        _fold_simple(folder, events, bounds, recorded, rows)
        return rows
    for first, end in bounds:
        cursor = folder.start()
        for event in events[first:end]:
            folder.apply(cursor, event)
        last = events[end - 1]
        rows.append((last.aggregate_id, last.version, recorded[end - 1], cursor.state))
    return rows


def in_stream_order(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """The rows ordered by (aggregate_id, version); checked in one pass, sorted only if not.

    The every-stream engine reads each range of streams unsorted and lets the worker that folds
    it do this: a compacted store's files are already in order, and sorting here runs in
    parallel, where DuckDB's ORDER BY would run in the one process that reads.

    Examples:
        >>> import pyarrow as pa
        >>> rows = pa.table({"aggregate_id": ["b", "a", "a"], "version": [1, 2, 1]})
        >>> in_stream_order(rows).to_pydict()
        {'aggregate_id': ['a', 'a', 'b'], 'version': [1, 2, 1]}
    """
    if batch.num_rows < 2:
        return batch
    ids, versions = batch.column("aggregate_id"), batch.column("version")
    n = batch.num_rows
    after, before = ids.slice(1), ids.slice(0, n - 1)
    later = pc.greater(after, before)
    same = pc.and_(pc.equal(after, before), pc.greater(versions.slice(1), versions.slice(0, n - 1)))
    if pc.all(pc.or_(later, same)).as_py():
        return batch
    return batch.sort_by([("aggregate_id", "ascending"), ("version", "ascending")])


def _fold_simple(
    folder: Folder,
    events: list[Event],
    bounds: list[tuple[int, int]],
    recorded: list[int],
    rows: list[Row],
) -> None:
    """The hot loop for folds of handlers only: no declared fields, unknown types ignored."""
    on_get, initial = folder.on.get, folder.aggregate.initial
    # A fresh state per stream: for a dict, list or set its C-level copy (what start() does).
    start = initial.copy if type(initial) in (dict, list, set) else folder.aggregate.start
    handlers = list(map(on_get, map(attrgetter("event_type"), events)))
    first = end = 0
    try:
        for first, end in bounds:
            state = start()
            for handler, event in zip(handlers[first:end], events[first:end], strict=False):
                if handler is not None:
                    state = handler(state, event)
            last = events[end - 1]
            rows.append((last.aggregate_id, last.version, recorded[end - 1], state))
    except Exception:
        # Folds the failing stream again through the checked path, which names the event.
        cursor = folder.start()
        for event in events[first:end]:
            folder.apply(cursor, event)
        raise


def _whole_streams(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Re-cuts batches sorted by aggregate_id so that no stream spans two of them.

    Only the rows of the stream that straddles a batch boundary are copied.
    """
    carry: list[pa.RecordBatch] = []  # the rows of one stream, not yet complete
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids = batch.column("aggregate_id")
        if carry:
            first = carry[0].column("aggregate_id")[0]
            same = pc.equal(ids, first)
            head = pc.index(same, False).as_py()  # rows that still belong to the carried stream
            if head == -1:
                carry.append(batch)
                continue
            carry.append(batch.slice(0, head))
            yield _concat(carry)
            carry = []
            batch, ids = batch.slice(head), ids.slice(head)
        cut = pc.index(ids, ids[-1]).as_py()
        if cut > 0:
            yield batch.slice(0, cut)
        carry = [batch.slice(cut)]
    if carry:
        yield _concat(carry)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
