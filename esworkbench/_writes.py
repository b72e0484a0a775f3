"""Placing a checked batch: retries, duplicate ids, stream heads, versions and positions.

Everything here runs under the store's lock, against what is stored at that moment, and works on
whole columns. The store's key index (:mod:`esworkbench._keys`) answers which files may hold an
event_id and where each stream stands; without it (a session that has none, or staged files it
was not told about) one DuckDB query over the stored files answers instead. Versions come from a
sort and a running count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench import _keys, _layout
from esworkbench._checks import BATCH
from esworkbench._keys import KeyedSession, KeyIndex, Keys
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


def _index(session: Session, staged: Sequence[str]) -> KeyIndex | None:
    """The session's key index, if it has one that knows every staged file."""
    if isinstance(session, KeyedSession) and session.keys.knows(staged):
        return session.keys
    return None


def _relation(query: str, staged: Sequence[str]) -> tuple[str, list[object]]:
    """The query over stored events, plus files staged by an import not yet committed."""
    if not staged:
        return query.format(events="events"), []
    events = f"(SELECT * FROM events UNION ALL SELECT * FROM {FILES})"
    return query.format(events=events), [list(staged)]


def find_stored(
    session: Session,
    table: pa.Table,
    staged: Sequence[str] = (),
    *,
    event_keys: Keys | None = None,
) -> tuple[int, int, int] | None:
    """Returns (first position, last position, last version) if the whole batch is a retry.

    A retry is the same events, in the same order, stored by one earlier commit at the same
    places. Returns None when none of the batch's event_ids is stored. ``event_keys`` are the
    batch's keys (:func:`~esworkbench._keys.hash_text` of event_id), if already computed.

    Raises:
        DuplicateEventError: some event_id is stored at another place.
    """
    params: list[object]
    index = _index(session, staged)
    if index is not None:
        keys = _keys.hash_text(table["event_id"]) if event_keys is None else event_keys
        files = index.files_holding(keys, staged)
        if not files:
            return None
        # Only these files can hold the ids; the exact join confirms (or not) their hits.
        query, params = _STORED.format(events=FILES), [files]
    else:
        query, params = _relation(_STORED, staged)
    with session._lock:
        connection = session.connection
        connection.register(BATCH, table.select(["event_id", "aggregate_id", "version", "_row"]))
        try:
            row = connection.execute(query, params).fetchall()[0]
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


def _heads(session: Session, ids: pa.Array, staged: Sequence[str]) -> tuple[np.ndarray, pa.Array]:
    """Head version (0: none) and stored aggregate_type (null: none) of each distinct stream."""
    index = _index(session, staged)
    if index is not None:
        return index.heads(ids, staged)
    with session._lock:
        connection = session.connection
        connection.register(BATCH, pa.table({"aggregate_id": ids}))
        try:
            query, params = _relation(_HEADS, staged)
            heads = connection.sql(query, params=params).to_arrow_table()
        finally:
            connection.unregister(BATCH)
    found = pc.index_in(ids, heads["aggregate_id"])
    head_of = pc.fill_null(pc.take(heads["head"], found), 0).to_numpy(zero_copy_only=False)
    return head_of, pc.take(heads["stored_type"], found)


