"""The snapshots table on disk: a Delta table at ``<store>/snapshots``, read and written.

Files are written and flushed to disk before one Delta commit names them, under the store's
writer lock, as for events; the ``snapshots`` view of the store's DuckDB session follows the
newest commit.
"""

from __future__ import annotations

import json
import time
import uuid
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

from esworkbench import _layout
from esworkbench._statejson import SNAPSHOT_SCHEMA, StateError, dumps_state
from esworkbench.aggregates import Aggregate
from esworkbench.errors import EsWorkbenchError, StoreError
from esworkbench.store import Store

__all__ = ["bind_view", "commit", "compact", "files", "query", "table_path", "writable"]

_ROWS_PER_GROUP: Final = 8192
_LOGS: weakref.WeakKeyDictionary[Store, DeltaTable] = weakref.WeakKeyDictionary()


# -- the table ---------------------------------------------------------------------------------


def table_path(store: Store) -> Path:
    return store.path / "snapshots"


def files(store: Store) -> list[str]:
    """The Parquet files of the newest commit of the snapshots table (none before the first)."""
    path = table_path(store)
    log = path / "_delta_log"
    if not log.exists():
        return []
    table = _LOGS.get(store)
    try:
        if table is None:
            table = _LOGS[store] = DeltaTable(str(path))
        elif (log / f"{table.version() + 1:020d}.json").exists():
            table.update_incremental()
        actions = pa.table(table.get_add_actions(flatten=True))
    except (DeltaError, OSError) as exc:
        raise StoreError(
            f"the snapshots table of store {store.path} cannot be read: {exc}. Hint: snapshots "
            "are caches: delete the snapshots directory and take them again"
        ) from exc
    return [str(path / unquote(p)) for p in actions["path"].to_pylist()]


def bind_view(store: Store) -> None:
    """Points the store's ``snapshots`` view at the newest commit, now and for later queries.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> bind_view(store)
        >>> store.sql("select count(*) from snapshots").fetchall()
        [(0,)]
    """
    watch(store)
    store._session.bind_snapshots(files(store))


def watch(store: Store) -> None:
    """Lets the store's session list the snapshots table's files when a query names it.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> watch(store)
        >>> store.sql("select count(*) from snapshots").fetchall()
        [(0,)]
    """
    session = store._session
    if session.snapshot_files is None:
        owner = weakref.ref(store)

        def listing() -> list[str]:
            alive = owner()
            return [] if alive is None else files(alive)

        session.snapshot_files = listing


