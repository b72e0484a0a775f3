"""Read-only access to the eventsourcing library's recorders, in SQLite and in PostgreSQL.

Each recorder yields stored events as plain rows ``(position, originator_id, version, topic,
state)`` in batches, finds the first stored event of given aggregates, and reads snapshots; the
decoding of states is :mod:`esworkbench.sources.eventsourcing`'s concern.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import pyarrow as pa

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources import _sql
from esworkbench.sources._urls import redact

if TYPE_CHECKING:
    from psycopg import sql

__all__ = ["STORED", "Recorder", "Row", "find_app", "open_recorder", "stored_table"]

_HEX32: Final = re.compile(r"[0-9a-f]{32}")

Row = tuple[int | None, str, int, str, bytes]
"""A stored event or snapshot: position (None for snapshots), originator_id, version, topic,
state."""


class Recorder(Protocol):
    """What the readers need from a recorder."""

    def events(self, after: int, batch_size: int) -> Iterator[list[Row]]: ...
    def first_states(self, originator_ids: Sequence[str]) -> dict[str, bytes]: ...
    def snapshots(self, batch_size: int) -> Iterator[list[Row]]: ...
    def at(self, position: int) -> tuple[str, int] | None: ...
    def canonical_id(self, originator_id: str) -> str: ...
    def close(self) -> None: ...
    def stored(self, after: int, batch_size: int) -> Iterator[pa.Table]:
        """The stored events past ``after``, as stored, in tables of :data:`STORED`."""
        ...


STORED: Final = pa.schema(
    [
        pa.field("position", pa.int64()),
        pa.field("originator_id", pa.string()),
        pa.field("originator_version", pa.int64()),
        pa.field("topic", pa.string()),
        pa.field("state", pa.binary()),
    ]
)
"""Stored events as the library wrote them (see ``sources._recorder_hashes``)."""


def _array(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # A value of another type (a corrupt row): its text, the same every time it is read.
        return pa.array([None if v is None else repr(v) for v in values], pa.string())


def stored_table(rows: Sequence[Row]) -> pa.Table:
    """Stored events ``(position, originator_id, version, topic, state)`` as a table of
    :data:`STORED` (a column holding a value of another type becomes text).

    Examples:
        >>> stored_table([(1, "a1", 1, "m:A.Opened", b"{}")]).column_names
        ['position', 'originator_id', 'originator_version', 'topic', 'state']
    """
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in STORED]
    arrays = [_array(values, f.type) for values, f in zip(columns, STORED, strict=True)]
    return pa.Table.from_arrays(arrays, names=STORED.names)


class _SQLite:
    """The library's SQLite recorder: ``stored_events`` (rowid) and ``stored_snapshots``."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_file():
            raise EsWorkbenchError(
                f"no SQLite file at {path!r}. Hint: write sqlite:///relative.db or "
                "sqlite:////absolute/path.db, as in the application's SQLITE_DBNAME"
            )
        self.db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)

    def _batches(self, query: str, params: tuple[Any, ...], size: int) -> Iterator[list[Any]]:
        try:
            cursor = self.db.execute(query, params)
            while rows := cursor.fetchmany(size):
                yield rows
        except sqlite3.Error as exc:
            raise _refused(exc, query) from exc

    def events(self, after: int, batch_size: int) -> Iterator[list[Row]]:
        query = (
            "SELECT rowid, originator_id, originator_version, topic, state FROM stored_events "
            "WHERE rowid > ? ORDER BY rowid"
        )
        return self._batches(query, (after,), batch_size)

    def stored(self, after: int, batch_size: int) -> Iterator[pa.Table]:
        for rows in self.events(after, batch_size):
            yield stored_table(rows)

    def first_states(self, originator_ids: Sequence[str]) -> dict[str, bytes]:
        query = (
            "SELECT e.originator_id, e.state FROM stored_events e "
            "WHERE e.originator_id IN (SELECT value FROM json_each(?)) AND e.originator_version = "
            "(SELECT min(originator_version) FROM stored_events "
            "WHERE originator_id = e.originator_id)"
        )
        ids = json.dumps(list(originator_ids))
        return {row[0]: row[1] for rows in self._batches(query, (ids,), 10_000) for row in rows}

    def snapshots(self, batch_size: int) -> Iterator[list[Row]]:
        query = (
            "SELECT NULL, originator_id, originator_version, topic, state FROM stored_snapshots "
            "ORDER BY originator_id, originator_version"
        )
        return self._batches(query, (), batch_size)

    def at(self, position: int) -> tuple[str, int] | None:
        query = "SELECT originator_id, originator_version FROM stored_events WHERE rowid = ?"
        rows = [r for batch in self._batches(query, (position,), 1) for r in batch]
        return (rows[0][0], rows[0][1]) if rows else None

    def canonical_id(self, originator_id: str) -> str:
        """The library writes a UUID id as 32 lowercase hex digits: that becomes the UUID's
        canonical text; any other id (``ORIGINATOR_ID_TYPE=text``) stays exactly as written."""
        if len(originator_id) == 32 and _HEX32.fullmatch(originator_id):
            return str(uuid.UUID(originator_id))
        return originator_id

    def close(self) -> None:
        self.db.close()


