"""What the PostgreSQL sources share: ADBC transport, and a DuckDB pass making batches canonical.

Transport, chosen by measurement (1M events of ``esworkbench.demo``, 2 cores, server on the same
machine, 100k-row batches, raw fetch into Arrow): ADBC (``adbc-driver-postgresql``, which runs
``COPY ... TO STDOUT (FORMAT binary)`` and decodes it in C) about 450k rows/s and 260 MiB peak;
psycopg ``COPY ... (FORMAT csv)`` parsed by ``pyarrow.csv`` about 420k rows/s and 270 MiB; psycopg's
binary COPY row by row about 130k rows/s; a server-side cursor about 120k rows/s and 470 MiB. ADBC
streams only queries without bound parameters (with parameters it buffers the whole result), so
streaming queries carry their one value, an integer position, as a :class:`psycopg.sql.Literal`.

The canonical pass runs in DuckDB over each fetched batch: JSON text made compact without
re-encoding numbers (see :func:`minify`), UUIDs made canonical, correlation, causation and user
ids promoted from metadata, and one ``error`` per row naming each bad field and why.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Final

import duckdb
import pyarrow as pa

from esworkbench.errors import EsWorkbenchError, QueryError
from esworkbench.events import TIMESTAMP
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources._stage import rebatch

if TYPE_CHECKING:
    from adbc_driver_manager.dbapi import Connection
    from psycopg import sql

__all__ = [
    "BATCH",
    "SNAPSHOT_SOURCE_SCHEMA",
    "canonical_uuid",
    "check_batch_size",
    "checker_connection",
    "column_types",
    "connect",
    "finish",
    "finish_snapshots",
    "minify",
    "require_postgres",
    "run",
    "stream",
    "table_name",
]

SNAPSHOT_SOURCE_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("aggregate_type", pa.string()),
        pa.field("aggregate_id", pa.string()),
        pa.field("version", pa.int64()),
        pa.field("state", pa.string()),
        pa.field("taken_at", TIMESTAMP),
        pa.field("metadata", pa.string()),
        pa.field("error", pa.string()),
    ]
)
"""What snapshot readers yield: an aggregate's state at a version, or why it is unreadable."""

_TEXT_COLUMNS: Final = ("event_id", "event_type", "aggregate_type", "aggregate_id")
BATCH: Final = "_esw_source_batch"
"""The name under which a batch is registered in the checker connection."""
_UUID: Final = "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'"
# JSON text as PostgreSQL prints jsonb has exactly one space after each structural comma and
# colon and no other whitespace outside strings, so two plain replaces make it compact. A row
# needs the full scan when a string holds ", " or ": ", or other whitespace lies outside strings.
_STRING: Final = r'"(?:[^"\\]|\\.)*'  # an opened JSON string: its quote and content
_NEEDS_SCAN: Final = (
    "'" + rf'^(?:[^"]|{_STRING}")*(?:{_STRING}(?:[,:] |" )|[\t\n\r]|(?:^|[^,:"]) )' + "'"
)
_WHITESPACE: Final = "'" + rf'({_STRING}")|[ \t\n\r]+' + "'"
_METADATA_PATHS: Final = (
    "['$.correlationId', '$.correlation_id', '$.causationId', '$.causation_id', "
    "'$.userId', '$.user_id']"
)


def require_postgres() -> None:
    """Refuses a PostgreSQL source, with the install hint, when the postgres extra is missing.

    Examples:
        >>> require_postgres()  # installed here
    """
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError:
        raise EsWorkbenchError(
            "reading PostgreSQL needs the postgres extra (adbc-driver-postgresql and psycopg). "
            "Hint: pip install 'esworkbench[postgres]'"
        ) from None


def connect(dsn: str) -> Connection:
    """Opens an ADBC connection to PostgreSQL (a URI or ``key=value`` conninfo)."""
    require_postgres()
    import adbc_driver_postgresql.dbapi as adbc

    try:
        connection: Connection = adbc.connect(dsn)
    except adbc.Error as exc:
        raise EsWorkbenchError(
            f"cannot connect to PostgreSQL: {_first_line(exc)}. Hint: check the DSN, for example "
            "'postgresql://user@127.0.0.1:5432/dbname', and that the server accepts connections"
        ) from exc
    return connection


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run(connection: Connection, query: str, params: tuple[object, ...] = ()) -> pa.Table:
    """Runs a small query and returns its whole result (bound parameters buffer the result)."""
    import adbc_driver_manager.dbapi as dbapi

    with connection.cursor() as cursor:
        try:
            cursor.execute(query, params or None)
            return cursor.fetch_arrow_table()
        except dbapi.Error as exc:
            raise _refused(exc, query) from exc


def _refused(exc: BaseException, query: str) -> QueryError:
    return QueryError(
        f"PostgreSQL refused the query: {_first_line(exc)}\n  query: {query}\n"
        "Hint: check table=, schema= and columns= against the database",
        query=query,
    )


