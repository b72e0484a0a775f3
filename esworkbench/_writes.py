"""Placing a checked batch: retries, duplicate ids, stream heads, versions and positions.

Everything here runs under the store's lock, against what is stored at that moment, and works on
whole columns: stream heads come from one DuckDB query, versions from a sort and a running count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench._checks import BATCH
from esworkbench.errors import ConcurrencyError, DuplicateEventError, InvalidEventError
from esworkbench.events import EVENT_SCHEMA
from esworkbench.query import FILES, Session

_STORED: Final = """
SELECT count(*) AS hits,
       count(*) FILTER (WHERE e.aggregate_id = b.aggregate_id
                        AND (b.version IS NULL OR b.version = e.version)) AS same_place,
       count(DISTINCT e.position - b._row) AS runs,
       min(e.position), max(e.position), max(e.version),
       arg_min(b.event_id, b._row), arg_min(e.aggregate_id, b._row), arg_min(e.version, b._row)
FROM _esw_batch b JOIN {events} e ON e.event_id = b.event_id
"""

_HEADS: Final = """
SELECT aggregate_id, max(version) AS head, arg_max(aggregate_type, version) AS stored_type
FROM {events} WHERE aggregate_id IN (SELECT aggregate_id FROM _esw_batch)
GROUP BY aggregate_id
"""


def _relation(query: str, staged: Sequence[str]) -> tuple[str, list[object]]:
    """The query over stored events, plus files staged by an import not yet committed."""
    if not staged:
        return query.format(events="events"), []
    events = f"(SELECT * FROM events UNION ALL SELECT * FROM {FILES})"
    return query.format(events=events), [list(staged)]


def find_stored(
    session: Session, table: pa.Table, staged: Sequence[str] = ()
) -> tuple[int, int, int] | None:
    """Returns (first position, last position, last version) if the whole batch is a retry.

    A retry is the same events, in the same order, stored by one earlier commit at the same
    places. Returns None when none of the batch's event_ids is stored.

    Raises:
        DuplicateEventError: some event_id is stored at another place.
    """
    with session._lock:
        connection = session.connection
        connection.register(BATCH, table.select(["event_id", "aggregate_id", "version", "_row"]))
        try:
            row = connection.execute(*_relation(_STORED, staged)).fetchall()[0]
        finally:
            connection.unregister(BATCH)
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


def _heads(session: Session, ids: pa.Array, staged: Sequence[str]) -> pa.Table:
    with session._lock:
        connection = session.connection
        connection.register(BATCH, pa.table({"aggregate_id": ids}))
        try:
            query, params = _relation(_HEADS, staged)
            return connection.sql(query, params=params).to_arrow_table()
        finally:
            connection.unregister(BATCH)


def place(
    session: Session, table: pa.Table, head_position: int, staged: Sequence[str] = ()
) -> pa.Table:
    """Gives each event its version and position, checking versions against stream heads.

    Within the batch, a stream's events keep their input order; the first continues the
    stream's stored head and each next one adds one. Positions follow the input order.
    """
    count = table.num_rows
    order = pc.sort_indices(table, [("aggregate_id", "ascending"), ("_row", "ascending")])
    ids = table["aggregate_id"].take(order).combine_chunks()
    starts = np.ones(count, dtype=bool)
    if count > 1:
        starts[1:] = pc.not_equal(ids.slice(1), ids.slice(0, count - 1)).to_numpy(
            zero_copy_only=False
        )
    group = np.cumsum(starts) - 1
    first_index = np.flatnonzero(starts)
    rank = np.arange(count) - first_index[group] + 1
    streams = ids.filter(pa.array(starts))
    heads = _heads(session, streams, staged)
    found = pc.index_in(streams, heads["aggregate_id"])
    head_of = pc.fill_null(pc.take(heads["head"], found), 0).to_numpy(zero_copy_only=False)
    versions = head_of[group] + rank
    kinds = table["aggregate_type"].take(order).combine_chunks()
    _check_types(table, order, kinds, starts, pc.take(heads["stored_type"], found), group)
    _check_versions(table, order, versions, head_of[group])
    in_input_order = np.empty(count, dtype=np.int64)
    in_input_order[order.to_numpy()] = versions
    placed = table.set_column(
        table.schema.get_field_index("version"), "version", pa.array(in_input_order)
    )
    positions = np.arange(head_position + 1, head_position + count + 1, dtype=np.int64)
    placed = placed.append_column("position", pa.array(positions))
    return placed.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def _row_of(table: pa.Table, order: pa.Array, where: np.ndarray) -> dict[str, object]:
    index = int(order[int(np.flatnonzero(where)[0])].as_py())
    row: dict[str, object] = table.slice(index, 1).to_pylist()[0]
    return row


def _check_types(
    table: pa.Table,
    order: pa.Array,
    kinds: pa.Array,
    starts: np.ndarray,
    stored: pa.Array,
    group: np.ndarray,
) -> None:
    count = len(kinds)
    if count > 1:
        changed = pc.not_equal(kinds.slice(1), kinds.slice(0, count - 1)).to_numpy(
            zero_copy_only=False
        )
        mixed = np.concatenate([[False], changed & ~starts[1:]])
        if mixed.any():
            row = _row_of(table, order, mixed)
            raise InvalidEventError(
                f"event {row['_row']}: stream {row['aggregate_id']!r} is given more than one "
                "aggregate_type in this batch. Hint: a stream keeps one aggregate_type",
                index=int(str(row["_row"])),
                field="aggregate_type",
            )
    if stored.null_count == len(stored):
        return
    stored_per_row = pc.take(stored, pa.array(group))
    other = pc.and_(pc.is_valid(stored_per_row), pc.not_equal(stored_per_row, kinds))
    other_np = pc.fill_null(other, False).to_numpy(zero_copy_only=False)
    if other_np.any():
        row = _row_of(table, order, other_np)
        kind = stored_per_row[int(np.flatnonzero(other_np)[0])].as_py()
        raise InvalidEventError(
            f"event {row['_row']}: stream {row['aggregate_id']!r} is of aggregate_type "
            f"{kind!r}, not {row['aggregate_type']!r}. Hint: a stream keeps one aggregate_type",
            index=int(str(row["_row"])),
            field="aggregate_type",
        )


def _check_versions(
    table: pa.Table, order: pa.Array, versions: np.ndarray, heads: np.ndarray
) -> None:
    given = table["version"].take(order)
    if given.null_count == len(given):
        return
    wrong = pc.fill_null(pc.not_equal(given, pa.array(versions)), False)
    wrong_np = wrong.to_numpy(zero_copy_only=False)
    if not wrong_np.any():
        return
    at = int(np.flatnonzero(wrong_np)[0])
    row = _row_of(table, order, wrong_np)
    head = int(heads[at])
    raise ConcurrencyError(
        f"event {row['_row']}: stream {row['aggregate_id']!r} would get version "
        f"{row['version']}, but its next version is {int(versions[at])} (stored head {head}). "
        "Hint: versions continue the stream's head with no gap",
        aggregate_id=str(row["aggregate_id"]),
        expected=int(str(row["version"])) - 1,
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
