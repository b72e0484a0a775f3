"""State in time: one stream at a version or instant (also bitemporal), every stream at an instant.

``at=T`` means the events with ``recorded_at <= T`` (inclusive): what the store knew at T. The
bitemporal form ``valid_at=V, known_at=R`` keeps, among the events recorded by R, those that took
effect by V (``occurred_at <= V``). Either way the chosen events fold in version order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import chain
from numbers import Integral  # numpy integers are Integral, not int
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench import _foldsql
from esworkbench.aggregates import Aggregate
from esworkbench.engine import (
    Folder,
    Row,
    Source,
    decode_events,
    fold_events,
    unknown_type,
)
from esworkbench.errors import EsWorkbenchError, UnknownStreamError
from esworkbench.events import TIMESTAMP
from esworkbench.parallel import Folded, fold_columns, paused_gc
from esworkbench.query import translate

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

__all__ = ["as_of", "instant", "read_events", "replay"]

Output = Literal["pandas", "polars"]
Engine = Literal["auto", "sql", "python"]


def instant(value: object, name: str) -> datetime | None:
    """An aware instant from a datetime or ISO text with an offset; naive ones are refused.

    Examples:
        >>> instant("2024-03-01T14:03:00+01:00", "at").isoformat()
        '2024-03-01T13:03:00+00:00'
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise EsWorkbenchError(
                f"{name}={value!r} is not an ISO instant. Hint: 2024-03-01T14:03:00Z"
            ) from None
    if not isinstance(value, datetime):
        raise EsWorkbenchError(f"{name} must be a datetime or ISO text, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise EsWorkbenchError(
            f"{name}={value.isoformat()} is a naive datetime. "
            "Hint: give it a zone, for example datetime(..., tzinfo=UTC) or '...Z'"
        )
    return value.astimezone(UTC)


def _version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise EsWorkbenchError(f"version={value!r} must be a non-negative integer")
    return int(value)


def read_events(
    source: Source,
    aggregate: Aggregate,
    aggregate_id: str,
    *,
    version: int | None = None,
    at: object = None,
    valid_at: object = None,
    known_at: object = None,
) -> pa.Table:
    """The rows of one stream that a replay with these bounds folds, in version order.

    Raises:
        UnknownStreamError: when the stream has no events at all.
        EsWorkbenchError: ``version`` is past the stream's head.
        EsWorkbenchError: when the stream belongs to another aggregate type, or bounds are bad.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("AccountOpened", {})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> read_events(store, esw.generic("Account"), "acc-1", version=0).num_rows
        0
    """
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise EsWorkbenchError(f"aggregate_id must be a non-empty string, got {aggregate_id!r}")
    to_version = _version(version)
    recorded = instant(at, "at")
    known = instant(known_at, "known_at")
    valid = instant(valid_at, "valid_at")
    if recorded is not None and known is not None and recorded != known:
        raise EsWorkbenchError("at and known_at name the same bound; pass only one of them")
    everything = source.read_stream(aggregate_id)
    if everything.num_rows == 0:
        raise UnknownStreamError(
            f"stream {aggregate_id!r} has no events. Hint: check the id; "
            "store.sql('select aggregate_id from streams') lists the streams"
        )
    stored_type = everything["aggregate_type"][0].as_py()
    if stored_type != aggregate.name:
        raise EsWorkbenchError(
            f"stream {aggregate_id!r} is a {stored_type!r}, but the fold is for "
            f"{aggregate.name!r}. Hint: replay it with a fold named {stored_type!r}"
        )
    head = pc.max(everything["version"]).as_py()
    if to_version is not None and to_version > head:
        raise EsWorkbenchError(
            f"stream {aggregate_id!r} has {head} versions; version={to_version} is past its "
            f"head. Hint: ask for a version from 0 to {head}, or leave version out for the end"
        )
    keep = pc.greater_equal(everything["version"], 1)
    if to_version is not None:
        keep = pc.and_(keep, pc.less_equal(everything["version"], to_version))
    if (bound := recorded or known) is not None:
        keep = pc.and_(keep, pc.less_equal(everything["recorded_at"], pa.scalar(bound, TIMESTAMP)))
    if valid is not None:
        keep = pc.and_(keep, pc.less_equal(everything["occurred_at"], pa.scalar(valid, TIMESTAMP)))
    return everything.filter(keep)


