"""Every stream of a type folded at once, in worker processes, with bounded memory.

The aggregate_id space is cut into ranges of about ``chunk_events`` events; any cut keeps every
stream whole. Each range is folded by a worker process (``fold_chunk``), which puts its rows in
stream order first. The fold travels to the workers with cloudpickle, so lambdas and closures
from a notebook cell work.

Two ways to feed the workers:

- from a store, with at most an instant bound: each worker reads its range's row groups straight
  from the Parquet files the Delta log lists (the footers' aggregate_id statistics say which), so
  the parent only hands out ranges and gathers states;
- otherwise (a ``where`` in SQL, an attached lake): the parent reads each range with DuckDB and
  sends it to a worker.

Workers are forked: spawning would re-import a script's ``__main__`` in each of them. They never
touch DuckDB, whose threads a fork leaves behind; pyarrow, msgspec and the fold are safe.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from multiprocessing import get_context
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import cloudpickle  # type: ignore[import-untyped]
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esworkbench.aggregates import Aggregate
from esworkbench.engine import EAGER, Folder, MissingColumn, Row, Source, fold_chunk
from esworkbench.errors import EsWorkbenchError
from esworkbench.events import TIMESTAMP

if TYPE_CHECKING:
    from esworkbench.query import Params

__all__ = ["Folded", "fold_columns", "paused_gc"]

Range = tuple[str | None, str | None, int]  # aggregate_ids from (inclusive) to (exclusive), size
Groups = list[tuple[str, list[int]]]  # Parquet files and the row groups of a range in each
_WORKER: dict[str, Any] = {}


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector while millions of short-lived objects are made.

    Folding allocates a dict per event; each full collection would walk every state kept so
    far, so collections grow with the result. Refcounting still frees what a fold drops; cycles
    a fold makes wait for the collector, which runs again afterwards.

    Examples:
        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Folded:
    """Folded streams as columns: ids, versions, last recorded_at (µs), and the states, spread
    into ``names`` and one list of ``values`` per name when every state is a dict with exactly
    those keys, else in ``states``.

    Examples:
        >>> folded = Folded.of([("a", 1, 0, {"n": 1}), ("b", 2, 0, {"n": 2})])
        >>> folded.names, folded.values, folded.rows()[1]
        (['n'], [[1, 2]], ('b', 2, 0, {'n': 2}))
    """

    __slots__ = ("ids", "names", "recorded", "states", "values", "versions")

    def __init__(
        self,
        ids: list[str],
        versions: list[int],
        recorded: list[int],
        names: list[str] | None,
        values: list[list[Any]] | None,
        states: list[Any] | None,
    ) -> None:
        self.ids, self.versions, self.recorded = ids, versions, recorded
        self.names, self.values, self.states = names, values, states

    @classmethod
    def of(cls, rows: list[Row]) -> Folded:
        """The columns of rows of :func:`~esworkbench.engine.fold_chunk`.

        Examples:
            >>> Folded.of([("a", 1, 0, {"n": 1}), ("b", 1, 0, {"m": 2})]).states
            [{'n': 1}, {'m': 2}]
        """
        ids, versions, recorded, states = (list(map(itemgetter(i), rows)) for i in range(4))
        keys = states[0].keys() if states and type(states[0]) is dict else None
        if keys is not None and all(type(s) is dict and s.keys() == keys for s in states):
            names = list(keys)
            if len(names) == 1:
                values = [list(map(itemgetter(names[0]), states))]
            elif names:  # one pass over the states, then the tuples turned into columns
                values = [list(c) for c in zip(*map(itemgetter(*names), states), strict=True)]
            else:
                values = []
            return cls(ids, versions, recorded, names, values, None)
        return cls(ids, versions, recorded, None, None, states)

    def dicts(self) -> list[Any]:
        """The states, as the fold made them.

        Examples:
            >>> Folded.of([("a", 1, 0, {"n": 1})]).dicts()
            [{'n': 1}]
        """
        if self.states is not None:
            return self.states
        names = self.names or []
        if not names:
            return [{} for _ in self.ids]
        return [dict(zip(names, row, strict=True)) for row in zip(*self.values or [], strict=True)]

    def rows(self) -> list[Row]:
        """One (aggregate_id, version, recorded_at µs, state) tuple per stream.

        Examples:
            >>> Folded.of([("a", 3, 7, "open")]).rows()
            [('a', 3, 7, 'open')]
        """
        return list(zip(self.ids, self.versions, self.recorded, self.dicts(), strict=True))

    @classmethod
    def merge(cls, chunks: list[Folded]) -> Folded:
        """The chunks one after the other: spread if every chunk is, with the same names.

        Examples:
            >>> one, two = Folded.of([("a", 1, 0, {"n": 1})]), Folded.of([("b", 1, 0, {"n": 2})])
            >>> Folded.merge([one, two]).values
            [[1, 2]]
        """
        ids: list[str] = []
        versions: list[int] = []
        recorded: list[int] = []
        for chunk in chunks:
            ids += chunk.ids
            versions += chunk.versions
            recorded += chunk.recorded
        names = chunks[0].names if chunks else None
        if names is None or any(chunk.names != names for chunk in chunks):
            states: list[Any] = []
            for chunk in chunks:
                states += chunk.dicts()
            return cls(ids, versions, recorded, None, None, states)
        values: list[list[Any]] = [[] for _ in names]
        for chunk in chunks:
            for column, part in zip(values, chunk.values or [], strict=True):
                column += part
        return cls(ids, versions, recorded, names, values, None)


def fold_columns(
    source: Source,
    aggregate: Aggregate,
    where: str = "true",
    params: Params = None,
    *,
    until: datetime | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    chunk_events: int = 100_000,
) -> Folded:
    """Folds every stream of the aggregate's type, in aggregate_id order, as columns.

    Only events passing ``where`` (SQL over the ``events`` view, values in ``params``) and
    recorded by ``until`` are folded. Workers send their streams back as columns (a dict state
    spread into one list per key), which cost the parent far less to take in than a tuple and a
    dict per stream.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("Opened", {"owner": "Ann"})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> folded = fold_columns(store, esw.generic("Account"), workers=1)
        >>> folded.ids, folded.versions, folded.names, folded.values
        (['acc-1'], [1], ['owner'], [['Ann']])
    """
    from tqdm.auto import tqdm

    direct = _footers(source, aggregate.name) if where == "true" else None
    if direct is not None:
        ranges, groups = _cut_footers(direct, chunk_events)
    else:
        if until is not None:
            where, params = f"({where}) AND recorded_at <= ?", [*(params or []), until]
        ranges = _ranges(source, where, [aggregate.name, *(params or [])], chunk_events)
        groups = []
    count = sum(size for _, _, size in ranges)
    workers = _workers(workers, count)
    disable = None if progress is None else not progress
    folder = Folder(aggregate)
    chunks: list[Folded] = []
    with tqdm(total=count, unit="event", desc=f"replay {aggregate.name}", disable=disable) as bar:
        if direct is not None:
            columns = list(EAGER)
            tasks = [(lo, hi, g, until) for (lo, hi, _), g in zip(ranges, groups, strict=True)]
            if workers <= 1:
                try:
                    for task, (_, _, size) in zip(tasks, ranges, strict=True):
                        chunks.append(_fold_files(folder, columns, *task))
                        bar.update(size)
                finally:
                    for handle in _WORKER.pop("files", {}).values():
                        handle.close()
            else:
                with _pool(aggregate, workers) as pool:
                    for result, size in _bounded(pool, _fold_files_in_worker, tasks, ranges):
                        chunks.append(result())
                        bar.update(size)
        else:
            reader = _DuckDBReader(source, aggregate.name, where, params)
            if workers <= 1:
                for lo, hi, size in ranges:
                    chunks.append(_fold_read(folder, reader, lo, hi))
                    bar.update(size)
            else:
                with _pool(aggregate, workers) as pool:
                    for (lo, hi, size), (result, _) in zip(
                        ranges,
                        _bounded(pool, _fold_rows_in_worker, _lazy(reader, ranges), ranges),
                        strict=True,
                    ):
                        try:
                            chunks.append(result())
                        except MissingColumn as missing:  # read it too, fold the range here
                            reader.columns.append(missing.name)
                            chunks.append(_fold_read(folder, reader, lo, hi))
                        bar.update(size)
        bar.total = bar.n  # the sizes were estimates
    return Folded.merge(chunks)


@contextmanager
def _pool(aggregate: Aggregate, workers: int) -> Iterator[ProcessPoolExecutor]:
    payload = cloudpickle.dumps(aggregate)
    with (
        warnings.catch_warnings(),
        ProcessPoolExecutor(workers, get_context("fork"), _init_worker, (payload,)) as pool,
    ):
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        yield pool


def _lazy(reader: _DuckDBReader, ranges: list[Range]) -> Iterator[tuple[pa.Table]]:
    for lo, hi, _ in ranges:
        yield (reader.read(lo, hi),)


def _bounded(
    pool: ProcessPoolExecutor,
    function: Callable[..., Folded],
    tasks: Iterable[tuple[Any, ...]],
    ranges: list[Range],
) -> Iterator[tuple[Callable[[], Folded], int]]:
    """Submits the tasks in order, a few in flight at most; yields each result in order."""
    limit = 2 * pool._max_workers  # type: ignore[attr-defined]
    pending: list[tuple[Future[Folded], int]] = []
    for task, (_, _, size) in zip(tasks, ranges, strict=True):
        if not pending:
            # The first submit forks the workers. Objects frozen then are never collected in
            # them: a collection walking what the parent's other threads (DuckDB's) had half
            # built at the fork crashes the worker.
            gc.freeze()
            try:
                pending.append((pool.submit(function, *task), size))
            finally:
                gc.unfreeze()
            continue
        pending.append((pool.submit(function, *task), size))
        while len(pending) > limit:
            future, done = pending.pop(0)
            yield future.result, done
    for future, done in pending:
        yield future.result, done


def _init_worker(payload: bytes) -> None:
    _WORKER.update(folder=Folder(cloudpickle.loads(payload)), columns=list(EAGER))


def _fold_rows_in_worker(table: pa.Table) -> Folded:
    with paused_gc():
        return Folded.of(fold_chunk(_WORKER["folder"], table))


def _fold_files_in_worker(
    lo: str | None, hi: str | None, groups: Groups, until: datetime | None
) -> Folded:
    with paused_gc():
        return _fold_files(_WORKER["folder"], _WORKER["columns"], lo, hi, groups, until)


def _fold_files(
    folder: Folder,
    columns: list[str],
    lo: str | None,
    hi: str | None,
    groups: Groups,
    until: datetime | None,
) -> Folded:
    """Reads a range's row groups from the store's files and folds them."""
    return _fold_reading(folder, columns, lambda: _read_files(groups, columns, lo, hi, until))


def _read_files(
    groups: Groups, columns: list[str], lo: str | None, hi: str | None, until: datetime | None
) -> pa.Table:
    parts = [
        _parquet(path).read_row_groups(indexes, columns=columns, use_threads=False)
        for path, indexes in groups
    ]
    if not parts:
        return pa.table({c: [] for c in columns})
    table = pa.concat_tables(parts, promote_options="permissive")
    ids = table["aggregate_id"]
    tests = (
        None if lo is None else pc.greater_equal(ids, lo),
        None if hi is None else pc.less(ids, hi),
        None if until is None else pc.less_equal(table["recorded_at"], pa.scalar(until, TIMESTAMP)),
    )
    keep = None
    for test in tests:
        if test is not None:
            keep = test if keep is None else pc.and_(keep, test)
    return table if keep is None else table.filter(keep)


def _parquet(path: str) -> pq.ParquetFile:
    """An open Parquet file, kept per process: parsing a footer again for each range is a
    millisecond per file per range."""
    opened: dict[str, pq.ParquetFile] = _WORKER.setdefault("files", {})
    found = opened.get(path)
    if found is None:
        if len(opened) >= 256:
            for handle in opened.values():
                handle.close()
            opened.clear()
        found = opened[path] = pq.ParquetFile(path)
    return found


class _DuckDBReader:
    """Reads a range of streams through the source's SQL (in the parent process)."""

    def __init__(self, source: Source, aggregate_type: str, where: str, params: Params) -> None:
        self.source = source
        self.args = [aggregate_type, *(params or [])]
        self.where = where
        self.columns = list(EAGER)

    def read(self, lo: str | None, hi: str | None) -> pa.Table:
        bounds = [("aggregate_id >= ?", lo), ("aggregate_id < ?", hi)]
        query = (
            f"SELECT {', '.join(self.columns)} FROM events WHERE aggregate_type = ? "
            f"AND ({self.where})" + "".join(f" AND {t}" for t, v in bounds if v is not None)
        )
        values = [value for _, value in bounds if value is not None]
        return self.source.sql(query, [*self.args, *values]).to_arrow_table()


