"""The checks of a write, done column-wise in DuckDB over the Arrow batch about to be committed.

A batch is first made canonical (types, defaults, JSON checks, promoted ids), then, under the
store's lock, checked against what is stored (retries, duplicate ids, stream heads) and given its
versions and positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Final

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import ConcurrencyError, DuplicateEventError, InvalidEventError
from esworkbench.events import EVENT_SCHEMA, has_event_id, to_records
from esworkbench.query import Session

_BATCH: Final = "_esw_batch"
_REQUIRED: Final = ("event_type", "aggregate_type", "aggregate_id", "data")
# Input columns: the canonical ones (position is assigned, so it is dropped) plus a row number.
_INPUT_SCHEMA: Final = pa.schema(
    [f.with_nullable(True) for f in EVENT_SCHEMA if f.name != "position"]
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
    WHEN event_id IS NOT NULL AND TRY_CAST(event_id AS UUID) IS NULL THEN 'event_id'
    WHEN version IS NOT NULL AND version < 1 THEN 'version'
    WHEN schema_version IS NOT NULL AND schema_version < 1 THEN 'schema_version'
  END AS field
  FROM _esw_batch
) WHERE field IS NOT NULL ORDER BY _row LIMIT 1
"""

_CANONICAL: Final = """
SELECT
  _row,
  lower(CAST(CAST(coalesce(event_id, CAST(uuid() AS VARCHAR)) AS UUID) AS VARCHAR)) AS event_id,
  event_type, aggregate_type, aggregate_id, version,
  coalesce(recorded_at, CAST($now AS TIMESTAMPTZ)) AS recorded_at,
  coalesce(occurred_at, recorded_at, CAST($now AS TIMESTAMPTZ)) AS occurred_at,
  CAST(coalesce(schema_version, 1) AS INTEGER) AS schema_version,
  data, metadata,
  coalesce(correlation_id, metadata->>'correlationId', metadata->>'correlation_id')
    AS correlation_id,
  coalesce(causation_id, metadata->>'causationId', metadata->>'causation_id') AS causation_id,
  coalesce(user_id, metadata->>'userId', metadata->>'user_id') AS user_id
FROM _esw_batch ORDER BY _row
"""

_STORED: Final = """
SELECT count(*) AS hits,
       count(*) FILTER (WHERE e.aggregate_id = b.aggregate_id
                        AND (b.version IS NULL OR b.version = e.version)) AS same_place,
       count(DISTINCT e.position - b._row) AS runs,
       min(e.position), max(e.position), max(e.version),
       arg_min(b.event_id, b._row), arg_min(e.aggregate_id, b._row), arg_min(e.version, b._row)
FROM _esw_batch b JOIN events e ON e.event_id = b.event_id
"""

_PLACED: Final = """
WITH heads AS (
  SELECT aggregate_id, max(version) AS head, arg_max(aggregate_type, version) AS stored_type
  FROM events WHERE aggregate_id IN (SELECT DISTINCT aggregate_id FROM _esw_batch)
  GROUP BY aggregate_id
)
SELECT b.*, coalesce(h.head, 0) AS _head, h.stored_type AS _stored_type,
       coalesce(h.head, 0) + row_number() OVER (PARTITION BY b.aggregate_id ORDER BY b._row)
         AS _version,
       CAST($first AS BIGINT) + row_number() OVER (ORDER BY b._row) - 1 AS _position,
       count(DISTINCT b.aggregate_type) OVER (PARTITION BY b.aggregate_id) AS _types
FROM _esw_batch b LEFT JOIN heads h USING (aggregate_id)
ORDER BY b._row
"""


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


def _register(session: Session, table: pa.Table) -> duckdb.DuckDBPyConnection:
    connection = session.connection
    connection.register(_BATCH, table)
    return connection


def _input_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    table = pa.Table.from_pylist(list(records), schema=_INPUT_SCHEMA)
    return table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))