def replay(
    source: Source,
    aggregate: Aggregate,
    aggregate_id: str,
    *,
    version: int | None = None,
    at: object = None,
    valid_at: object = None,
    known_at: object = None,
    snapshots: bool = False,
) -> Any:
    """The state of one stream: at its end, at ``version``, at instant ``at``, or bitemporal.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        aggregate_id: the stream.
        version: fold the events up to this version (inclusive).
        at: fold the events recorded by this instant (``recorded_at <= at``).
        valid_at: with ``known_at``: fold the events that took effect by this instant.
        known_at: the recorded-time bound of a bitemporal question (the same as ``at``).
        snapshots: start from the nearest snapshot of this fold at or before the target
            (:func:`esworkbench.snapshot`) and fold only the events after it; the answer is
            the same. Off by default; bitemporal questions never use snapshots.

    Raises:
        UnknownStreamError: when the stream has no events.
        FoldError: when a handler raises (names the stream and version).

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("AccountOpened", {"owner": "Ann"}),
        ...                            esw.NewEvent("MoneyDeposited", {"amount": 5})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> account = esw.Aggregate("Account", initial={"balance": 0}, on={
        ...     "MoneyDeposited": lambda s, e: {**s, "balance": s["balance"] + e.data["amount"]}})
        >>> esw.replay(store, account, "acc-1"), esw.replay(store, account, "acc-1", version=1)
        ({'balance': 5}, {'balance': 0})
    """
    table = read_events(
        source,
        aggregate,
        aggregate_id,
        version=version,
        at=at,
        valid_at=valid_at,
        known_at=known_at,
    )
    folder = Folder(aggregate)
    cursor = None
    if snapshots and valid_at is None:
        from esworkbench.snapshots import resume

        cursor, table = resume(source, aggregate, table, folder)
    return fold_events(folder, decode_events(table, aggregate), cursor).state


def as_of(
    source: Source,
    aggregate: Aggregate,
    *,
    at: object = None,
    output: Output = "pandas",
    engine: Engine = "auto",
    workers: int | None = None,
    progress: bool | None = None,
) -> pd.DataFrame | pl.DataFrame:
    """Every stream of the aggregate's type as of instant ``at`` (default: now), one row each.

    Columns: ``aggregate_id``, ``version``, ``last_event_at`` (recorded_at of the last event
    folded), then the state: a dict state spreads into one column per key, any other state sits
    in one ``state`` column. Streams with no event recorded by ``at`` are left out. A fully
    declared fold runs as one SQL query (``engine="auto"`` or ``"sql"``); otherwise the Python
    engine folds sorted Arrow batches in worker processes.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5})] * 2,
        ...                  aggregate_type="Account", expected_version=0)
        >>> account = esw.Aggregate("Account", fields={"total": esw.sum("amount")})
        >>> esw.as_of(store, account)[["aggregate_id", "version", "total"]].to_dict("records")
        [{'aggregate_id': 'acc-1', 'version': 2, 'total': 10}]
    """
    bound = instant(at, "at")
    where, params = ("recorded_at <= ?", [bound]) if bound is not None else ("true", [])
    if engine not in ("auto", "sql", "python"):
        raise EsWorkbenchError(f"engine={engine!r} is not one of 'auto', 'sql', 'python'")
    if engine == "sql" and not compiles(aggregate):
        raise EsWorkbenchError(
            f"aggregate {aggregate.name!r} is not fully declared, so SQL cannot answer it. "
            "Hint: use engine='python', or declare every field with esw.last, esw.sum, ..."
        )
    table = None
    if engine != "python" and compiles(aggregate):
        table = sql_fold(source, aggregate, where, params, fallback=engine == "auto")
    if table is not None:
        fields = _foldsql.present_columns(aggregate, table, arrow_instants=True)
        constant = {k: [v] * table.num_rows for k, v in aggregate.start().items()}
        return _frame(
            table.column(0),
            table.column(1),
            pc.cast(table.column(2), pa.int64()),
            {k: fields.get(k, v) for k, v in constant.items()},
            output,
        )
    with paused_gc():
        folded = fold_columns(source, aggregate, until=bound, workers=workers, progress=progress)
        return _folded_frame(folded, output, aggregate.start())


