"""Reading the event store that Marten (.NET) keeps in PostgreSQL.

Marten writes one row per event to ``mt_events`` (``seq_id``, ``id``, ``stream_id``,
``version``, ``data`` jsonb, ``type``, ``timestamp``, ``tenant_id``, ``mt_dotnet_type``, and
when its metadata columns are on, ``correlation_id``, ``causation_id`` and ``headers`` jsonb;
newer versions add ``is_archived``) and one row per stream to ``mt_streams`` (``id``, ``type``,
``version``, ``timestamp``, ``snapshot``, ``snapshot_version``, ``created``, ``tenant_id``,
``is_archived``).
Each event becomes one row of :data:`~esworkbench.sources._rows.SOURCE_SCHEMA`:

- ``source_position`` is ``seq_id``; ``event_id`` is ``id``; ``aggregate_id`` is ``stream_id``
  (a UUID, or the string key of streams identified by strings), and under Marten's conjoined
  tenancy (``mt_streams`` keyed by ``tenant_id`` and ``id``, where two tenants may hold streams
  of one id) ``<tenant_id>/<stream_id>``; ``version`` is ``version``;
  ``recorded_at`` and ``occurred_at`` are ``timestamp``.
- ``event_type`` is ``type`` as Marten wrote it: the snake_case alias (``money_deposited``).
- ``aggregate_type`` is the class name in ``mt_streams.type`` (``Bank.Account, Bank`` ->
  ``Account``); streams started without a type take ``default_aggregate_type``.
- ``metadata`` keeps ``tenant_id``, ``mt_dotnet_type``, ``headers``, the stream's full type as
  ``stream_type``, and ``is_archived`` when true.
- ``correlation_id`` and ``causation_id`` come from their columns, else from the headers;
  ``user_id`` from the headers (``userId``, ``user_id`` or ``UserId``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Final

import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources import _sql
from esworkbench.sources._digest_sql import hashing, sums
from esworkbench.sources._settled import Source, Unsettled, between, read_settled

if TYPE_CHECKING:
    from adbc_driver_manager.dbapi import Connection

__all__ = ["marten_digest", "marten_event_at", "read_marten", "read_marten_snapshots"]

_HEADER_KEYS: Final = {
    "correlation_id": ("correlationId", "correlation_id", "CorrelationId"),
    "causation_id": ("causationId", "causation_id", "CausationId"),
    "user_id": ("userId", "user_id", "UserId"),
}
# The class name in a .NET type name: no assembly, no namespace, no enclosing class.
_CLASS_NAME: Final = "regexp_replace(split_part({}, ',', 1), '^.*[.+]', '')"


def _tables(schema: str) -> tuple[sql.Identifier, sql.Identifier]:
    return sql.Identifier(schema, "mt_events"), sql.Identifier(schema, "mt_streams")


def _optional(columns: dict[str, str], name: str, kind: str) -> sql.Composable:
    """An optional column of mt_events (Marten's metadata columns are off by default)."""
    if name not in columns:
        return sql.SQL("NULL::{}").format(sql.SQL(kind))
    return sql.SQL("e.{}::{}").format(sql.Identifier(name), sql.SQL(kind))


def _events_query(
    columns: dict[str, str],
    events: sql.Identifier,
    after: int,
    upto: int | None,
    *,
    ordered: bool = True,
) -> str:
    """The events past ``after`` (up to ``upto``) in seq_id order, straight from the primary
    key: no join, no sort (not ordered: in any order, for an aggregate over them)."""
    return (
        sql.SQL(
            """SELECT e.seq_id::bigint AS source_position, e.id::text AS event_id,
                e.type::text AS event_type, e.stream_id::text AS aggregate_id,
                e.version::bigint AS version,
                CASE WHEN isfinite(e.timestamp) THEN e.timestamp END AS recorded_at,
                e.data::text AS data, {tenant} AS tenant_id, {dotnet} AS mt_dotnet_type,
                {headers} AS headers, {archived} AS is_archived,
                {correlation} AS correlation_id, {causation} AS causation_id
            FROM {events} e WHERE {where} {order}"""
        )
        .format(
            tenant=_optional(columns, "tenant_id", "text"),
            dotnet=_optional(columns, "mt_dotnet_type", "text"),
            headers=_optional(columns, "headers", "text"),
            archived=_optional(columns, "is_archived", "boolean"),
            correlation=_optional(columns, "correlation_id", "text"),
            causation=_optional(columns, "causation_id", "text"),
            events=events,
            where=between(sql.SQL("e.seq_id"), after, upto),
            order=sql.SQL("ORDER BY e.seq_id" if ordered else ""),
        )
        .as_string()
    )


class _StreamTypes:
    """Finds mt_streams.type for the streams of each batch (one query per batch, by primary key).

    ``connection`` must not be the one streaming the events: a COPY in progress takes it whole.
    """

    def __init__(self, connection: Connection, streams: sql.Identifier) -> None:
        self.connection = connection
        columns = _sql.column_types(connection, streams)
        self.tenanted = "tenant_id" in columns
        self.query = (
            sql.SQL(
                "SELECT id::text AS id, {tenant} AS tenant_id, {kind} AS stream_type FROM {t} "
                "WHERE id IN (SELECT x::{id_type} FROM jsonb_array_elements_text($1::jsonb) x)"
            )
            .format(
                tenant=sql.SQL("tenant_id::text" if self.tenanted else "NULL::text"),
                kind=sql.SQL("type::text" if "type" in columns else "NULL::text"),
                t=streams,
                id_type=sql.SQL("uuid" if columns.get("id") == "uuid" else "text"),
            )
            .as_string()
        )

    def add_to(self, batch: pa.Table) -> pa.Table:
        """``batch`` with ``stream_type`` and its class name ``stream_class`` (null: none known)."""
        ids = pc.unique(batch["aggregate_id"].drop_null()).to_pylist()
        found = _sql.run(self.connection, self.query, (json.dumps(ids),))
        index = pc.index_in(self._keys(batch), value_set=self._keys(found))
        kinds = found["stream_type"].combine_chunks()
        return batch.append_column("stream_type", pc.take(kinds, index)).append_column(
            "stream_class", pc.take(_class(kinds), index)
        )

    def _keys(self, table: pa.Table) -> pa.Array:
        """Stream id, with its tenant where streams are per tenant (conjoined tenancy)."""
        ids = table["aggregate_id" if "aggregate_id" in table.column_names else "id"]
        if not self.tenanted:
            return ids.combine_chunks()
        tenants = pc.fill_null(table["tenant_id"], "")
        return pc.binary_join_element_wise(tenants, ids, "\x1f").combine_chunks()


def _class(stream_types: pa.Array) -> pa.Array:
    """The class name of .NET type names: ``Bank.Domain.Account, Bank`` -> ``Account``.

    Examples:
        >>> _class(pa.array(["Bank.Domain.Account, Bank", "Shop.Orders+Order", "order", None]))
        ... # doctest: +ELLIPSIS
        <pyarrow.lib.StringArray object at ...>
        [
          "Account",
          "Order",
          "order",
          null
        ]
    """
    names = pc.replace_substring_regex(stream_types, pattern=",.*", replacement="")
    names = pc.replace_substring_regex(names, pattern="^.*[.+]", replacement="")
    return pc.if_else(pc.equal(names, ""), pa.scalar(None, pa.string()), names)


# The canonical columns from a batch of _events_query plus stream_type and stream_class. The
# metadata is written compact here (to_json quotes strings exactly; headers, from jsonb, are made
# compact), so the finishing pass need not scan it: .NET type names are full of ", ".
_SHAPE: Final = f"""
SELECT source_position, event_id, event_type,
    coalesce(stream_class, $default) AS aggregate_type,
    CASE WHEN $conjoined THEN tenant_id || '/' || aggregate_id ELSE aggregate_id END
        AS aggregate_id, version, recorded_at, NULL::TIMESTAMPTZ AS occurred_at,
    NULL::BIGINT AS schema_version, data,
    '{{' || concat_ws(',',
        '"tenant_id":' || to_json(tenant_id)::VARCHAR,
        '"mt_dotnet_type":' || to_json(mt_dotnet_type)::VARCHAR,
        '"headers":' || {_sql.minify("headers")},
        '"stream_type":' || to_json(stream_type)::VARCHAR,
        CASE WHEN is_archived THEN '"is_archived":true' END) || '}}' AS metadata,
    coalesce(correlation_id, _h[1], _h[2], _h[3]) AS correlation_id,
    coalesce(causation_id, _h[4], _h[5], _h[6]) AS causation_id,
    coalesce(_h[7], _h[8], _h[9]) AS user_id
FROM (
    SELECT *, CASE WHEN headers IS NOT NULL THEN json_extract_string(headers,
        [{", ".join(f"'$.{k}'" for keys in _HEADER_KEYS.values() for k in keys)}]) END AS _h
    FROM {_sql.BATCH}
)
"""


def read_marten(
    dsn: str,
    *,
    schema: str = "public",
    after: int = 0,
    batch_size: int = 100_000,
    default_aggregate_type: str | None = None,
    settle_seconds: float | None = None,
    row_hashes: bool = False,
) -> Generator[pa.Table, None, Unsettled | None]:
    """Streams the events of a Marten event store in ``seq_id`` order.

    Only settled positions are read: a gap in ``seq_id`` is passed once no transaction that
    could still fill it is running (one holding a write lock on ``mt_events`` or on
    ``mt_events_sequence``; see :mod:`esworkbench.sources._settled`), so an event whose
    transaction commits late is read by a later call, never skipped.

    Args:
        dsn: a libpq URI or conninfo of the database Marten writes to.
        schema: the schema of ``mt_events`` and ``mt_streams`` (Marten's DatabaseSchemaName).
        after: read only events whose ``seq_id`` is greater.
        batch_size: the most rows in one table.
        default_aggregate_type: the aggregate_type of streams whose ``mt_streams.type`` is null
            (streams started without an aggregate type); without it they are error rows.
        settle_seconds: how long to wait at a gap for the transactions that may fill it
            (default :data:`~esworkbench.sources._settled.SETTLE_SECONDS`).
        row_hashes: add the hash of each ``mt_events`` row, computed by PostgreSQL, as a last
            column ``_esw_row_hash`` (see :func:`marten_digest`).

    Returns:
        Tables in :data:`~esworkbench.sources._rows.SOURCE_SCHEMA`, one row per event; data is
        compact JSON with numbers as stored; rows that cannot be events name field and reason in
        ``error``. The generator returns None, or an
        :class:`~esworkbench.sources._settled.Unsettled` when it stopped at a gap that a running
        transaction may still fill.

    Raises:
        EsWorkbenchError: the database cannot be reached or has no Marten tables in ``schema``.

    Examples:
        >>> next(read_marten("postgresql://postgres@127.0.0.1/shop"))  # doctest: +SKIP
    """
    _sql.check_batch_size(batch_size, after)
    events, streams = _tables(schema)
    hints = {
        "aggregate_type": "mt_streams has no type for the stream; "
        "pass default_aggregate_type= to name one"
    }
    with _sql.connect(dsn) as connection, _sql.connect(dsn) as lookups:
        columns = _columns(connection, events, schema)
        types = _StreamTypes(lookups, streams)
        conjoined = _conjoined(connection, streams)
        source = Source(
            [events.as_string(), sql.Identifier(schema, "mt_events_sequence").as_string()],
            sql.SQL("SELECT max(seq_id)::bigint FROM {}").format(events).as_string(),
            lambda past, upto: _events_query(columns, events, past, upto),
        )
        with _sql.checker_connection() as checker:

            def finish(batch: pa.Table) -> pa.Table:
                return _sql.finish(
                    types.add_to(batch),
                    checker,
                    json_checked=columns["data"] in ("json", "jsonb"),
                    hints=hints,
                    shape=_SHAPE,
                    params={"default": default_aggregate_type, "conjoined": conjoined},
                    metadata_compact=True,
                )

            done: Callable[[pa.Table], pa.Table] = finish
            if row_hashes:
                source, done = hashing(connection, source, finish)
            return (
                yield from read_settled(
                    connection,
                    source,
                    after=after,
                    batch_size=batch_size,
                    finish=done,
                    seconds=settle_seconds,
                )
            )


def _conjoined(connection: Connection, streams: sql.Identifier) -> bool:
    """Whether streams are per tenant: Marten's conjoined tenancy keys mt_streams by
    (tenant_id, id), so one stream id may name a stream in each tenant."""
    query = sql.SQL(
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = {}::regclass AND i.indisprimary "
        "AND a.attname = 'tenant_id'"
    ).format(sql.Literal(streams.as_string()))
    return bool(_sql.run(connection, query.as_string()).column(0)[0].as_py())


def _columns(connection: Connection, events: sql.Identifier, schema: str) -> dict[str, str]:
    columns = _sql.column_types(connection, events)
    missing = {"seq_id", "id", "stream_id", "version", "data", "type", "timestamp"} - set(columns)
    if missing:
        raise EsWorkbenchError(
            f"{schema}.mt_events lacks the columns {', '.join(sorted(missing))}, so it is not "
            "Marten's events table. Hint: pass schema= as Marten's DatabaseSchemaName"
        )
    if columns["timestamp"] != "timestamptz":
        raise EsWorkbenchError(
            f"{schema}.mt_events.timestamp has type {columns['timestamp']}, not timestamptz. "
            "Hint: Marten writes timestamptz; read a view that converts the column"
        )
    return columns


def marten_digest(
    dsn: str, positions: Sequence[int], *, schema: str = "public"
) -> list[tuple[int, int]]:
    """For each position (ascending), the ``mt_events`` rows up to it and the sum of their
    hashes, as ``read_marten(..., row_hashes=True)`` gives them; one aggregate in the database.

    Examples:
        >>> marten_digest("postgresql://postgres@127.0.0.1/shop", [7])  # doctest: +SKIP
        [(7, 4021776391412866262)]
    """
    events, _ = _tables(schema)
    with _sql.connect(dsn) as connection:
        columns = _columns(connection, events, schema)
        return sums(
            connection,
            lambda past, upto: _events_query(columns, events, past, upto, ordered=False),
            positions,
        )


def marten_event_at(dsn: str, position: int, *, schema: str = "public") -> str | None:
    """The event_id (``mt_events.id``) at ``seq_id`` = position, or None.

    Examples:
        >>> marten_event_at("postgresql://postgres@127.0.0.1/shop", 7)  # doctest: +SKIP
        '3f1a7e0c-94a4-4fb2-9d0e-0c6c3b1c52a1'
    """
    events, _ = _tables(schema)
    query = sql.SQL("SELECT id::text FROM {} WHERE seq_id = $1").format(events)
    with _sql.connect(dsn) as connection:
        found = _sql.run(connection, query.as_string(), (int(position),)).column(0)
    return _sql.canonical_uuid(found[0].as_py()) if len(found) else None


def read_marten_snapshots(
    dsn: str, *, schema: str = "public", batch_size: int = 100_000
) -> Iterator[pa.Table]:
    """Streams the snapshots Marten keeps in ``mt_streams.snapshot``, ordered by stream id.

    ``version`` is ``snapshot_version`` and ``taken_at`` the stream's ``timestamp`` (when Marten
    last wrote the stream row); ``metadata`` keeps ``tenant_id`` and the full ``stream_type``.

    Returns:
        Tables in :data:`~esworkbench.sources._sql.SNAPSHOT_SOURCE_SCHEMA`.
    """
    _sql.check_batch_size(batch_size)
    _, streams = _tables(schema)
    with _sql.connect(dsn) as connection:
        columns = _sql.column_types(connection, streams)
        if not {"snapshot", "snapshot_version", "type"} <= set(columns):
            raise EsWorkbenchError(
                f"{schema}.mt_streams has no snapshot columns. Hint: Marten keeps snapshots "
                "there from version 7 on; earlier ones keep them as documents"
            )
        tenant = sql.SQL("'tenant_id', tenant_id, " if "tenant_id" in columns else "")
        key = "tenant_id || '/' || id::text" if _conjoined(connection, streams) else "id::text"
        query = sql.SQL(
            """SELECT {class_name} AS aggregate_type, {key} AS aggregate_id,
                snapshot_version::bigint AS version, snapshot::text AS state,
                CASE WHEN isfinite(timestamp) THEN timestamp END AS taken_at,
                jsonb_strip_nulls(jsonb_build_object({tenant}'stream_type', type))::text
                    AS metadata
            FROM {streams} WHERE snapshot IS NOT NULL ORDER BY id"""
        ).format(
            class_name=sql.SQL(_CLASS_NAME).format(sql.SQL("type")),
            key=sql.SQL(key),
            tenant=tenant,
            streams=streams,
        )
        with _sql.checker_connection() as checker:
            for batch in _sql.stream(connection, query.as_string(), batch_size):
                yield _sql.finish_snapshots(batch, checker, json_checked=True)