def query(store: Store, text: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Runs a query ``... FROM snapshots ...`` over the files of the newest commit.

    The files are bound as a parameter rather than read through the view: a third less time
    for the one-row lookups a replay makes, and no rows at all before the first commit.
    """
    bind_view(store)  # so that the store's own queries of the view follow from now on
    listed = files(store)
    if not listed:
        return []
    scan = text.replace("FROM snapshots", "FROM read_parquet(?, hive_partitioning = false)")
    return store._session.execute(scan, [listed, *params])


class Writer:
    """Streams snapshot rows into one Parquet file in the table's directory, not yet committed."""

    def __init__(self, store: Store, fold_key: str, aggregate: Aggregate | None = None) -> None:
        self.root = table_path(store)
        self.aggregate_type = aggregate.name if aggregate is not None else ""
        self.decimals = aggregate.decimals if aggregate is not None else False
        self.fold_key = fold_key
        self.taken_at = datetime.now(UTC)
        self.rows: dict[str, list[Any]] = {name: [] for name in SNAPSHOT_SCHEMA.names}
        self.relative = f"part-{uuid.uuid4().hex}.snapshot.parquet"
        self.writer: pq.ParquetWriter | None = None
        self.count = 0
        self.bounds: list[tuple[str, str, int, int]] = []

    def add(self, aggregate_id: str, version: int, state: Any, accumulators: Any) -> None:
        rows = self.rows
        try:
            text = dumps_state(state, decimals=self.decimals)
            extra = None if accumulators is None else dumps_state(accumulators, decimals=True)
        except StateError as exc:
            raise StateError(
                f"{exc.what}, in stream {aggregate_id!r}, version {version}", hint=exc.hint
            ) from None
        rows["aggregate_type"].append(self.aggregate_type)
        rows["aggregate_id"].append(aggregate_id)
        rows["version"].append(version)
        rows["state"].append(text)
        rows["taken_at"].append(self.taken_at)
        rows["fold_key"].append(self.fold_key)
        rows["accumulators"].append(extra)
        if len(rows["version"]) >= _ROWS_PER_GROUP:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        """Adds rows already in :data:`SNAPSHOT_SCHEMA` (imports)."""
        if table.num_rows:
            self._write(table.cast(SNAPSHOT_SCHEMA))

    def _flush(self) -> None:
        if self.rows["version"]:
            self._write(pa.table(self.rows, schema=SNAPSHOT_SCHEMA))
            self.rows = {name: [] for name in SNAPSHOT_SCHEMA.names}

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(
                str(self.root / self.relative), SNAPSHOT_SCHEMA, compression="zstd"
            )
        self.writer.write_table(table, row_group_size=_ROWS_PER_GROUP)
        ids, versions = pc.min_max(table["aggregate_id"]), pc.min_max(table["version"])
        low, high = versions["min"].as_py(), versions["max"].as_py()
        self.bounds.append((ids["min"].as_py(), ids["max"].as_py(), low, high))
        self.count += table.num_rows

    def close(self) -> list[AddAction]:
        """Finishes the file and flushes it to disk; returns its add action (none if empty)."""
        self._flush()
        if self.writer is None:
            return []
        self.writer.close()
        target = self.root / self.relative
        _layout.fsync(target)
        _layout.fsync(self.root)
        stats = {
            "numRecords": self.count,
            "minValues": {
                "aggregate_id": min(b[0] for b in self.bounds),
                "version": min(b[2] for b in self.bounds),
            },
            "maxValues": {
                "aggregate_id": max(b[1] for b in self.bounds),
                "version": max(b[3] for b in self.bounds),
            },
        }
        return [
            AddAction(
                path=self.relative,
                size=target.stat().st_size,
                partition_values={},
                modification_time=int(time.time() * 1000),
                data_change=True,
                stats=json.dumps(stats, ensure_ascii=False),
            )
        ]

    def abort(self) -> None:
        """Removes the uncommitted file after a failure."""
        if self.writer is not None:
            self.writer.close()
            (self.root / self.relative).unlink(missing_ok=True)


def commit(store: Store, actions: list[AddAction], removed: Sequence[RemoveAction] = ()) -> None:
    """Commits written files to the snapshots table in one transaction, creating it if needed.

    ``removed`` names files the commit takes out of the table (a compaction).
    """
    if not actions and not removed:
        return
    path = table_path(store)
    with store._locked():
        try:
            if not (path / "_delta_log").exists():
                create_table_with_add_actions(
                    str(path),
                    Schema.from_arrow(SNAPSHOT_SCHEMA),
                    actions,
                    mode="error",
                    name="snapshots",
                    configuration={"delta.checkpointInterval": "10"},
                )
            else:
                changes: list[AddAction | RemoveAction] = [*actions, *removed]
                DeltaTable(str(path)).create_write_transaction(changes, "append", SNAPSHOT_SCHEMA)
        except (DeltaError, OSError) as exc:
            raise StoreError(
                f"the commit to the snapshots table of store {store.path} failed: {exc}. "
                "Hint: nothing of it is visible; take the snapshots again"
            ) from exc
        log = path / "_delta_log"
        version = DeltaTable(str(path)).version()
        for target in (log / f"{version:020d}.json", log):
            if target.exists():
                _layout.fsync(target)
    bind_view(store)


def writable(store: object, verb: str) -> Store:
    if isinstance(store, Store):
        return store
    from esworkbench.attach import AttachedLake

    if isinstance(store, AttachedLake):
        store._refuse(verb)
    raise EsWorkbenchError(
        f"{verb} needs a store, not {type(store).__name__}. Hint: pass esw.open_store(path)"
    )


def compact(store: Store, keep: list[str] | None) -> tuple[int, int]:
    """Rewrites the table as one file sorted by (aggregate_type, aggregate_id, version).

    Keeps the snapshots whose fold_key is in ``keep`` (all when None), one per (aggregate_type,
    aggregate_id, version, fold_key): the latest taken. Returns (kept, dropped). The old files
    leave the table in the same commit; they stay on disk for readers that still list them.
    """
    listed = files(store)
    if not listed:
        return 0, 0
    table = _LOGS[store]
    old = pa.table(table.get_add_actions(flatten=True))
    total = int(
        store._session.execute(
            "SELECT count(*) FROM read_parquet(?, hive_partitioning = false)", [listed]
        )[0][0]
    )
    names = ", ".join(SNAPSHOT_SCHEMA.names)
    where = "true" if keep is None else "list_contains(CAST(? AS VARCHAR[]), fold_key)"
    text = (
        f"SELECT {names} FROM read_parquet(?, hive_partitioning = false) WHERE {where} "
        "QUALIFY row_number() OVER (PARTITION BY aggregate_type, aggregate_id, version, "
        "fold_key ORDER BY taken_at DESC) = 1 "
        "ORDER BY aggregate_type, aggregate_id, version, fold_key"
    )
    writer = Writer(store, "")
    try:
        with store._session._lock:
            params: list[Any] = [listed] if keep is None else [listed, keep]
            reader = store._session.connection.sql(text, params=params).to_arrow_reader(
                _ROWS_PER_GROUP
            )
            for batch in reader:
                writer.add_table(pa.Table.from_batches([batch]))
        added = writer.close()
        now = int(time.time() * 1000)
        removed = [
            RemoveAction(unquote(p), True, now, size)
            for p, size in zip(old["path"].to_pylist(), old["size_bytes"].to_pylist(), strict=True)
        ]
        commit(store, added, removed)
    except BaseException:
        writer.abort()
        raise
    return writer.count, total - writer.count