def sql_fold(
    source: Source,
    aggregate: Aggregate,
    where: str,
    params: list[Any],
    *,
    fallback: bool,
    timeline: bool = False,
) -> pa.Table | None:
    """Every stream of a declared fold from one SQL query, as of its last event
    (:func:`~esworkbench._foldsql.compile_as_of`) or, with ``timeline``, at every version
    (:func:`~esworkbench._foldsql.compile_timeline`); None when SQL cannot answer it exactly and
    ``fallback`` leaves it to the Python engine.

    Raises:
        FoldError: the fold refuses unknown event types and meets one, as the Python engine would.
        InexactError: SQL cannot answer exactly, and ``fallback`` is False.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("a", [esw.NewEvent("Paid", {"amount": 10**25})], aggregate_type="A")
        >>> fold = esw.Aggregate("A", fields={"paid": esw.sum("amount")})
        >>> sql_fold(store, fold, "true", [], fallback=True) is None
        True
    """
    refuse_unknown(source, aggregate, where, params)
    upcasters = aggregate.upcasters
    relation = upcasters.events_sql() if upcasters else "events"
    compile_fold = _foldsql.compile_timeline if timeline else _foldsql.compile_as_of
    query, args = compile_fold(aggregate, where, params, relation)
    try:
        table = source.sql(query, args).to_arrow_table()
    except duckdb.Error as exc:  # a relation runs lazily: its errors come here
        raise translate(exc, query) from exc
    try:
        return _foldsql.exact(table, aggregate)
    except _foldsql.InexactError:
        if fallback:
            return None
        raise


def refuse_unknown(source: Source, aggregate: Aggregate, where: str, params: list[Any]) -> None:
    """For a fold with ``unknown="error"`` answered in SQL: raises the FoldError the Python
    engine would raise, at the first event (by stream, then version) of a type it does not take.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("a", [esw.NewEvent("Closed", {})], aggregate_type="A")
        >>> fold = esw.Aggregate("A", fields={"n": esw.count(types="Paid")}, unknown="error")
        >>> refuse_unknown(store, fold, "true", [])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        esworkbench.aggregates.FoldError: aggregate 'A' has no handler for event type 'Closed' ...
    """
    if aggregate.unknown != "error":
        return
    scope = f"FROM events WHERE aggregate_type = ? AND ({where})"
    types = source.sql(f"SELECT DISTINCT event_type {scope}", [aggregate.name, *params])
    unknown = sorted(t for (t,) in types.fetchall() if not aggregate.handles(t))
    if not unknown:
        return
    marks = ", ".join("?" * len(unknown))
    first = source.sql(
        f"SELECT aggregate_id, version, event_type {scope} AND event_type IN ({marks}) "
        "ORDER BY aggregate_id, version LIMIT 1",
        [aggregate.name, *params, *unknown],
    ).fetchall()
    raise unknown_type(aggregate, first[0][2], first[0][0], first[0][1])


def compiles(aggregate: Aggregate) -> bool:
    """Whether the SQL engine can answer this fold (declared, and upcasters in SQL if any).

    Examples:
        >>> import esworkbench as esw
        >>> compiles(esw.Aggregate("A", fields={"n": esw.count()})), compiles(esw.generic("A"))
        (True, False)
    """
    upcasters = aggregate.upcasters
    return aggregate.declared and (upcasters is None or upcasters.sql_complete)


def _sql_rows(aggregate: Aggregate, table: pa.Table) -> list[Row]:
    """The rows of a :func:`~esworkbench._foldsql.compile_as_of` result, states as dicts."""
    fields = _foldsql.present_columns(aggregate, table)
    instants = pc.cast(table.column("last_event_at"), pa.int64()).to_pylist()
    start = aggregate.start()
    return [
        (aggregate_id, version, instants[i], {**start, **{k: v[i] for k, v in fields.items()}})
        for i, (aggregate_id, version) in enumerate(
            zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
        )
    ]


def _folded_frame(folded: Folded, output: Output, initial: Any) -> pd.DataFrame | pl.DataFrame:
    """The frame of folded streams: a dict state spreads into columns (a key some state lacks
    is None there), any other state sits in one ``state`` column."""
    states = folded.states
    if states is None:
        fields = dict(zip(folded.names or [], folded.values or [], strict=True))
    elif not states:  # no stream: the columns a state would have
        fields = {name: [] for name in initial} if isinstance(initial, dict) else {"state": []}
    elif set(map(type, states)) <= {dict} or all(isinstance(s, dict) for s in states):
        fields = _spread(states)
    else:
        fields = {"state": states}
    instants = pa.array(folded.recorded, pa.int64())
    return _frame(folded.ids, folded.versions, instants, fields, output)