def stream(connection: Connection, query: str, batch_size: int) -> Generator[pa.Table, None, None]:
    """Runs a query without parameters and yields its rows as tables of at most batch_size.

    Closing the iterator early cancels the query, so the connection can run the next one at once.
    """
    import adbc_driver_manager.dbapi as dbapi

    with connection.cursor() as cursor:
        try:
            cursor.execute(query)
            reader = cursor.fetch_record_batch()
        except dbapi.Error as exc:
            raise _refused(exc, query) from exc
        try:
            yield from rebatch(reader, batch_size)
        except GeneratorExit:  # closed early: cancel the rest, or the connection drains it
            cursor.adbc_cancel()
            raise
        except (OSError, pa.ArrowException) as exc:
            raise EsWorkbenchError(
                f"PostgreSQL stopped sending rows: {_first_line(exc)}. Hint: run again; the rows "
                "already yielded are complete, so after= can resume past the last position"
            ) from exc


def check_batch_size(batch_size: int, after: int = 0) -> None:
    """Refuses a batch_size < 1 or a negative ``after`` before any connection is made."""
    for name, value, low in (("batch_size", batch_size, 1), ("after", after, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EsWorkbenchError(f"{name} must be an integer >= {low}, got {value!r}")


def table_name(table: str, schema: str | None) -> sql.Identifier:
    """The quoted name of a table, qualified by its schema when one is given."""
    from psycopg import sql  # the postgres extra: only PostgreSQL sources reach here

    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def column_types(connection: Connection, source: sql.Composable) -> dict[str, str]:
    """Column name -> PostgreSQL type name of a table (asks for no rows)."""
    from psycopg import sql

    query = sql.SQL("SELECT * FROM {} LIMIT 0").format(source).as_string()
    schema = run(connection, query).schema
    return {f.name: (f.metadata or {}).get(b"POSTGRESQL:type", b"").decode() for f in schema}


def checker_connection() -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB connection that checks batches (instants shown in UTC).

    Its queries keep the rows in source order without sorting them: DuckDB preserves insertion
    order unless told not to (a sort would hold another copy of the batch).
    """
    checker = duckdb.connect()
    checker.execute("SET TimeZone = 'UTC'")
    checker.execute("SET preserve_insertion_order = true")
    return checker


def minify(column: str) -> str:
    """DuckDB SQL that makes the JSON text in ``column`` compact without touching its values.

    Examples:
        >>> text = '{"a": 1.10, "b": "x, y", "c": [1, {"d": "e: f"}]}'
        >>> duckdb.sql(f"select {minify('j')} from (select $j as j)", params={"j": text}).fetchall()
        [('{"a":1.10,"b":"x, y","c":[1,{"d":"e: f"}]}',)]
    """
    return (
        f"CASE WHEN regexp_matches({column}, {_NEEDS_SCAN}) "
        f"THEN regexp_replace({column}, {_WHITESPACE}, '\\1', 'g') "
        f"ELSE replace(replace({column}, ', ', ','), ': ', ':') END"
    )


def _json_error(field: str, column: str, *, required: bool, checked: bool) -> str:
    """SQL for the error of a JSON-object column (NULL when it is fine)."""
    missing = f"'field ''{field}'': is missing'" if required else "NULL"
    invalid = (
        "" if checked else f"WHEN NOT json_valid({column}) THEN 'field ''{field}'': is not JSON'"
    )
    return f"""CASE WHEN {column} IS NULL THEN {missing} {invalid}
        WHEN NOT starts_with({column}, '{{') THEN 'field ''{field}'': must be a JSON object, got '
            || CASE json_type({column}) WHEN 'ARRAY' THEN 'an array' WHEN 'VARCHAR' THEN 'a string'
               WHEN 'NULL' THEN 'null' WHEN 'BOOLEAN' THEN {column} ELSE 'a number' END
        END"""


def _finish_query(
    *, json_checked: bool, hints: Mapping[str, str], source: str, metadata_compact: bool
) -> str:
    # JSON null metadata is no metadata, as a file's "metadata": null is (jsonb 'null' is not
    # SQL NULL).
    metadata = "metadata" if metadata_compact else minify("metadata")
    metadata = f"CASE WHEN {metadata} <> 'null' THEN {metadata} END"
    text_errors = [
        f"CASE WHEN {n} IS NULL OR {n} = '' THEN 'field ''{n}'': is missing or empty"
        f"{_quoted(hints[n]) if n in hints else ''}' END"
        for n in _TEXT_COLUMNS[1:]
    ]
    return f"""
    WITH compact AS (
        SELECT * EXCLUDE (event_id, data, metadata),
            CASE WHEN regexp_matches(event_id, {_UUID}) THEN event_id
                 ELSE coalesce(TRY_CAST(event_id AS UUID)::VARCHAR, event_id) END AS event_id,
            {minify("data")} AS data, {metadata} AS metadata,
            {_json_error("data", "data", required=True, checked=json_checked)} AS data_error,
            {_json_error("metadata", metadata, required=False, checked=json_checked)}
                AS metadata_error
        FROM ({source})
    ), promoted AS (
        SELECT *, CASE WHEN metadata_error IS NULL AND metadata IS NOT NULL
                       THEN json_extract_string(metadata, {_METADATA_PATHS}) END AS _m
        FROM compact
    )
    SELECT source_position, event_id, event_type, aggregate_type, aggregate_id, version,
        recorded_at, coalesce(occurred_at, recorded_at) AS occurred_at,
        TRY_CAST(coalesce(schema_version, 1) AS INTEGER) AS schema_version, data, metadata,
        coalesce(correlation_id, _m[1], _m[2]) AS correlation_id,
        coalesce(causation_id, _m[3], _m[4]) AS causation_id,
        coalesce(user_id, _m[5], _m[6]) AS user_id,
        nullif(concat_ws('; ',
            CASE WHEN NOT regexp_matches(event_id, {_UUID})
                 THEN 'field ''event_id'': is not a UUID: ' || event_id END,
            {", ".join(text_errors)},
            CASE WHEN version IS NULL THEN 'field ''version'': is missing'
                 WHEN version < 1 THEN 'field ''version'': must be >= 1, got ' || version END,
            CASE WHEN recorded_at IS NULL THEN 'field ''recorded_at'': is missing or infinite' END,
            CASE WHEN schema_version < 1 OR schema_version > 2147483647
                 THEN 'field ''schema_version'': must be from 1 to 2147483647, got '
                      || schema_version END,
            data_error, metadata_error), '') AS error
    FROM promoted
    """


def _quoted(text: str) -> str:
    return " (" + text.replace("'", "''") + ")"


def finish(
    batch: pa.Table,
    checker: duckdb.DuckDBPyConnection,
    *,
    json_checked: bool,
    hints: Mapping[str, str] | None = None,
    shape: str | None = None,
    params: Mapping[str, object] | None = None,
    metadata_compact: bool = False,
) -> pa.Table:
    """Makes a fetched batch canonical: compact JSON, canonical ids, promoted ids, errors.

    Args:
        batch: the rows as fetched: the columns of :data:`SOURCE_SCHEMA` but ``error``, unless
            ``shape`` makes them from other columns.
        checker: the reader's DuckDB connection (see :func:`checker_connection`).
        json_checked: data and metadata come from json or jsonb columns (or were built as JSON),
            so they need no check of their syntax.
        hints: per text field, why it may be missing and what to do.
        shape: a DuckDB SELECT over the table ``BATCH`` (the batch) that yields those columns, in
            the batch's row order (so: no joins).
        params: values bound to ``$name`` parameters of ``shape``.
        metadata_compact: ``shape`` writes metadata as compact JSON already.
    """
    batch = pa.table(_chunks(batch), names=batch.column_names)
    query = _finish_query(
        json_checked=json_checked,
        hints=hints or {},
        source=shape or f"SELECT * FROM {BATCH}",
        metadata_compact=metadata_compact,
    )
    checker.register(BATCH, batch)
    try:
        out = checker.sql(query, params=dict(params) if params else None).to_arrow_table()
    finally:
        checker.unregister(BATCH)
    return out.cast(SOURCE_SCHEMA)


def _chunks(table: pa.Table) -> list[pa.ChunkedArray]:
    """The columns of a table, extension types (json, uuid) replaced by their storage."""
    return [
        pa.chunked_array([c.storage for c in col.chunks], col.type.storage_type)
        if isinstance(col.type, pa.ExtensionType)
        else col
        for col in table.columns
    ]


def canonical_uuid(text: str | None) -> str | None:
    """A UUID in canonical text (lowercase, hyphenated); other text is returned as it is.

    Examples:
        >>> canonical_uuid("0F8FAD5B-D9CB-469F-A165-70867728950E"), canonical_uuid("acc-1")
        ('0f8fad5b-d9cb-469f-a165-70867728950e', 'acc-1')
    """
    if text is None:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def finish_snapshots(
    batch: pa.Table, checker: duckdb.DuckDBPyConnection, *, json_checked: bool
) -> pa.Table:
    """Makes fetched snapshot rows canonical: compact state, error per unreadable row.

    ``batch`` has the columns of :data:`SNAPSHOT_SOURCE_SCHEMA` but ``error``.
    """
    batch = pa.table(_chunks(batch), names=batch.column_names)
    valid = "" if json_checked else "WHEN NOT json_valid(state) THEN 'field ''state'': is not JSON'"
    query = f"""
    SELECT aggregate_type, aggregate_id, version, {minify("state")} AS state, taken_at,
        {minify("metadata")} AS metadata,
        nullif(concat_ws('; ',
            CASE WHEN aggregate_id IS NULL OR aggregate_id = ''
                 THEN 'field ''aggregate_id'': is missing or empty' END,
            CASE WHEN version IS NULL OR version < 1
                 THEN 'field ''version'': is missing or < 1' END,
            CASE WHEN state IS NULL THEN 'field ''state'': is missing' {valid} END,
            CASE WHEN taken_at IS NULL THEN 'field ''taken_at'': is missing or infinite' END
        ), '') AS error
    FROM {BATCH}
    """
    checker.register(BATCH, batch)
    try:
        out = checker.sql(query).to_arrow_table()
    finally:
        checker.unregister(BATCH)
    return out.cast(SNAPSHOT_SOURCE_SCHEMA)
