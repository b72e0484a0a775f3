"""Input checks: turn what a caller hands in into a canonical Arrow batch, or say what is wrong.

Dicts and :class:`~esworkbench.NewEvent` values are checked field by field in
:mod:`esworkbench.events`. Arrow tables are checked column-wise: one DuckDB pass finds the first
bad row (JSON objects, UUIDs, required fields), and defaults are filled with Arrow kernels, so a
batch of a million events never meets a Python loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Final

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import DuplicateEventError, InvalidEventError
from esworkbench.events import EVENT_SCHEMA, has_event_id, to_records
from esworkbench.query import Session

BATCH: Final = "_esw_batch"
_REQUIRED: Final = ("event_type", "aggregate_type", "aggregate_id", "data")
# Input columns: the canonical ones without position (assigned at commit), all nullable.
INPUT_SCHEMA: Final = pa.schema(
    [f.with_nullable(True) for f in EVENT_SCHEMA if f.name != "position"]
)
_CANONICAL_UUID: Final = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_UUID_RULE: Final = (
    "WHEN event_id IS NOT NULL AND TRY_CAST(event_id AS UUID) IS NULL THEN 'event_id'"
)

# One pass over the batch that finds the first row breaking a rule, with the rule's reason.
_FIRST_BAD_ROW: Final = """
SELECT _row, field, CASE
    WHEN field = 'data' AND json_valid(data) THEN 'must be a JSON object'
    WHEN field = 'metadata' AND json_valid(metadata) THEN 'must be a JSON object'
    WHEN field IN ('data', 'metadata') THEN 'is missing or not valid JSON'
    WHEN field = 'event_id' THEN 'is not a UUID'
    WHEN field IN ('version', 'schema_version') THEN 'must be >= 1'
    ELSE 'is missing or empty'
  END AS reason
FROM (
  SELECT _row, data, metadata, CASE
    WHEN event_type IS NULL OR event_type = '' THEN 'event_type'
    WHEN aggregate_type IS NULL OR aggregate_type = '' THEN 'aggregate_type'
    WHEN aggregate_id IS NULL OR aggregate_id = '' THEN 'aggregate_id'
    WHEN data IS NULL OR NOT json_valid(data) OR json_type(data) <> 'OBJECT' THEN 'data'
    WHEN metadata IS NOT NULL AND (NOT json_valid(metadata) OR json_type(metadata) <> 'OBJECT')
      THEN 'metadata'
    {uuid_rule}
    WHEN version IS NOT NULL AND version < 1 THEN 'version'
    WHEN schema_version IS NOT NULL AND schema_version < 1 THEN 'schema_version'
  END AS field
  FROM _esw_batch
) WHERE field IS NOT NULL ORDER BY _row
"""

_REPEATED_ID: Final = (
    "SELECT event_id FROM _esw_batch GROUP BY event_id HAVING count(*) > 1 LIMIT 1"
)

# Promotion of one column from metadata, for the rows that lack it. A row whose metadata holds
# neither the key's name nor a backslash-u escape (which could spell it) has no such key, so it
# is not parsed.
_PROMOTE: Final = """
CASE WHEN {column} IS NOT NULL THEN {column}
     WHEN contains(metadata, '{stem}') OR contains(metadata, '\\u')
       THEN coalesce(metadata->>'{camel}', metadata->>'{column}')