def _fold_read(folder: Folder, reader: _DuckDBReader, lo: str | None, hi: str | None) -> Folded:
    return _fold_reading(folder, reader.columns, lambda: reader.read(lo, hi))


def _fold_reading(folder: Folder, columns: list[str], read: Callable[[], pa.Table]) -> Folded:
    """Folds what ``read`` gives; a fold that asks for a column not read gets it read (added
    to ``columns``, which ``read`` reads) and the range folded again."""
    while True:
        try:
            return Folded.of(fold_chunk(folder, read()))
        except MissingColumn as missing:
            columns.append(missing.name)


# -- cutting the id space ----------------------------------------------------------------------


def _footers(source: Source, aggregate_type: str) -> list[tuple[str, str, str, int, int]] | None:
    """Every row group of the type's files: (min id, max id, path, index, rows); None if the
    source is not a store or a file lacks the statistics."""
    from esworkbench.store import Store

    if not isinstance(source, Store):
        return None
    files = source.files
    if files.num_rows == 0:
        return []
    if "partition.aggregate_type" not in files.column_names:
        return None
    chosen = files.filter(pc.equal(files["partition.aggregate_type"], aggregate_type))
    groups = []
    for path in source._absolute(chosen["path"].to_pylist()):
        footer = source._index._footer(path)  # the store's cache of footers
        for index, (low, high) in enumerate(footer.ranges):
            if low is None or high is None:
                return None
            groups.append((low, high, path, index, footer.metadata.row_group(index).num_rows))
    return sorted(groups)