def unclash(fields: dict[str, Any], taken: Iterable[str]) -> dict[str, Any]:
    """State columns named apart from the frame's own: a state field called like one of them
    (``version`` in a payload merged by the generic fold) becomes ``state.version``.

    Examples:
        >>> list(unclash({"version": [2], "owner": ["Ann"]}, ["aggregate_id", "version"]))
        ['state.version', 'owner']
    """
    taken = set(taken)
    return {f"state.{k}" if k in taken else k: v for k, v in fields.items()}


def polars_column(name: str, values: list[Any]) -> pl.Series:
    """A Polars column of the fold's values, typed when the typed column gives the same values
    back (``0`` among Decimals is ``Decimal("0.00")``), else of Python objects: Polars would
    turn mixed values into text, or drop the keys a dict has and the first lacks.

    Examples:
        >>> polars_column("x", [1, None]).dtype, polars_column("x", [1, "a", {"b": 2}]).dtype
        (Int64, Object)
    """
    import polars as pl

    try:
        column = pl.Series(name, values, strict=False)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        return pl.Series(name, values, dtype=pl.Object)
    if column.dtype != pl.Object and column.to_list() != values:  # equal values, or objects
        return pl.Series(name, values, dtype=pl.Object)
    return column


def _spread(states: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dict states as columns, one per key in first-seen order (missing keys are None)."""
    names = list(dict.fromkeys(chain.from_iterable(states)))
    if sum(map(len, states)) == len(names) * len(states):  # every state has every key
        return {n: list(map(itemgetter(n), states)) for n in names}
    return {n: [s.get(n) for s in states] for n in names}


def _frame(
    ids: list[str] | pa.ChunkedArray,
    versions: list[int] | pa.ChunkedArray,
    instants: pa.Array | pa.ChunkedArray,
    fields: dict[str, list[Any]],
    output: Output,
) -> pd.DataFrame | pl.DataFrame:
    """The result frame from its columns; both engines end here, so their frames are alike.

    ids and versions come as lists (the Python engine) or as Arrow columns (the SQL engine);
    either way they become typed Arrow columns (also with no stream) and convert from there,
    without a Python object per row.
    """
    if output not in ("pandas", "polars"):
        raise EsWorkbenchError(f"output={output!r} is not one of 'pandas', 'polars'")
    keys = {"aggregate_id": _arrow(ids, pa.string()), "version": _arrow(versions, pa.int64())}
    instants = instants.cast(TIMESTAMP)
    fields = unclash(fields, [*keys, "last_event_at"])
    if output == "polars":
        import polars as pl

        data = {k: pl.from_arrow(v) for k, v in keys.items()}
        data["last_event_at"] = pl.from_arrow(instants)
        for name, values in fields.items():
            if isinstance(values, pa.ChunkedArray):
                data[name] = pl.from_arrow(values)
            else:
                data[name] = polars_column(name, values)
        return pl.DataFrame(data)
    import pandas as pd

    result = pd.DataFrame({"aggregate_id": keys["aggregate_id"].to_pandas().astype(str)})
    result["version"] = keys["version"].to_pandas()
    result["last_event_at"] = instants.to_pandas()
    for name, values in fields.items():
        if isinstance(values, pa.ChunkedArray):  # instants of the SQL engine
            if values.null_count < len(values):
                result[name] = values.to_pandas()
                continue
            values = [None] * len(values)  # as the Python engine's all-None column shows
        result[name] = _column(values)
    return result


def _arrow(values: list[Any] | pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """A column as typed Arrow, from a list or from Arrow."""
    if isinstance(values, list):
        return pa.chunked_array([values], kind)
    return values.cast(kind)


def _column(values: list[Any]) -> pd.Series[Any]:
    """A state field as pandas infers it, except that None stays None (not NaN); a column of
    only text or only integers skips pandas' inference, five times its cost."""
    import numpy as np
    import pandas as pd

    kinds = set(map(type, values))
    if kinds == {str}:
        return pd.Series(values, dtype=str)
    if kinds == {int}:
        with contextlib.suppress(OverflowError):  # beyond int64: as pandas takes it
            return pd.Series(np.fromiter(values, np.int64, len(values)))
    column = pd.Series(values, dtype=object if not values else None)
    if column.dtype != object and column.dtype.kind not in "mM" and None in values:
        column = pd.Series(values, dtype=object)  # keep None as None, not NaN
    return column
