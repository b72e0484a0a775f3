"""Event ids during an import: a row whose event_id is already in the store, or earlier in the
source, is refused exactly, without scanning the files the import has staged for every batch.

The import keeps the 64-bit hashes of the event_ids it has accepted in sorted runs (8 bytes an
event), spilled to a folder of the store past a few megabytes (:mod:`._runs`). A hash that
matches is only a suspicion: the suspect ids are looked up exactly (in the batch itself, or in
the staged files), so a hash collision costs one small query and never refuses a good row. Ids
already in the store are found by one join with its events, and only when the store held events
before the import began.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import pyarrow as pa

from esworkbench.query import FILES, Session
from esworkbench.sources._runs import SortedRuns

__all__ = ["EventIds", "Repeat"]

_BATCH: Final = "_esw_import_ids"
# The rows by the hash of their event_id: DuckDB sorts in C++, on both cores.
_HASH: Final = f"SELECT _i, hash(event_id) AS h FROM {_BATCH} WHERE event_id IS NOT NULL ORDER BY h"
_STORED: Final = f"""
SELECT b._i, e.aggregate_id, e.version FROM {_BATCH} b JOIN events e ON e.event_id = b.event_id
"""
_STAGED: Final = f"""
SELECT b._i, e.aggregate_id, e.version FROM {_BATCH} b JOIN {FILES} e ON e.event_id = b.event_id
"""

Repeat = tuple[int, str]
"""A refused row: its index in the batch, and why."""


class EventIds:
    """The event_ids an import has accepted so far, as sorted hashes."""

    def __init__(
        self,
        session: Session,
        *,
        stored: bool,
        staged: Callable[[], Sequence[str]],
        spill: str | os.PathLike[str] | None = None,
    ) -> None:
        self._session = session
        self._stored = stored
        self._staged = staged
        self._seen = SortedRuns(width=0, folder=spill)

    def _query(self, query: str, table: pa.Table, params: list[object] | None = None) -> pa.Table:
        with self._session._lock:
            connection = self._session.connection
            connection.register(_BATCH, table)
            try:
                return connection.sql(query, params=params).to_arrow_table()
            finally:
                connection.unregister(_BATCH)

    def screen(self, good: pa.Table) -> tuple[pa.Table, pa.Table, list[str]]:
        """Splits rows into those whose event_id is new and those that repeat one (with the
        reasons), and remembers the new ones."""
        ids = good["event_id"]
        if good.num_rows == 0 or ids.null_count == good.num_rows:
            return good, good.slice(0, 0), []
        table = pa.table({"_i": pa.array(np.arange(good.num_rows)), "event_id": ids})
        hashes = self._query(_HASH, table)
        order = hashes["_i"].to_numpy()
        ordered = hashes["h"].to_numpy()  # sorted needles search fast
        _, seen, _ = self._seen.find(ordered)
        found: dict[int, str] = {}
        found.update(_in_batch(ids, order, ordered, good["source_position"]))
        found.update(self._earlier(ids, order[seen]))
        if self._stored:
            found.update(self._in_store(ids))
        fresh = ~seen
        fresh[1:] &= ordered[1:] != ordered[:-1]  # a hash once, even if two ids share it
        if found:
            fresh &= ~np.isin(order, list(found))
        self._seen.add(ordered[fresh], np.empty((int(fresh.sum()), 0), np.int64))
        if not found:
            return good, good.slice(0, 0), []
        refused = sorted(found)
        mask = np.ones(good.num_rows, dtype=bool)
        mask[refused] = False
        return (
            good.filter(pa.array(mask)),
            good.take(pa.array(refused, pa.int64())),
            [found[i] for i in refused],
        )

    def _earlier(self, ids: pa.ChunkedArray, suspects: np.ndarray) -> dict[int, str]:
        """Rows whose event_id hash this import has accepted before: looked up exactly."""
        if len(suspects) == 0:
            return {}
        staged = list(self._staged())  # waits for the batch being staged: only on suspicion
        if not staged:
            return {}
        table = pa.table({"_i": pa.array(suspects), "event_id": ids.take(pa.array(suspects))})
        rows = self._query(_STAGED, table, [staged])
        return {
            int(i): f"field 'event_id' is {ids[int(i)]}, which this import has already given "
            f"to version {v} of stream {s!r} (a repeated event_id)"
            for i, s, v in zip(*(rows[c].to_pylist() for c in rows.column_names), strict=True)
        }

    def _in_store(self, ids: pa.ChunkedArray) -> dict[int, str]:
        table = pa.table({"_i": pa.array(np.arange(len(ids))), "event_id": ids})
        rows = self._query(_STORED, table)
        return {
            int(i): f"field 'event_id' is {ids[int(i)]}, which the store already holds at "
            f"version {v} of stream {s!r} (a repeated event_id)"
            for i, s, v in zip(*(rows[c].to_pylist() for c in rows.column_names), strict=True)
        }


def _in_batch(
    ids: pa.ChunkedArray, order: np.ndarray, ordered: np.ndarray, positions: pa.ChunkedArray
) -> dict[int, str]:
    """Rows whose event_id an earlier row of the same batch has."""
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    found: dict[int, str] = {}
    firsts: dict[str, int] = {}
    for at in same:
        earlier, later = int(order[at]), int(order[at + 1])
        first = firsts.setdefault(str(ids[earlier]), earlier)
        if str(ids[later]) == str(ids[first]):  # else two ids with one hash: both are new
            found[later] = (
                f"field 'event_id' is {ids[later]}, which source position {positions[first]} "
                "has too (a repeated event_id)"
            )
    return found