def _refused(exc: Exception, query: str) -> EsWorkbenchError:
    return EsWorkbenchError(
        f"the eventsourcing database refused the query: {exc}\n  query: {query}\n"
        "Hint: check that the file names the application's database (its SQLITE_DBNAME)"
    )


class _Postgres:
    """The library's PostgreSQL recorder: ``<app>_events`` (notification_id) and snapshots."""

    def __init__(self, dsn: str, app: str | None, schema: str | None) -> None:
        _sql.require_postgres()
        from psycopg import sql

        prefix = (app or "stored").lower()
        self.events_table = _sql.table_name(f"{prefix}_events", schema)
        self.snapshots_table = _sql.table_name(f"{prefix}_snapshots", schema)
        self.connection = _sql.connect(dsn)
        try:
            types = _sql.column_types(self.connection, self.events_table)
            # Lookups run while a COPY streams events, which takes the other connection whole.
            self.lookups = _sql.connect(dsn)
        except BaseException:
            self.connection.close()
            raise
        self.id_type = sql.SQL("uuid" if types.get("originator_id") == "uuid" else "text")

    def _select(self, table: sql.Composable, position: str, where: str) -> str:
        from psycopg import sql

        return (
            sql.SQL(
                "SELECT {p}, originator_id::text, originator_version, topic, state FROM {t} {w}"
            )
            .format(p=sql.SQL(position), t=table, w=sql.SQL(where))
            .as_string()
        )

    def _rows(self, query: str, batch_size: int) -> Iterator[list[Row]]:
        for batch in _sql.stream(self.connection, query, batch_size):
            yield list(zip(*(c.to_pylist() for c in batch.columns), strict=True))

    def events(self, after: int, batch_size: int) -> Iterator[list[Row]]:
        where = f"WHERE notification_id > {int(after)} ORDER BY notification_id"
        return self._rows(self._select(self.events_table, "notification_id", where), batch_size)

    def stored(self, after: int, batch_size: int) -> Iterator[pa.Table]:
        # Arrow as fetched, not through Python rows: the same table stored_table makes of them.
        where = f"WHERE notification_id > {int(after)} ORDER BY notification_id"
        query = self._select(self.events_table, "notification_id", where)
        for batch in _sql.stream(self.connection, query, batch_size):
            yield batch.rename_columns(STORED.names).cast(STORED)

    def first_states(self, originator_ids: Sequence[str]) -> dict[str, bytes]:
        from psycopg import sql

        query = sql.SQL(
            "SELECT f.originator_id::text, f.state FROM jsonb_array_elements_text($1::jsonb) i(id) "
            "CROSS JOIN LATERAL (SELECT originator_id, state FROM {t} WHERE originator_id = "
            "i.id::{k} ORDER BY originator_version LIMIT 1) f"
        ).format(t=self.events_table, k=self.id_type)
        found = _sql.run(self.lookups, query.as_string(), (json.dumps(list(originator_ids)),))
        return dict(zip(*(c.to_pylist() for c in found.columns), strict=True))

    def snapshots(self, batch_size: int) -> Iterator[list[Row]]:
        where = "ORDER BY originator_id, originator_version"
        return self._rows(self._select(self.snapshots_table, "NULL::bigint", where), batch_size)

    def at(self, position: int) -> tuple[str, int] | None:
        from psycopg import sql

        query = sql.SQL(
            "SELECT originator_id::text, originator_version FROM {t} WHERE notification_id = $1"
        ).format(t=self.events_table)
        rows = _sql.run(self.connection, query.as_string(), (int(position),)).to_pylist()
        return (rows[0]["originator_id"], rows[0]["originator_version"]) if rows else None

    def canonical_id(self, originator_id: str) -> str:
        """A ``uuid`` column reads as canonical text already; a ``text`` column's ids
        (``ORIGINATOR_ID_TYPE=text``) stay exactly as written."""
        return originator_id

    def close(self) -> None:
        self.connection.close()
        self.lookups.close()


