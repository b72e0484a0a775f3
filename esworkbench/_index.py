"""A stream index: the aggregate_id range of every row group, read once from the file footers.

Data files never change once written, so their footers are read once and kept. A stream read then
decodes only the row groups whose range covers the stream, in the files whose range (from the
Delta log) covers it: one or two row groups of one file after compaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esworkbench.errors import CorruptStoreError

_KEPT_FILES: Final = 8192


class _Footer:
    __slots__ = ("metadata", "ranges")

    def __init__(self, metadata: pq.FileMetaData, ranges: list[tuple[str | None, str | None]]):
        self.metadata = metadata
        self.ranges = ranges


class RowGroupIndex:
    """Finds and reads the row groups of one stream.

    Examples:
        >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> path = tempfile.mkdtemp() + "/f.parquet"
        >>> pq.write_table(pa.table({"aggregate_id": ["a", "b", "c"], "version": [1, 1, 1]}),
        ...                path, row_group_size=1)
        >>> RowGroupIndex().read([path], "b", ["aggregate_id", "version"]).to_pylist()
        [{'aggregate_id': 'b', 'version': 1}]
    """

    def __init__(self) -> None:
        self._footers: OrderedDict[str, _Footer] = OrderedDict()
        self._lock = threading.Lock()

    def _footer(self, path: str) -> _Footer:
        with self._lock:
            footer = self._footers.get(path)
            if footer is not None:
                self._footers.move_to_end(path)
                return footer
        try:
            metadata = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptStoreError(
                f"the data file {path} cannot be read: {exc}. Hint: the file the Delta log "
                "names is missing or damaged; restore it from a backup"
            ) from exc
        column = metadata.schema.to_arrow_schema().get_field_index("aggregate_id")
        ranges: list[tuple[str | None, str | None]] = []
        for index in range(metadata.num_row_groups):
            stats = metadata.row_group(index).column(column).statistics
            if stats is None or not stats.has_min_max:
                ranges.append((None, None))
            else:
                ranges.append((stats.min, stats.max))
        footer = _Footer(metadata, ranges)
        with self._lock:
            self._footers[path] = footer
            if len(self._footers) > _KEPT_FILES:
                self._footers.popitem(last=False)
        return footer

    def read(self, paths: Sequence[str], aggregate_id: str, columns: Sequence[str]) -> pa.Table:
        """Rows of the stream from these files, decoding only the row groups that can hold it."""
        parts: list[pa.Table] = []
        for path in paths:
            footer = self._footer(path)
            groups = [
                index
                for index, (low, high) in enumerate(footer.ranges)
                if (low is None or low <= aggregate_id) and (high is None or aggregate_id <= high)
            ]
            if not groups:
                continue
            try:
                rows = pq.ParquetFile(path, metadata=footer.metadata).read_row_groups(
                    groups, columns=list(columns)
                )
            except (OSError, pa.ArrowException) as exc:
                raise CorruptStoreError(
                    f"the data file {path} cannot be read: {exc}. Hint: restore it from a backup"
                ) from exc
            parts.append(rows.filter(pc.equal(rows["aggregate_id"], aggregate_id)))
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts)
