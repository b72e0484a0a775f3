"""The history of streams: the timeline of their states, and blame per field.

The timeline has every state a stream has been in, one row per (aggregate_id, version).
A row holds the state right after the event of that version, the interval in recorded time during
which that state was the stream's latest (``valid_from`` is the event's ``recorded_at``,
``valid_to`` the next event's, null for the last), and the event that produced it. One stream is
folded by the Python engine; every stream of a type comes from one SQL query with window functions
when the fold is fully declared, else from the Python engine over a scan sorted by
(aggregate_id, version), one chunk of whole streams at a time.

Blame names, per field of a state, the event that last changed its value (see
:mod:`esworkbench.diffs` for what counts as a change).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from esworkbench import _foldsql
from esworkbench.aggregates import Aggregate
from esworkbench.diffs import changes, fetch
from esworkbench.engine import (
    SELECT_COLUMNS,
    Folder,
    Source,
    decode_events,
)
from esworkbench.errors import EsWorkbenchError
from esworkbench.events import TIMESTAMP
from esworkbench.temporal import (
    Output,
    compiles,
    instant,
    polars_column,
    read_events,
    sql_fold,
    unclash,
)

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

__all__ = ["blame", "timeline"]

EVENT_COLUMNS: Final = ("event_type", "event_id", "user_id", "correlation_id")
_FIXED: Final = ("aggregate_id", "version", "valid_from", "valid_to", *EVENT_COLUMNS)


@dataclass
class Rows:
    """Timeline rows gathered column by column (instants as microseconds since the epoch).

    The Python engine gathers one state per row in ``state``; the SQL engine gives the state's
    fields as ``columns`` instead (one list per field), which :meth:`states` turns into dicts.
    """

    aggregate_id: list[str] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    state: list[Any] = field(default_factory=list)
    valid_from: list[int] = field(default_factory=list)
    valid_to: list[int | None] = field(default_factory=list)
    events: dict[str, list[Any]] = field(
        default_factory=lambda: {name: [] for name in EVENT_COLUMNS}
    )
    columns: dict[str, list[Any]] | None = None

    def states(self) -> list[Any]:
        """The state of each row.

        Examples:
            >>> Rows(columns={"n": [1, 2]}).states()
            [{'n': 1}, {'n': 2}]
        """
        if self.columns is None:
            return self.state
        names = list(self.columns)
        return [
            dict(zip(names, values, strict=True))
            for values in zip(*self.columns.values(), strict=True)
        ]


def fold_rows(folder: Folder, batch: pa.Table | pa.RecordBatch, rows: Rows) -> None:
    """Folds whole streams sorted by (aggregate_id, version), one row per event into ``rows``.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("a", [esw.NewEvent("Named", {"name": "x"})] * 2,
        ...                  aggregate_type="Thing", expected_version=0)
        >>> rows = Rows()
        >>> fold_rows(Folder(esw.generic("Thing")), store.read_stream("a"), rows)
        >>> rows.version, rows.state, rows.valid_to[-1]
        ([1, 2], [{'name': 'x'}, {'name': 'x'}], None)
    """
    events = decode_events(batch, folder.aggregate)
    recorded = pc.cast(batch.column("recorded_at"), pa.int64()).to_pylist()
    rows.events["event_type"].extend(e.event_type for e in events)  # as the fold saw it
    for name in EVENT_COLUMNS[1:]:
        rows.events[name].extend(batch.column(name).to_pylist())
    cursor = folder.start()
    for event, at in zip(events, recorded, strict=True):
        if not rows.aggregate_id or rows.aggregate_id[-1] != event.aggregate_id:
            cursor = folder.start()
        else:
            rows.valid_to[-1] = at
        folder.apply(cursor, event)
        rows.aggregate_id.append(event.aggregate_id)
        rows.version.append(event.version)
        rows.state.append(cursor.state)
        rows.valid_from.append(at)
        rows.valid_to.append(None)


def _sql_rows(source: Source, aggregate: Aggregate, where: str, params: list[Any]) -> Rows | None:
    """The timeline of every stream from one SQL query (None: SQL cannot answer it exactly)."""
    table = sql_fold(source, aggregate, where, params, fallback=True, timeline=True)
    if table is None:
        return None
    fields = _foldsql.present_columns(aggregate, table)
    size = table.num_rows
    start = aggregate.start()  # a dict with every declared field, maybe more (initial's keys)
    columns = {n: fields[n] if n in fields else [v] * size for n, v in start.items()}
    return Rows(
        aggregate_id=table.column("aggregate_id").to_pylist(),
        version=table.column("version").to_pylist(),
        valid_from=pc.cast(table.column("recorded_at"), pa.int64()).to_pylist(),
        valid_to=pc.cast(table.column("valid_to"), pa.int64()).to_pylist(),
        events={name: table.column(name).to_pylist() for name in EVENT_COLUMNS},
        columns=columns,
    )


def _ranges(
    source: Source, where: str, args: list[Any], chunk_events: int
) -> list[tuple[str, str]]:
    """Consecutive ranges of aggregate_ids (first, last) of about ``chunk_events`` events each."""
    table = fetch(
        source,
        f"SELECT aggregate_id, count(*) AS n FROM events WHERE aggregate_type = ? AND ({where}) "
        "GROUP BY aggregate_id ORDER BY aggregate_id",
        args,
    )
    counts = list(zip(table["aggregate_id"].to_pylist(), table["n"].to_pylist(), strict=True))
    ranges: list[tuple[str, str]] = []
    first, size = None, 0
    for aggregate_id, events in counts:
        first = aggregate_id if first is None else first
        size += events
        if size >= chunk_events:
            ranges.append((first, aggregate_id))
            first, size = None, 0
    if first is not None:
        ranges.append((first, counts[-1][0]))
    return ranges


def _python_rows(
    source: Source,
    aggregate: Aggregate,
    where: str,
    params: list[Any],
    chunk_events: int = 100_000,
) -> Rows:
    """The Python engine over every stream: one sorted query per range of whole streams, so that
    only one chunk of events is decoded at a time."""
    args = [aggregate.name, *params]
    query = (
        f"SELECT {SELECT_COLUMNS} FROM events WHERE aggregate_type = ? AND ({where}) "
        "AND aggregate_id BETWEEN ? AND ? ORDER BY aggregate_id, version"
    )
    folder, rows = Folder(aggregate), Rows()
    for first, last in _ranges(source, where, args, chunk_events):
        fold_rows(folder, fetch(source, query, [*args, first, last]), rows)
    return rows


def timeline(
    source: Source,
    aggregate: Aggregate,
    aggregate_id: str | None = None,
    *,
    output: Output = "pandas",
    until: object = None,
) -> pd.DataFrame | pl.DataFrame:
    """Every state of one stream, or of every stream of the type: one row per version.

    Columns: ``aggregate_id``, ``version``, the state (a dict state spreads into one column per
    key, any other state sits in one ``state`` column), ``valid_from`` (the event's
    recorded_at), ``valid_to`` (the stream's next event's recorded_at, null for the last),
    ``event_type``, ``event_id``, ``user_id``, ``correlation_id``. Rows are ordered by
    (aggregate_id, version). The last row of a stream is its replayed state.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        aggregate_id: one stream (Python engine); ``None`` for every stream of the type: one SQL
            query with window functions when the fold is fully declared, else the Python engine.
        output: ``"pandas"`` or ``"polars"``.
        until: only the events recorded by this instant (``recorded_at <= until``), so the
            timeline as the store knew it then; a later event does not end ``valid_to``.

    Raises:
        UnknownStreamError: when ``aggregate_id`` names a stream with no events.
        FoldError: when a handler raises (``esw.steps`` shows the state it received).

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("AccountOpened", {"owner": "Ann"}),
        ...                            esw.NewEvent("MoneyDeposited", {"amount": 5})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> account = esw.Aggregate("Account", fields={
        ...     "owner": esw.last("owner"), "balance": esw.sum("amount")})
        >>> rows = esw.timeline(store, account, "acc-1")
        >>> rows[["version", "owner", "balance", "event_type"]].to_dict("records")
        [{'version': 1, 'owner': 'Ann', 'balance': 0, 'event_type': 'AccountOpened'}, \
{'version': 2, 'owner': 'Ann', 'balance': 5, 'event_type': 'MoneyDeposited'}]
        >>> bool(rows["valid_to"].isna().tolist() == [False, True])
        True
    """
    if output not in ("pandas", "polars"):
        raise EsWorkbenchError(f"output={output!r} is not one of 'pandas', 'polars'")
    bound = instant(until, "until")
    if aggregate_id is not None:
        table = read_events(source, aggregate, aggregate_id, at=bound)
        rows = Rows()
        fold_rows(Folder(aggregate), table, rows)
    else:
        where, params = ("recorded_at <= ?", [bound]) if bound is not None else ("true", [])
        found = _sql_rows(source, aggregate, where, params) if compiles(aggregate) else None
        rows = found if found is not None else _python_rows(source, aggregate, where, params)
    return frame(rows, aggregate.start(), output)


def _fields(rows: Rows, initial: Any) -> dict[str, list[Any]]:
    """The state columns: one per key of dict states, else one ``state`` column."""
    states = rows.state
    if rows.columns is not None:
        fields = rows.columns
    elif not states:
        fields = {n: [] for n in initial} if isinstance(initial, dict) else {"state": []}
    elif not all(isinstance(s, dict) for s in states):
        fields = {"state": states}
    else:
        names: dict[str, None] = {}
        for state in states:
            names.update(dict.fromkeys(state))
        fields = {n: [s.get(n) for s in states] for n in names}
    return unclash(fields, _FIXED)


def _instants(values: Iterable[int | None]) -> pa.Array:
    return pa.array(list(values), pa.int64()).cast(TIMESTAMP)


def series(values: list[Any]) -> pd.Series[Any]:
    """A pandas column of the fold's values. A column with nulls or with values of mixed types
    keeps the Python objects as they are (pandas would turn ints into floats, None into NaN).

    Examples:
        >>> series([1, None]).tolist(), str(series([1, 2]).dtype)
        ([1, None], 'int64')
    """
    import pandas as pd

    exact = not values or any(v is None for v in values) or len(set(map(type, values))) > 1
    return pd.Series(values, dtype=object if exact else None)


def frame(rows: Rows, initial: Any, output: Output) -> pd.DataFrame | pl.DataFrame:
    """The timeline frame of gathered rows (see :func:`timeline` for the columns).

    Examples:
        >>> frame(Rows(), {"balance": 0}, "pandas").columns.tolist()[:3]
        ['aggregate_id', 'version', 'balance']
    """
    fields = _fields(rows, initial)
    if output == "polars":
        import polars as pl

        data: dict[str, Any] = {
            "aggregate_id": pl.Series("aggregate_id", rows.aggregate_id, pl.String),
            "version": pl.Series("version", rows.version, pl.Int64),
            **{name: polars_column(name, values) for name, values in fields.items()},
            "valid_from": pl.from_arrow(_instants(rows.valid_from)),
            "valid_to": pl.from_arrow(_instants(rows.valid_to)),
            **{n: pl.Series(n, rows.events[n], pl.String) for n in EVENT_COLUMNS},
        }
        return pl.DataFrame(data, strict=False)
    import pandas as pd

    result = pd.DataFrame(
        {
            "aggregate_id": pd.Series(rows.aggregate_id, dtype=object),
            "version": pd.Series(rows.version, dtype="int64"),
        }
    )
    for name, values in fields.items():
        result[name] = series(values)
    result["valid_from"] = _instants(rows.valid_from).to_pandas()
    result["valid_to"] = _instants(rows.valid_to).to_pandas()
    for name in EVENT_COLUMNS:
        result[name] = pd.Series(rows.events[name], dtype=object)
    return result


# -- blame -----------------------------------------------------------------------------------


def blame(
    source: Source,
    aggregate: Aggregate,
    aggregate_id: str,
    *,
    version: int | None = None,
    at: object = None,
) -> pd.DataFrame:
    """Per field of the state, the event that last changed it.

    Columns: field, value, version, event_type, event_id, recorded_at, user_id,
    correlation_id. A field still at its initial value has no event (nulls). A non-dict state is
    one field, ``state``.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        aggregate_id: the stream.
        version: the state at this version (default: the head).
        at: the state at this instant (the events recorded by it).

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [
        ...     esw.NewEvent("AccountOpened", {"owner": "Ann", "limit": 5}, user_id="u-1"),
        ...     esw.NewEvent("LimitRaised", {"limit": 9}, user_id="u-2")],
        ...     aggregate_type="Account", expected_version=0)
        >>> esw.blame(store, esw.generic("Account"), "acc-1")[
        ...     ["field", "value", "version", "user_id"]].to_dict("records")
        [{'field': 'owner', 'value': 'Ann', 'version': 1, 'user_id': 'u-1'}, \
{'field': 'limit', 'value': 9, 'version': 2, 'user_id': 'u-2'}]
    """
    import pandas as pd

    table = read_events(source, aggregate, aggregate_id, version=version, at=at)
    folder = Folder(aggregate)
    cursor = folder.start()
    last: dict[str, int] = {}
    events = decode_events(table, aggregate)
    for index, event in enumerate(events):
        before = cursor.state
        folder.apply(cursor, event)
        last.update(dict.fromkeys(changes(before, cursor.state), index))
    state = cursor.state
    values = dict(state) if isinstance(state, dict) else {"state": state}
    names = [str(n) for n in values]
    # The event types the fold saw: an upcaster may have renamed the stored one (as timeline).
    seen = pa.array([event.event_type for event in events], pa.string())
    picked = (
        table.set_column(table.schema.get_field_index("event_type"), "event_type", seen)
        .select(["version", "event_type", "event_id", "recorded_at", "user_id", "correlation_id"])
        .take(pa.array([last.get(n) for n in names], pa.int64()))
    )
    result = pd.DataFrame(
        {
            "field": pd.Series(names, dtype=object),
            "value": pd.Series(list(values.values()), dtype=object),
        }
    )
    for column in picked.column_names:
        result[column] = picked.column(column).to_pandas()
    result["version"] = result["version"].astype("Int64")
    return result
