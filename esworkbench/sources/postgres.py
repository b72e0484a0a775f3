"""Reading events from PostgreSQL tables in the common schema.

The common schema is one row per event::

    events(id BIGSERIAL, event_id UUID, event_type TEXT, aggregate_id TEXT, aggregate_type TEXT,
           version BIGINT, data JSONB, metadata JSONB, timestamp TIMESTAMPTZ,
           UNIQUE (aggregate_id, version))

:func:`read_postgres` streams it as Arrow tables of
:data:`~esworkbench.sources._rows.SOURCE_SCHEMA`, in ``id`` order; ``id`` becomes
``source_position``, and ``timestamp`` both ``recorded_at`` and ``occurred_at`` (``id`` order and
time order may disagree for back-dated rows: both are kept as they are). Table and column names
can be mapped; identifiers are quoted by :mod:`psycopg.sql`.

The rows travel by ADBC (``COPY ... TO STDOUT`` in binary, decoded in C), the fastest of the
transports measured (see :mod:`esworkbench.sources._sql`), and a DuckDB pass makes each batch
canonical: compact JSON with numbers as stored, canonical UUIDs, ids promoted from metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import pyarrow as pa
from psycopg import sql

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources._digest_sql import hashing, sums
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources._settled import Source, Unsettled, between, read_settled
from esworkbench.sources._sql import (
    SNAPSHOT_SOURCE_SCHEMA,
    canonical_uuid,
    check_batch_size,
    checker_connection,
    column_types,
    connect,
    finish,
    finish_snapshots,
    run,
    stream,
    table_name,
)

if TYPE_CHECKING:
    from adbc_driver_manager.dbapi import Connection

__all__ = [
    "SNAPSHOT_SOURCE_SCHEMA",
    "SOURCE_SCHEMA",
    "postgres_digest",
    "postgres_event_at",
    "read_postgres",
    "read_postgres_snapshots",
]

EVENT_COLUMNS: Final[Mapping[str, str | None]] = {
    "source_position": "id",
    "event_id": "event_id",
    "event_type": "event_type",
    "aggregate_type": "aggregate_type",
    "aggregate_id": "aggregate_id",
    "version": "version",
    "recorded_at": "timestamp",
    "occurred_at": None,  # None: the same as recorded_at
    "schema_version": None,  # None: 1
    "data": "data",
    "metadata": "metadata",
    "correlation_id": None,  # None: promoted from metadata
    "causation_id": None,
    "user_id": None,
}
"""Canonical field -> column of the common schema; ``columns=`` overrides any of them."""

SNAPSHOT_COLUMNS: Final[Mapping[str, str | None]] = {
    "aggregate_type": None,
    "aggregate_id": "aggregate_id",
    "version": "version",
    "state": "data",
    "taken_at": "timestamp",
}
"""Snapshot field -> column of the common ``snapshots`` table."""

_JSON_TYPES: Final = frozenset({"json", "jsonb"})
_TEXT_COLUMNS: Final = ("event_id", "event_type", "aggregate_type", "aggregate_id")
_PROMOTED: Final = ("correlation_id", "causation_id", "user_id")


def _mapping(
    given: Mapping[str, str | None] | None, defaults: Mapping[str, str | None]
) -> dict[str, str | None]:
    mapped = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise EsWorkbenchError(
                f"columns= names {key!r}, which is not a field here. "
                f"Hint: map any of {', '.join(defaults)}"
            )
        mapped[key] = value
    return mapped


def _missing(names: Iterable[str | None], types: Mapping[str, str], table: str) -> None:
    for name in names:
        if name is not None and name not in types:
            raise EsWorkbenchError(
                f"table {table!r} has no column {name!r}; it has {', '.join(types)}. "
                "Hint: map the canonical field to the real column with columns={...}"
            )


def _timestamp(name: str | None, types: Mapping[str, str], table: str) -> sql.Composable:
    """An instant column as a finite timestamptz (infinite and naive ones are refused)."""
    if name is None:
        return sql.SQL("NULL::timestamptz")
    if types[name] != "timestamptz":
        raise EsWorkbenchError(
            f"column {name!r} of {table!r} has type {types[name] or 'unknown'}, not timestamptz. "
            "Hint: esworkbench stores instants in UTC; convert the column, for example "
            f"{name} AT TIME ZONE 'Europe/Berlin', in a view and read the view"
        )
    column = sql.Identifier(name)
    return sql.SQL("CASE WHEN isfinite({c}) THEN {c} END").format(c=column)


def _typed(name: str | None, kind: str) -> sql.Composable:
    if name is None:
        return sql.SQL("NULL::{}").format(sql.SQL(kind))
    return sql.SQL("{}::{}").format(sql.Identifier(name), sql.SQL(kind))


def read_postgres(
    dsn: str,
    *,
    table: str = "events",
    schema: str | None = None,
    columns: Mapping[str, str | None] | None = None,
    after: int = 0,
    batch_size: int = 100_000,
    settle_seconds: float | None = None,
    row_hashes: bool = False,
) -> Generator[pa.Table, None, Unsettled | None]:
    """Streams the events of a PostgreSQL table in the common schema, in ``id`` order.

    Only settled positions are read: a gap in the ids is passed once no transaction that could
    still fill it is running (see :mod:`esworkbench.sources._settled`), so a row whose
    transaction commits late is read by a later call, never skipped.

    Args:
        dsn: a libpq URI or conninfo, for example ``postgresql://user@host:5432/db``.
        table: the table (or view) of events.
        schema: its schema; by default the search path decides.
        columns: canonical field -> source column, overriding :data:`EVENT_COLUMNS`; None for a
            field the source lacks (occurred_at then equals recorded_at, schema_version is 1,
            correlation_id, causation_id and user_id come from metadata keys in camelCase or
            snake_case).
        after: read only rows whose position is greater (the last position already imported).
        batch_size: the most rows in one table.
        settle_seconds: how long to wait at a gap for the transactions that may fill it
            (default :data:`~esworkbench.sources._settled.SETTLE_SECONDS`).
        row_hashes: add each row's hash, computed by PostgreSQL, as a last column
            ``_esw_row_hash`` (see :func:`postgres_digest`).

    Returns:
        An iterator of tables in :data:`SOURCE_SCHEMA`, one row per source row. ``data`` and
        ``metadata`` are compact JSON text with numbers exactly as stored. A row that cannot be
        an event keeps what could be read and names the field and reason in ``error``. The
        generator returns None, or an :class:`~esworkbench.sources._settled.Unsettled` when it
        stopped at a gap that a running transaction may still fill.

    Raises:
        EsWorkbenchError: the database cannot be reached, or the table lacks a column.
        QueryError: PostgreSQL refused the query.

    Examples:
        >>> batches = read_postgres("postgresql://postgres@127.0.0.1/test", after=1000)
        >>> next(batches).column_names[:3]  # doctest: +SKIP
        ['source_position', 'event_id', 'event_type']
    """
    check_batch_size(batch_size, after)
    mapped = _mapping(columns, EVENT_COLUMNS)
    with connect(dsn) as connection:
        settling, json_checked = _events(connection, mapped, table, schema)
        with checker_connection() as checker:
            done: Callable[[pa.Table], pa.Table]
            done = partial(finish, checker=checker, json_checked=json_checked)
            if row_hashes:
                settling, done = hashing(connection, settling, done)
            return (
                yield from read_settled(
                    connection,
                    settling,
                    after=after,
                    batch_size=batch_size,
                    finish=done,
                    seconds=settle_seconds,
                )
            )


def _events(
    connection: Connection,
    mapped: Mapping[str, str | None],
    table: str,
    schema: str | None,
    *,
    ordered: bool = True,
) -> tuple[Source, bool]:
    """The table as :func:`read_settled` reads it, and whether its JSON needs no check (not
    ordered: its rows in any order, for an aggregate over them)."""
    position = mapped["source_position"]
    if position is None:
        raise EsWorkbenchError("columns= must name the source_position column, for example 'id'")
    source = table_name(table, schema)
    types = column_types(connection, source)
    _missing(mapped.values(), types, table)
    kinds = {types.get(mapped[n] or "", "jsonb") for n in ("data", "metadata")}
    items = [
        _typed(position, "bigint"),
        *(_typed(mapped[n], "text") for n in _TEXT_COLUMNS),
        _typed(mapped["version"], "bigint"),
        _timestamp(mapped["recorded_at"], types, table),
        _timestamp(mapped["occurred_at"], types, table),
        _typed(mapped["schema_version"], "bigint"),
        _typed(mapped["data"], "text"),
        _typed(mapped["metadata"], "text"),
        *(_typed(mapped[n], "text") for n in _PROMOTED),
    ]
    selected = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(item, sql.Identifier(name))
        for item, name in zip(items, EVENT_COLUMNS, strict=True)
    )
    p = sql.Identifier(position)

    def rows(past: int, upto: int | None) -> str:
        query = sql.SQL("SELECT {items} FROM {source} WHERE {where} {order}")
        where = between(p, past, upto)
        order = sql.SQL("ORDER BY {}").format(p) if ordered else sql.SQL("")
        return query.format(items=selected, source=source, where=where, order=order).as_string()

    highest = sql.SQL("SELECT max({p})::bigint FROM {source}").format(p=p, source=source)
    return Source([source.as_string()], highest.as_string(), rows), kinds <= _JSON_TYPES


def postgres_digest(
    dsn: str,
    positions: Sequence[int],
    *,
    table: str = "events",
    schema: str | None = None,
    columns: Mapping[str, str | None] | None = None,
) -> list[tuple[int, int]]:
    """For each position (ascending), the rows up to it and the sum of their hashes, as
    ``read_postgres(..., row_hashes=True)`` gives them; one aggregate in the database.

    An importer compares them with what it read, to notice rows changed under its checkpoint
    (see :mod:`esworkbench.sources._digest_sql`).

    Examples:
        >>> postgres_digest("postgresql://postgres@127.0.0.1/test", [2, 4])  # doctest: +SKIP
        [(2, 9254160437093526161), (4, 1317471062914911740)]
    """
    mapped = _mapping(columns, EVENT_COLUMNS)
    with connect(dsn) as connection:
        settling, _ = _events(connection, mapped, table, schema, ordered=False)
        return sums(connection, settling.rows, positions)


def postgres_event_at(
    dsn: str,
    position: int,
    *,
    table: str = "events",
    schema: str | None = None,
    columns: Mapping[str, str | None] | None = None,
) -> str | None:
    """The event_id at a source position, as :func:`read_postgres` yields it, or None.

    An importer compares it with the event_id it imported at that position to notice that the
    source's history was rewritten.

    Examples:
        >>> postgres_event_at("postgresql://postgres@127.0.0.1/test", 42)  # doctest: +SKIP
        '6f2fe78d-6a8e-4854-84ca-f6a9c2b4f17c'
    """
    mapped = _mapping(columns, EVENT_COLUMNS)
    if mapped["source_position"] is None or mapped["event_id"] is None:
        raise EsWorkbenchError("columns= must name the source_position and event_id columns")
    query = sql.SQL("SELECT {e}::text FROM {t} WHERE {p} = $1").format(
        e=sql.Identifier(mapped["event_id"]),
        t=table_name(table, schema),
        p=sql.Identifier(mapped["source_position"]),
    )
    with connect(dsn) as connection:
        found = run(connection, query.as_string(), (int(position),)).column(0).to_pylist()
    return canonical_uuid(found[0]) if found else None


def read_postgres_snapshots(
    dsn: str,
    *,
    table: str = "snapshots",
    schema: str | None = None,
    columns: Mapping[str, str | None] | None = None,
    batch_size: int = 100_000,
) -> Iterator[pa.Table]:
    """Streams snapshots from ``snapshots(aggregate_id, version, data, timestamp)``.

    Args:
        dsn: a libpq URI or conninfo.
        table: the table of snapshots.
        schema: its schema; by default the search path decides.
        columns: field -> source column, overriding :data:`SNAPSHOT_COLUMNS` (aggregate_type
            may name a column; without one it is null).
        batch_size: the most rows in one table.

    Returns:
        Tables in :data:`SNAPSHOT_SOURCE_SCHEMA` ordered by (aggregate_id, version); ``state``
        is compact JSON text, exact as stored.

    Examples:
        >>> next(read_postgres_snapshots("postgresql://postgres@127.0.0.1/test"))  # doctest: +SKIP
    """
    check_batch_size(batch_size)
    mapped = _mapping(columns, SNAPSHOT_COLUMNS)
    with connect(dsn) as connection:
        source = table_name(table, schema)
        types = column_types(connection, source)
        _missing(mapped.values(), types, table)
        items = [
            _typed(mapped["aggregate_type"], "text"),
            _typed(mapped["aggregate_id"], "text"),
            _typed(mapped["version"], "bigint"),
            _typed(mapped["state"], "text"),
            _timestamp(mapped["taken_at"], types, table),
            sql.SQL("NULL::text"),
        ]
        order = [sql.Identifier(n) for n in (mapped["aggregate_id"], mapped["version"]) if n]
        query = sql.SQL("SELECT {items} FROM {source} ORDER BY {order}").format(
            items=sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(item, sql.Identifier(name))
                for item, name in zip(items, [*SNAPSHOT_COLUMNS, "metadata"], strict=True)
            ),
            source=source,
            order=sql.SQL(", ").join(order) if order else sql.SQL("1"),
        )
        checked = types.get(mapped["state"] or "", "") in _JSON_TYPES
        with checker_connection() as checker:
            for batch in stream(connection, query.as_string(), batch_size):
                yield finish_snapshots(batch, checker, json_checked=checked)