def _coerce(table: pa.Table, tz: str | None) -> pa.Table:
    """Brings a user's Arrow table to the input schema, refusing what cannot be cast."""
    columns = []
    for target in _INPUT_SCHEMA:
        if target.name not in table.column_names:
            if target.name in _REQUIRED:
                raise InvalidEventError(
                    f"the batch has no column {target.name!r}. Hint: columns are "
                    f"{', '.join(_INPUT_SCHEMA.names)}",
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
            column = pc.assume_timezone(column, tz)
        try:
            columns.append(column.cast(target.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidEventError(
                f"column {target.name!r} has type {column.type}, which cannot become "
                f"{target.type}: {exc}. Hint: convert the column first",
                field=target.name,
            ) from exc
    out = pa.table(columns, schema=_INPUT_SCHEMA)
    return out.append_column("_row", pa.array(range(out.num_rows), pa.int64()))


def canonical_batch(
    events: pa.Table | Iterable[object],
    session: Session,
    *,
    tz: str | None = None,
    aggregate_id: str | None = None,
    aggregate_type: str | None = None,
) -> tuple[pa.Table, bool]:
    """Checks a batch and returns it canonical, with whether any event_id came from the caller."""
    if not isinstance(events, pa.Table):
        given = list(events)
        records = to_records(given, aggregate_id=aggregate_id, aggregate_type=aggregate_type, tz=tz)
        table = _input_table(records)
        _refuse_repeats(table)
        return table, any(map(has_event_id, given))
    table = _coerce(events, tz)
    supplied = table["event_id"].null_count < table.num_rows
    now = datetime.now().astimezone()
    with session._lock:
        connection = _register(session, table)
        try:
            bad = connection.execute(_FIRST_BAD_ROW).fetchall()
            if bad:
                row, field, reason = bad[0]
                raise InvalidEventError(
                    f"event {row}: field {field!r} {reason}. Hint: fix the row and retry",
                    index=row,
                    field=field,
                )
            out = connection.sql(_CANONICAL, params={"now": now}).to_arrow_table()
        finally:
            connection.unregister(_BATCH)
    _refuse_repeats(out)
    return out, supplied


def _refuse_repeats(table: pa.Table) -> None:
    ids = table["event_id"]
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return
    counts = pc.value_counts(ids)
    twice = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
    raise DuplicateEventError(
        f"event_id {twice} appears more than once in the same append. Hint: give every event "
        "its own id",
        event_id=twice,
    )


def find_stored(session: Session, table: pa.Table) -> tuple[int, int, int] | None:
    """Returns (first position, last position, last version) if the whole batch is a retry.

    A retry is the same events, in the same order, stored by one earlier commit at the same
    places. Returns None when none of the batch's event_ids is stored.

    Raises:
        DuplicateEventError: some event_id is stored at another place.
    """
    with session._lock:
        connection = _register(session, table)
        try:
            row = connection.execute(_STORED).fetchall()[0]
        finally:
            connection.unregister(_BATCH)
    hits, same, runs, first, last, version, event_id, stored_id, stored_version = row
    if hits == 0:
        return None
    if hits == same == table.num_rows and runs == 1:
        return int(first), int(last), int(version)
    raise DuplicateEventError(
        f"event_id {event_id} is already stored in stream {stored_id!r} at version "
        f"{stored_version}. Hint: an event_id is unique in the store; a retry must repeat the "
        "same events at the same versions",
        event_id=str(event_id),
    )


def place(session: Session, table: pa.Table, head_position: int) -> pa.Table:
    """Gives each event its version and position, checking versions against stream heads."""
    with session._lock:
        connection = _register(session, table)
        try:
            placed = connection.sql(_PLACED, params={"first": head_position + 1}).to_arrow_table()
        finally:
            connection.unregister(_BATCH)
    _check_placed(placed)
    out = placed.drop_columns(
        ["version", "position"] if "position" in placed.column_names else ["version"]
    )
    out = out.rename_columns(
        [
            "version" if n == "_version" else "position" if n == "_position" else n
            for n in out.column_names
        ]
    )
    return out.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def _check_placed(placed: pa.Table) -> None:
    mixed = pc.greater(placed["_types"], 1)
    if pc.any(mixed).as_py():
        row = placed.filter(mixed).slice(0, 1).to_pylist()[0]
        raise InvalidEventError(
            f"event {row['_row']}: stream {row['aggregate_id']!r} is given more than one "
            "aggregate_type in this batch. Hint: a stream keeps one aggregate_type",
            index=row["_row"],
            field="aggregate_type",
        )
    other_type = pc.and_(
        pc.is_valid(placed["_stored_type"]),
        pc.not_equal(placed["_stored_type"], placed["aggregate_type"]),
    )
    if pc.any(other_type).as_py():
        row = placed.filter(other_type).slice(0, 1).to_pylist()[0]
        raise InvalidEventError(
            f"event {row['_row']}: stream {row['aggregate_id']!r} is of aggregate_type "
            f"{row['_stored_type']!r}, not {row['aggregate_type']!r}. "
            "Hint: a stream keeps one aggregate_type",
            index=row["_row"],
            field="aggregate_type",
        )
    wrong = pc.and_(
        pc.is_valid(placed["version"]), pc.not_equal(placed["version"], placed["_version"])
    )
    if pc.any(wrong).as_py():
        row = placed.filter(wrong).slice(0, 1).to_pylist()[0]
        head = row["_head"]
        raise ConcurrencyError(
            f"event {row['_row']}: stream {row['aggregate_id']!r} would get version "
            f"{row['version']}, but its next version is {row['_version']} (stored head "
            f"{head}). Hint: versions continue the stream's head with no gap",
            aggregate_id=row["aggregate_id"],
            expected=row["version"] - 1,
            actual=head,
        )


def place_stream(table: pa.Table, head: int, head_position: int) -> pa.Table:
    """Gives one stream's events the versions after ``head`` and the next positions."""
    count = table.num_rows
    versions = pa.array(range(head + 1, head + count + 1), pa.int64())
    given = table["version"]
    wrong = pc.and_(pc.is_valid(given), pc.not_equal(given, versions))
    if pc.any(wrong).as_py():
        index = pc.index(wrong, True).as_py()
        raise ConcurrencyError(
            f"event {index} of the append says version {given[index].as_py()}, but the stream "
            f"is at version {head}, so it would be {head + index + 1}. Hint: leave versions out "
            "or continue the stream's head",
            aggregate_id=table["aggregate_id"][0].as_py(),
            expected=given[index].as_py(),
            actual=head,
        )
    positions = pa.array(range(head_position + 1, head_position + count + 1), pa.int64())
    out = table.set_column(table.schema.get_field_index("version"), "version", versions)
    out = out.append_column("position", positions)
    return out.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def by_aggregate_type(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Splits a placed batch into one table per aggregate_type (one file per partition)."""
    kinds = pc.unique(table["aggregate_type"]).to_pylist()
    if len(kinds) == 1:
        yield kinds[0], table
        return
    for kind in sorted(kinds):
        yield kind, table.filter(pc.equal(table["aggregate_type"], kind))