END
"""
_PROMOTED: Final = (
    ("correlation_id", "correlationId", "correlation"),
    ("causation_id", "causationId", "causation"),
    ("user_id", "userId", "user"),
)
_VALID_JSON: Final = (
    "SELECT count(*) FROM _esw_batch WHERE NOT json_valid(data) "
    "OR (metadata IS NOT NULL AND NOT json_valid(metadata))"
)


def check_bound(value: object, name: str) -> None:
    """Refuses a bound that is not an aware datetime."""
    if value is None:
        return
    if not isinstance(value, datetime):
        raise InvalidEventError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidEventError(
            f"{name}={value.isoformat()} is a naive datetime. "
            "Hint: give it a zone, for example datetime(..., tzinfo=UTC)"
        )


def check_expected(aggregate_id: object, expected: object) -> None:
    """Refuses a stream id or expected_version of the wrong kind before any work is done."""
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise InvalidEventError(
            f"aggregate_id must be a non-empty string, got {aggregate_id!r}", field="aggregate_id"
        )
    from esworkbench.store import ExpectedVersion

    if isinstance(expected, ExpectedVersion):
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidEventError(
            f"expected_version must be a version >= 0, esworkbench.ANY or "
            f"esworkbench.STREAM_EXISTS, got {expected!r}",
            field="expected_version",
        )


def with_row_numbers(table: pa.Table) -> pa.Table:
    """Adds ``_row``, the input order, which errors cite and positions follow."""
    return table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _from_records(records: Sequence[dict[str, Any]]) -> pa.Table:
    return with_row_numbers(pa.Table.from_pylist(list(records), schema=INPUT_SCHEMA))


def _coerce(table: pa.Table, tz: str | None) -> pa.Table:
    """Brings a user's Arrow table to the input schema, refusing what cannot be cast."""
    columns = []
    for target in INPUT_SCHEMA:
        if target.name not in table.column_names:
            if target.name in _REQUIRED:
                raise InvalidEventError(
                    f"the batch has no column {target.name!r}. Hint: columns are "
                    f"{', '.join(INPUT_SCHEMA.names)}",
                    field=target.name,
                )
            columns.append(pa.nulls(table.num_rows, target.type))
            continue
        column = table[target.name]
        if pa.types.is_timestamp(column.type) and column.type.tz is None:
            if tz is None:
                raise InvalidEventError(
                    f"column {target.name!r} holds naive timestamps. Hint: store them with a "
                    "zone, or name the zone with tz=",
                    field=target.name,
                )
            try:
                # "earliest" for a wall time that occurs twice, as datetime's fold=0 does.
                column = pc.assume_timezone(column, tz, ambiguous="earliest")
            except pa.ArrowInvalid as exc:
                raise InvalidEventError(
                    f"column {target.name!r} cannot be read in zone {tz!r}: {exc}. Hint: name an "
                    "IANA zone such as 'Europe/Berlin', and give wall times that exist in it",
                    field=target.name,
                ) from exc
        try:
            columns.append(column.cast(target.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidEventError(
                f"column {target.name!r} has type {column.type}, which cannot become "
                f"{target.type}: {exc}. Hint: convert the column first",
                field=target.name,
            ) from exc
    return with_row_numbers(pa.table(columns, schema=INPUT_SCHEMA).combine_chunks())


def canonical_batch(
    events: pa.Table | Iterable[object],
    session: Session,
    *,
    tz: str | None = None,
    aggregate_id: str | None = None,
    aggregate_type: str | None = None,
    checked: bool = False,
) -> tuple[pa.Table, bool]:
    """Checks a batch and returns it canonical, with whether any event_id came from the caller.

    ``checked=True`` skips the row checks of an Arrow batch that :func:`bad_rows` has passed.
    """
    if not isinstance(events, pa.Table):
        given = list(events)
        records = to_records(given, aggregate_id=aggregate_id, aggregate_type=aggregate_type, tz=tz)
        table = _from_records(records)
        _refuse_repeats(session, table)
        return table, any(map(has_event_id, given))
    table = _coerce(events, tz)
    ids = table["event_id"]
    supplied = ids.null_count < table.num_rows
    with session._lock, ThreadPoolExecutor(max_workers=1) as pool:
        connection = session.connection
        # JSON validity (one DuckDB pass) runs on its own cursor beside the column checks and
        # the promotion, which parse only rows that are valid or are refused below anyway.
        valid_json = None
        if not checked:  # the cursor is made here: a connection serves one thread at a time
            valid_json = pool.submit(_valid_json, connection.cursor(), table)
        canonical_ids = pc.all(pc.match_substring_regex(ids, _CANONICAL_UUID)).as_py() is not False
        try:
            promoted: dict[str, pa.Array] | None = _promoted(connection, table)
        except duckdb.Error:
            promoted = None  # malformed metadata: the exact query below names the row
        good = valid_json is None or (
            valid_json.result() and canonical_ids and promoted is not None and _plain(table)
        )
        if not good:
            query = _FIRST_BAD_ROW.format(uuid_rule="" if canonical_ids else _UUID_RULE)
            connection.register(BATCH, table)
            try:
                bad = connection.execute(query + " LIMIT 1").fetchall()
            finally:
                connection.unregister(BATCH)
            if bad:
                row, field, reason = bad[0]
                raise InvalidEventError(
                    f"event {row}: field {field!r} {reason}. Hint: fix the row and retry",
                    index=row,
                    field=field,
                )
        if promoted is None:
            promoted = _promoted(connection, table)
    out = _fill_defaults(table, promoted, canonical_ids)
    _refuse_repeats(session, out)
    return out, supplied


def _plain(table: pa.Table) -> bool:
    """Whether column checks prove every row good, given that all its JSON is valid; False
    means: ask the exact query. Valid JSON whose text starts with ``{`` is an object."""
    for name in ("event_type", "aggregate_type", "aggregate_id"):
        column = table[name]
        if column.null_count or pc.any(pc.equal(column, "")).as_py():
            return False
    data, metadata = table["data"], table["metadata"]
    if data.null_count or not pc.all(pc.starts_with(data, "{")).as_py():
        return False
    if pc.any(pc.invert(pc.starts_with(metadata, "{"))).as_py():
        return False
    return not any(
        pc.any(pc.less(table[name], 1)).as_py() for name in ("version", "schema_version")
    )


def _valid_json(cursor: duckdb.DuckDBPyConnection, table: pa.Table) -> bool:
    """Whether every data and metadata text is valid JSON, on a cursor of its own."""
    try:
        cursor.register(BATCH, table.select(["data", "metadata"]))
        return bool(cursor.execute(_VALID_JSON).fetchall()[0][0] == 0)
    finally:
        cursor.close()


def _promoted(connection: duckdb.DuckDBPyConnection, table: pa.Table) -> dict[str, pa.Array]:
    """correlation_id, causation_id and user_id, taken from metadata where the row lacks them."""
    lacking = [spec for spec in _PROMOTED if table[spec[0]].null_count]
    if not lacking or table["metadata"].null_count == table.num_rows:
        return {}
    columns = ["_row", "metadata", *(column for column, _, _ in lacking)]
    select = ", ".join(
        _PROMOTE.format(column=column, camel=camel, stem=stem) + f" AS {column}"
        for column, camel, stem in lacking
    )
    connection.register(BATCH, table.select(columns))
    try:
        # A plain projection keeps the input order (DuckDB's preserve_insertion_order).
        found = connection.sql(f"SELECT _row, {select} FROM {BATCH}").to_arrow_table()
    finally:
        connection.unregister(BATCH)
    rows = found["_row"].to_numpy()
    if not np.array_equal(rows, np.arange(table.num_rows)):
        found = found.take(pc.sort_indices(found["_row"]))
    return {column: found[column] for column, _, _ in lacking}


def bad_rows(session: Session, events: pa.Table, *, tz: str | None = None) -> pa.Table:
    """Every row of an Arrow batch that the store would refuse: ``_row``, ``field``, ``reason``.

    Examples:
        >>> import pyarrow as pa
        >>> from esworkbench.query import Session
        >>> batch = pa.table({"aggregate_id": ["a", "b"], "aggregate_type": ["A", "A"],
        ...                   "event_type": ["E", ""], "data": ["{}", "[]"]})
        >>> bad_rows(Session(), batch).to_pylist()
        [{'_row': 1, 'field': 'event_type', 'reason': 'is missing or empty'}]
    """
    table = _coerce(events, tz)
    with session._lock:
        connection = session.connection
        connection.register(BATCH, table)
        try:
            query = _FIRST_BAD_ROW.format(uuid_rule=_UUID_RULE)
            return connection.sql(query).to_arrow_table()
        finally:
            connection.unregister(BATCH)


def _fill_defaults(table: pa.Table, promoted: dict[str, pa.Array], canonical_ids: bool) -> pa.Table:
    ids = table["event_id"]
    if not canonical_ids:
        ids = pa.chunked_array([[str(uuid.UUID(i)) if i else None for i in ids.to_pylist()]])
    if ids.null_count:
        missing = pc.is_null(ids)
        fresh = pa.array([str(uuid.uuid4()) for _ in range(ids.null_count)], pa.string())
        ids = pc.replace_with_mask(ids.combine_chunks(), missing.combine_chunks(), fresh)
    now = pa.scalar(datetime.now().astimezone(), EVENT_SCHEMA.field("recorded_at").type)
    recorded = pc.fill_null(table["recorded_at"], now)
    replaced = {
        "event_id": ids,
        "recorded_at": recorded,
        "occurred_at": pc.coalesce(table["occurred_at"], recorded),
        "schema_version": pc.fill_null(table["schema_version"], pa.scalar(1, pa.int32())),
        **promoted,
    }
    for name, column in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _refuse_repeats(session: Session, table: pa.Table) -> None:
    ids = table["event_id"]
    if table.num_rows <= 10_000:  # a set is quicker than hashing for the appends of a notebook
        listed = ids.to_pylist()
        if len(set(listed)) == len(listed):
            return
    else:
        from esworkbench._keys import hash_text

        keys = hash_text(ids)
        ordered = np.sort(keys)
        twins = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(twins) == 0:
            return
        # Equal keys are candidates: compare the text of those rows only.
        candidates = ids.filter(pc.is_in(pa.array(keys), pa.array(twins)))
        listed = candidates.to_pylist()
        if len(set(listed)) == len(listed):
            return
    with session._lock:
        connection = session.connection
        connection.register(BATCH, table.select(["event_id"]))
        try:
            repeated = connection.execute(_REPEATED_ID).fetchall()
        finally:
            connection.unregister(BATCH)
    if repeated:
        twice = str(repeated[0][0])
        raise DuplicateEventError(
            f"event_id {twice} appears more than once in the same append. Hint: give every "
            "event its own id",
            event_id=twice,
        )