def place(
    session: Session, table: pa.Table, head_position: int, staged: Sequence[str] = ()
) -> pa.Table:
    """Gives each event its version and position, checking versions against stream heads.

    Within the batch, a stream's events keep their input order; the first continues the
    stream's stored head and each next one adds one. Positions follow the input order. The
    rows come back sorted by (aggregate_type, aggregate_id, version), as files store them.
    """
    count = table.num_rows
    order = _sorted_order(table)
    ids = table["aggregate_id"].take(order).combine_chunks()
    kinds = table["aggregate_type"].take(order).combine_chunks()
    starts = np.ones(count, dtype=bool)
    if count > 1:
        starts[1:] = pc.or_(
            pc.not_equal(ids.slice(1), ids.slice(0, count - 1)),
            pc.not_equal(kinds.slice(1), kinds.slice(0, count - 1)),
        ).to_numpy(zero_copy_only=False)
    group = np.cumsum(starts) - 1
    first_index = np.flatnonzero(starts)
    rank = np.arange(count) - first_index[group] + 1
    mask = pa.array(starts)
    streams = ids.filter(mask)
    if pc.count_distinct(streams).as_py() < len(streams):
        _refuse_mixed_types(table)
    head_of, stored = _heads(session, streams, staged)
    _check_types(table, order, kinds.filter(mask), stored, first_index)
    versions = head_of[group] + rank
    _check_versions(table, order, versions, head_of[group])
    rows = table.select([n for n in EVENT_SCHEMA.names if n not in ("version", "position")])
    placed = _layout.gather(rows, order)
    placed = placed.append_column("version", pa.array(versions))
    positions = order.to_numpy(zero_copy_only=False) + (head_position + 1)
    placed = placed.append_column("position", pa.array(positions))
    return placed.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def _sorted_order(table: pa.Table) -> pa.Array:
    """Row indices ordered by (aggregate_type, aggregate_id), input order within a stream.

    Each aggregate_type's rows are sorted by a thread of their own (Arrow sorts outside the
    GIL), largest first, so two cores share the sort; the runs follow in type order.
    """
    encoded = pc.dictionary_encode(table["aggregate_type"]).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    if len(encoded.dictionary) < 2:
        return pc.sort_indices(table["aggregate_id"])  # stable: rows keep their input order
    kinds = len(encoded.dictionary)
    small = np.uint8 if kinds <= 256 else np.uint16 if kinds <= 65536 else np.int64
    grouped = np.argsort(codes.astype(small), kind="stable")  # a radix sort for small codes
    rows_of = np.split(grouped, np.cumsum(np.bincount(codes, minlength=kinds))[:-1])
    ids = table["aggregate_id"]

    def sort(rows: np.ndarray) -> np.ndarray:
        within = pc.sort_indices(ids.take(pa.array(rows))).to_numpy(zero_copy_only=False)
        ordered: np.ndarray = rows[within]
        return ordered

    largest_first = sorted(range(kinds), key=lambda code: -len(rows_of[code]))
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        sorted_rows = pool.map(sort, [rows_of[code] for code in largest_first])
        done = dict(zip(largest_first, sorted_rows, strict=True))
    by_type = pc.sort_indices(encoded.dictionary).to_pylist()
    return pa.array(np.concatenate([done[code] for code in by_type]))


def _row_of(table: pa.Table, order: pa.Array, where: np.ndarray) -> dict[str, object]:
    index = int(order[int(np.flatnonzero(where)[0])].as_py())
    row: dict[str, object] = table.slice(index, 1).to_pylist()[0]
    return row


def _refuse_mixed_types(table: pa.Table) -> None:
    """Names the first event (by stream, then input order) that changes its stream's type."""
    order = pc.sort_indices(table, [("aggregate_id", "ascending"), ("_row", "ascending")])
    ids = table["aggregate_id"].take(order)
    kinds = table["aggregate_type"].take(order)
    same_stream = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    changed = pc.not_equal(kinds.slice(1), kinds.slice(0, len(kinds) - 1))
    mixed = np.concatenate([[False], pc.and_(same_stream, changed).to_numpy(zero_copy_only=False)])
    row = _row_of(table, order, mixed)
    raise InvalidEventError(
        f"event {row['_row']}: stream {row['aggregate_id']!r} is given more than one "
        "aggregate_type in this batch. Hint: a stream keeps one aggregate_type",
        index=int(str(row["_row"])),
        field="aggregate_type",
    )


def _check_types(
    table: pa.Table, order: pa.Array, kinds: pa.Array, stored: pa.Array, first: np.ndarray
) -> None:
    """Refuses a stream given another aggregate_type than the one it is stored with."""
    if stored.null_count == len(stored):
        return
    other = pc.fill_null(pc.not_equal(stored, kinds), False).to_numpy(zero_copy_only=False)
    if not other.any():
        return
    stream = int(np.flatnonzero(other)[0])
    where = np.zeros(len(order), dtype=bool)
    where[first[stream]] = True
    row = _row_of(table, order, where)
    raise InvalidEventError(
        f"event {row['_row']}: stream {row['aggregate_id']!r} is of aggregate_type "
        f"{stored[stream].as_py()!r}, not {row['aggregate_type']!r}. Hint: a stream keeps one "
        "aggregate_type",
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