def open_recorder(source: str | os.PathLike[str], app: str | None, schema: str | None) -> Recorder:
    """The recorder ``source`` names: ``sqlite:///path`` or a path for SQLite; a PostgreSQL URI
    (``postgresql://...``) or conninfo (``host=... dbname=...``) for PostgreSQL."""
    if isinstance(source, os.PathLike):
        return _SQLite(os.fspath(source))
    if source.startswith("sqlite:///"):
        return _SQLite(source.removeprefix("sqlite:///"))
    if source.startswith(("postgresql://", "postgres://")) or "=" in source:
        return _Postgres(source, app, schema)
    return _SQLite(source)


# The columns of the library's PostgreSQL events table, by which its tables are told from others.
_RECORDER_COLUMNS: Final = (
    "notification_id",
    "originator_id",
    "originator_version",
    "topic",
    "state",
)


def find_app(source: str, app: str | None, schema: str | None) -> tuple[str | None, str]:
    """The (schema, application) whose tables an eventsourcing import reads.

    In PostgreSQL, the library names its tables after the application in lower case
    (``bankaccounts_events`` for ``BankAccounts``): the table is looked up in ``schema``, or in
    the schemas of the search path, and when ``app`` is None the database must hold exactly one
    application's tables. So naming the application (in any case) and finding it give the same
    answer. SQLite has one ``stored_events`` whatever the application: (None, "stored").

    Raises:
        EsWorkbenchError: no such table, or several (the message names them).

    Examples:
        >>> find_app("sqlite:///bank.db", "Bank", None)
        (None, 'stored')
    """
    if not source.startswith(("postgresql://", "postgres://")):
        return None, "stored"
    conditions = [
        "c.table_schema = $1" if schema else "c.table_schema = ANY(current_schemas(false))"
    ]
    params: tuple[object, ...] = (schema,) if schema else ()
    if app is not None:
        conditions.append(f"c.table_name = ${len(params) + 1}")
        params = (*params, f"{app.lower()}_events")
    wanted = ", ".join(f"'{name}'" for name in _RECORDER_COLUMNS)  # constants, not user text
    query = (
        "SELECT c.table_schema, c.table_name FROM information_schema.columns c "
        f"WHERE {' AND '.join(conditions)} AND c.table_name LIKE '%\\_events' "
        f"AND c.column_name IN ({wanted}) GROUP BY c.table_schema, c.table_name "
        f"HAVING count(*) = {len(_RECORDER_COLUMNS)} "
        "ORDER BY array_position(current_schemas(false), c.table_schema::name), 1, 2"
    )
    connection = _sql.connect(source)
    try:
        found = _sql.run(connection, query, params).to_pylist()
    finally:
        connection.close()
    tables = [
        (str(row["table_schema"]), str(row["table_name"])[: -len("_events")]) for row in found
    ]
    if app is not None and tables:
        return tables[0]  # the first schema of the search path that holds it, as PostgreSQL would
    if len(tables) == 1:
        return tables[0]
    place = f"schema {schema!r}" if schema else "the schemas of the search path"
    if not tables:
        named = f"{app.lower()}_events" if app else "<app>_events"
        raise EsWorkbenchError(
            f"no table of the eventsourcing library's PostgreSQL recorder ({named} with "
            f"notification_id, originator_id, originator_version, topic, state) in {place} of "
            f"{redact(source)}. Hint: pass table='<application name>', or "
            "table='<schema>.<application name>' for a POSTGRES_SCHEMA"
        )
    names = ", ".join(f"{s}.{a}" if schema is None else a for s, a in tables)
    raise EsWorkbenchError(
        f"{place} of {redact(source)} holds the tables of {len(tables)} applications: "
        f"{names}. Hint: pass table= with the one to import"
    )