def _cut_footers(
    groups: list[tuple[str, str, str, int, int]], chunk_events: int
) -> tuple[list[Range], list[Groups]]:
    """Ranges of about ``chunk_events`` rows by the row groups' statistics, and per range the
    row groups whose id span meets it."""
    starts: list[str | None] = [None]
    sizes = [0]
    for low, _, _, _, size in groups:
        if sizes[-1] >= chunk_events and low != starts[-1]:
            starts.append(low)
            sizes.append(0)
        sizes[-1] += size
    ends = [*starts[1:], None]
    ranges = list(zip(starts, ends, sizes, strict=True))
    chosen: list[Groups] = []
    for lo, hi, _ in ranges:
        by_file: dict[str, list[int]] = {}
        for low, high, path, index, _ in groups:
            if (lo is None or high >= lo) and (hi is None or low < hi):
                by_file.setdefault(path, []).append(index)
        chosen.append(list(by_file.items()))
    return ranges, chosen


def _ranges(source: Source, where: str, args: list[Any], chunk_events: int) -> list[Range]:
    """Consecutive ranges of aggregate_ids holding about ``chunk_events`` events each."""
    counts = source.sql(
        f"SELECT aggregate_id, count(*) FROM events WHERE aggregate_type = ? AND ({where}) "
        "GROUP BY aggregate_id ORDER BY aggregate_id",
        args,
    ).to_arrow_table()
    if counts.num_rows == 0:
        return []
    ids = counts.column(0)
    sizes = counts.column(1).to_numpy()
    ends = np.cumsum(sizes)
    group = (ends - 1) // max(chunk_events, 1)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(group)) + 1])
    stops = np.concatenate([starts[1:], [len(sizes)]])
    return [
        (
            None if a == 0 else ids[int(a)].as_py(),
            None if b == len(sizes) else ids[int(b)].as_py(),
            int(sizes[a:b].sum()),
        )
        for a, b in zip(starts, stops, strict=True)
    ]


def _workers(workers: int | None, events: int) -> int:
    if workers is not None:
        if not isinstance(workers, int) or workers < 1:
            raise EsWorkbenchError(f"workers={workers!r} must be a positive integer")
        return workers
    if events < 200_000:  # starting processes costs more than folding this few events
        return 1
    return min(os.cpu_count() or 1, 8)
