"""Compaction: merge a partition's files into few files sorted by (aggregate_id, version).

The merged files are written and flushed first; then one Delta commit removes the old files and
adds the new ones with ``data_change=False``. Readers see the same events throughout, and the old
files stay on disk for readers that still hold an older snapshot.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from esworkbench import _layout
from esworkbench._keys import FileKeys
from esworkbench.events import EVENT_SCHEMA
from esworkbench.query import FILES, Session

if TYPE_CHECKING:
    from esworkbench.store import Store


def compact(store: Store, table: DeltaTable, files: pa.Table, session: Session) -> int:
    """Merges every partition that has more than one file; returns how many files merged."""
    if files.num_rows == 0:
        return 0
    kinds = files["partition.aggregate_type"]
    actions: list[AddAction | RemoveAction] = []
    merged = 0
    now = int(time.time() * 1000)
    for kind in pc.unique(kinds).to_pylist():
        group = files.filter(pc.equal(kinds, kind))
        if group.num_rows < 2:
            continue
        paths = group["path"].to_pylist()
        actions += _merge(store, kind, paths, session)
        actions += [
            RemoveAction(unquote(p), False, now, size, {_layout.PARTITION_COLUMN: kind})
            for p, size in zip(paths, group["size_bytes"].to_pylist(), strict=True)
        ]
        merged += len(paths)
    if actions:
        table.create_write_transaction(
            actions, "append", EVENT_SCHEMA, partition_by=[_layout.PARTITION_COLUMN]
        )
        store.refresh()
    return merged


def _merge(store: Store, kind: str, paths: list[str], session: Session) -> list[AddAction]:
    """Streams the partition's rows in (aggregate_id, version) order into new sorted files."""
    sources = [str(store.table_path / unquote(p)) for p in paths]
    row_group_size = store.settings["row_group_size"]
    file_rows = store.settings["compact_file_rows"]
    with session._lock:
        reader = session.connection.sql(
            f"SELECT * FROM {FILES} ORDER BY aggregate_id, version",
            params=[sources],
        ).to_arrow_reader(row_group_size)
        added: list[AddAction] = []
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in reader:
            pending.append(batch.cast(EVENT_SCHEMA))
            pending_rows += batch.num_rows
            if pending_rows >= file_rows:
                added.append(_write(store, kind, pending, row_group_size))
                pending, pending_rows = [], 0
        if pending:
            added.append(_write(store, kind, pending, row_group_size))
    return added


def _write(
    store: Store, kind: str, batches: list[pa.RecordBatch], row_group_size: int
) -> AddAction:
    rows = pa.Table.from_batches(batches, schema=EVENT_SCHEMA)
    action = _layout.write_file(
        store.table_path,
        kind,
        rows,
        row_group_size=row_group_size,
        presorted=True,
        data_change=False,
    )
    # The store's key index meets this file when the log lists it; it need not read it then.
    store._keys.stage(action.path, FileKeys.of(rows, presorted=True))
    return action
