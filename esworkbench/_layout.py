"""How events lie on disk: partition directories, sorted Parquet files and their Delta actions.

The partition value of a file always comes from the Delta log. The directory name is only a
readable, safe rendering of it (Hive-style escaping, as Spark and delta-rs write it), so that a
value such as ``../x`` or ``a/b`` can never name a place outside the table, and a value too long
for one path component gets a hashed name instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from esworkbench.events import EVENT_SCHEMA

PARTITION_COLUMN: Final = "aggregate_type"
SORT_KEYS: Final = [("aggregate_id", "ascending"), ("version", "ascending")]
_STAT_COLUMNS: Final = ("position", "version", "aggregate_id", "schema_version")
# Characters Hive and Spark escape in partition directory names, plus control characters.
_ESCAPE: Final = frozenset("\"#%'*/:=?\\\x7f{[]^<>|") | {chr(c) for c in range(32)}
_MAX_COMPONENT_BYTES: Final = 200
# Dictionary encoding pays only where values repeat; ids and payloads are mostly unique.
_DICTIONARY_COLUMNS: Final = ["event_type", "aggregate_type", "aggregate_id", "user_id"]


def partition_dir(value: str) -> str:
    """Returns the directory name for one aggregate_type, safe on every filesystem path.

    Examples:
        >>> partition_dir("Account")
        'aggregate_type=Account'
        >>> partition_dir("../x")
        'aggregate_type=..%2Fx'
    """
    escaped = "".join(f"%{ord(ch):02X}" if ch in _ESCAPE else ch for ch in value)
    name = f"{PARTITION_COLUMN}={escaped}"
    if len(name.encode()) <= _MAX_COMPONENT_BYTES:
        return name
    digest = hashlib.sha256(value.encode()).hexdigest()[:24]
    head = escaped[:48].rstrip("%0123456789ABCDEF") if "%" in escaped[:48] else escaped[:48]
    return f"{PARTITION_COLUMN}={head}~{digest}"


def fsync(path: Path) -> None:
    """Flushes a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_stats(table: pa.Table) -> str:
    """The Delta stats JSON of a table about to be written (numRecords, min, max, nulls)."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    for name in _STAT_COLUMNS:
        bounds = pc.min_max(table[name])
        mins[name] = bounds["min"].as_py()
        maxs[name] = bounds["max"].as_py()
    nulls = {name: table[name].null_count for name in table.column_names}
    # Raw UTF-8, not \ud840\udc00 escapes: the Delta reader decodes surrogate pairs above
    # U+1FFFF to another character, and a wrong max would prune the file from stream reads.
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        ensure_ascii=False,
    )


def gather(rows: pa.Table, order: pa.Array) -> pa.Table:
    """Takes rows in ``order``, column by column, two columns at a time.

    Gathering each column on its own is several times faster here than ``Table.take``, and
    Arrow gathers outside the GIL, so two threads keep both cores busy.

    Examples:
        >>> import pyarrow as pa
        >>> gather(pa.table({"a": [1, 2, 3]}), pa.array([2, 0, 1]))["a"].to_pylist()
        [3, 1, 2]
    """
    columns = rows.columns
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        taken = list(pool.map(lambda column: column.take(order), columns))
    return pa.table(taken, schema=rows.schema)


def sort_rows(rows: pa.Table, keys: list[tuple[str, str]] = SORT_KEYS) -> pa.Table:
    """Sorts rows by (aggregate_id, version), or by ``keys``."""
    return gather(rows, pc.sort_indices(rows, keys))


def is_sorted(rows: pa.Table, keys: list[str]) -> bool:
    """Whether rows are in ascending order of ``keys`` (lexicographic), without sorting.

    Examples:
        >>> import pyarrow as pa
        >>> is_sorted(pa.table({"a": ["x", "x", "y"], "b": [1, 2, 1]}), ["a", "b"])
        True
        >>> is_sorted(pa.table({"a": ["x", "x", "y"], "b": [2, 1, 1]}), ["a", "b"])
        False
    """
    count = rows.num_rows
    if count < 2:
        return True
    # Row i precedes row i+1 when, at the first key where they differ, it is smaller.
    decided = pa.array(np.zeros(count - 1, dtype=bool))
    for name in keys:
        column = rows[name]
        before, after = column.slice(0, count - 1), column.slice(1)
        if column.null_count:
            return False
        if pc.any(pc.and_(pc.invert(decided), pc.greater(before, after))).as_py():
            return False
        decided = pc.or_(decided, pc.less(before, after))
    return True


def partitions(rows: pa.Table) -> list[tuple[str, pa.Table]]:
    """Splits rows into one sorted slice per aggregate_type, sorting only if they are not."""
    keys = [PARTITION_COLUMN] + [name for name, _ in SORT_KEYS]
    ordered = (
        rows
        if is_sorted(rows, keys)
        else sort_rows(rows, [(PARTITION_COLUMN, "ascending"), *SORT_KEYS])
    )
    runs = pc.run_end_encode(ordered[PARTITION_COLUMN].combine_chunks())
    ends = runs.run_ends.to_pylist()
    starts = [0, *ends[:-1]]
    kinds = runs.values.to_pylist()
    return [
        (kind, ordered.slice(start, end - start))
        for kind, start, end in zip(kinds, starts, ends, strict=True)
    ]


def write_file(
    table_root: Path,
    aggregate_type: str,
    rows: pa.Table,
    *,
    row_group_size: int,
    presorted: bool = False,
    data_change: bool = True,
) -> AddAction:
    """Writes rows of one aggregate_type, sorted by (aggregate_id, version), as a durable file.

    The file is flushed to disk before the caller commits it, so a commit never names a file
    that a crash could lose.
    """
    relative = f"{partition_dir(aggregate_type)}/part-{uuid.uuid4().hex}.parquet"
    target = table_root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    ordered = (rows if presorted else sort_rows(rows)).cast(EVENT_SCHEMA)
    pq.write_table(
        ordered,
        target,
        row_group_size=row_group_size,
        compression="zstd",
        compression_level=1,
        use_dictionary=_DICTIONARY_COLUMNS,
        sorting_columns=pq.SortingColumn.from_ordering(EVENT_SCHEMA, SORT_KEYS),
    )
    fsync(target)
    fsync(target.parent)
    action = add_action(relative, target, aggregate_type, file_stats(ordered))
    action.data_change = data_change
    return action


def add_action(relative: str, target: Path, aggregate_type: str, stats: str) -> AddAction:
    """Builds the Delta add action for a file that already lies in the table."""
    return AddAction(
        path=relative,
        size=target.stat().st_size,
        partition_values={PARTITION_COLUMN: aggregate_type},
        modification_time=int(time.time() * 1000),
        data_change=True,
        stats=stats,
    )
