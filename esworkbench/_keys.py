"""An in-memory index of the store's event_ids and stream heads that follows the Delta log exactly.

A batch append needs two answers about everything stored: is any of its event_ids stored already,
and where does each of its streams stand (last version and aggregate_type). Scanning the store for
them costs more with every commit. The index answers from memory instead: it is built from the
data files the Delta log lists, the first time a batch needs it, and then follows the log. Files
this process commits are added from what it wrote; files another process committed are read; a
file that leaves the log (compaction) makes the index start again from the files that remain.
Nothing of it is written to disk, so no crash can leave it stale: it is exactly the log's files.

Keys are 64-bit hashes of the text, which can collide. A miss is certain; a hit is only a
candidate, confirmed against the exact event_id (by the caller, in the few files that hold it)
or the exact aggregate_id (here).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esworkbench import _layout
from esworkbench.errors import CorruptStoreError
from esworkbench.query import Session

Keys = npt.NDArray[np.uint64]
_NONE: Final = -1
# Events whose notes are kept while the index is not built yet (a build reads files instead).
_MAX_NOTED_UNBUILT: Final = 2_000_000


def hash_text(values: pa.Array | pa.ChunkedArray) -> Keys:
    """64-bit keys of strings, equal for equal strings within one process (never stored).

    Examples:
        >>> import pyarrow as pa
        >>> keys = hash_text(pa.array(["a", "b", "a"]))
        >>> bool(keys[0] == keys[2]), bool(keys[0] == keys[1])
        (True, False)
    """
    with _HASHING:
        connection = _hasher()
        connection.register("_esw_text", pa.table({"text": values}))
        try:
            keys = connection.sql("SELECT hash(text) AS k FROM _esw_text").to_arrow_table()
        finally:
            connection.unregister("_esw_text")
    out: Keys = keys["k"].to_numpy().astype(np.uint64, copy=False)
    return out


@functools.cache
def _hasher() -> duckdb.DuckDBPyConnection:
    """DuckDB's hash, on a connection of its own: duckdb is loaded anyway, and it hashes a
    batch of ids in a few milliseconds."""
    return duckdb.connect()


_HASHING: Final = threading.Lock()


@dataclass(frozen=True, slots=True)
class FileKeys:
    """What one data file adds to the index: a key per event, and each stream's last version."""

    event_keys: Keys
    streams: pa.Table  # aggregate_id, version (the stream's last in the file), aggregate_type

    @classmethod
    def of(cls, rows: pa.Table, *, presorted: bool = False) -> FileKeys:
        """Describes rows about to be (or already) written as one file."""
        return cls(hash_text(rows["event_id"]), last_versions(rows, presorted=presorted))


def last_versions(rows: pa.Table, *, presorted: bool = False) -> pa.Table:
    """One row per stream: its highest version among ``rows`` and that row's aggregate_type.

    ``presorted``: the rows are sorted by (aggregate_id, version) already, as a data file is.

    Examples:
        >>> import pyarrow as pa
        >>> rows = pa.table({"aggregate_id": ["a", "b", "a"], "version": [1, 1, 2],
        ...                  "aggregate_type": ["A", "B", "A"]})
        >>> last_versions(rows).sort_by("aggregate_id").to_pylist()[0]
        {'aggregate_id': 'a', 'version': 2, 'aggregate_type': 'A'}
    """
    picked = rows.select(["aggregate_id", "version", "aggregate_type"]).combine_chunks()
    count = picked.num_rows
    if count == 0:
        return picked
    if presorted:
        ids = picked["aggregate_id"].chunk(0)
        last = np.ones(count, dtype=bool)
        if count > 1:
            last[:-1] = pc.not_equal(ids.slice(1), ids.slice(0, count - 1)).to_numpy(
                zero_copy_only=False
            )
        return picked.filter(pa.array(last))
    order = pc.sort_indices(picked, [("aggregate_id", "ascending"), ("version", "descending")])
    ids = picked["aggregate_id"].take(order)
    first = np.ones(count, dtype=bool)
    if count > 1:
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, count - 1)).to_numpy(
            zero_copy_only=False
        )
    keep = order.filter(pa.array(first))
    return pa.table(
        [picked[name].take(keep).combine_chunks() for name in picked.column_names],
        names=picked.column_names,
    )


class _Heads:
    """Stream heads. Each stream has a slot (the order it was first seen) holding its
    aggregate_id, head and aggregate_type; ``keys`` is sorted and packs the high 32 bits of the
    stream's hash with its slot, so adding streams moves one array, and a lookup finds the
    candidates by hash and confirms each against the exact aggregate_id."""

    def __init__(self) -> None:
        self.keys: Keys = np.empty(0, np.uint64)
        self.ids: pa.Array = pa.array([], pa.string())
        self.heads = np.empty(0, np.int64)
        self.kinds = np.empty(0, np.int32)
        self.kind_names: list[str] = []
        self._kind_codes: dict[str, int] = {}

    def locate(self, ids: pa.Array, keys: Keys) -> npt.NDArray[np.int64]:
        """The slot of each id (exact text match), or -1."""
        found = np.full(len(ids), _NONE, np.int64)
        if len(self.keys) == 0 or len(ids) == 0:
            return found
        high = keys & _STREAM_HIGH
        order = np.argsort(high)
        start = np.empty(len(keys), np.int64)
        stop = np.empty(len(keys), np.int64)
        start[order] = np.searchsorted(self.keys, high[order], "left")
        stop[order] = np.searchsorted(self.keys, high[order] | _STREAM_LOW, "right")
        count = stop - start
        single = np.flatnonzero(count == 1)
        if len(single):
            slots = (self.keys[start[single]] & _STREAM_LOW).astype(np.int64)
            stored = self.ids.take(pa.array(slots))
            same = pc.equal(stored, ids.take(pa.array(single))).to_numpy(zero_copy_only=False)
            found[single[same]] = slots[same]
        for row in np.flatnonzero(count > 1):  # streams sharing 32 bits of hash: rare
            wanted = ids[int(row)].as_py()
            for key in self.keys[int(start[row]) : int(stop[row])]:
                slot = int(key & _STREAM_LOW)
                if self.ids[slot].as_py() == wanted:
                    found[row] = slot
                    break
        return found

    def _codes(self, kinds: pa.Array) -> npt.NDArray[np.int32]:
        encoded = pc.dictionary_encode(kinds).combine_chunks()
        names = encoded.dictionary.to_pylist()
        table = np.array([self._code(str(name)) for name in names], np.int32)
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        return table[indices] if len(table) else np.empty(0, np.int32)

    def _code(self, name: str) -> int:
        code = self._kind_codes.get(name)
        if code is None:
            code = self._kind_codes[name] = len(self.kind_names)
            self.kind_names.append(name)
        return code

    def merge(self, streams: pa.Table) -> None:
        """Raises heads to the last versions of ``streams`` (one row per stream)."""
        if streams.num_rows == 0:
            return
        ids = streams["aggregate_id"].combine_chunks()
        keys = hash_text(ids)
        versions = streams["version"].to_numpy()
        kinds = self._codes(streams["aggregate_type"])
        found = self.locate(ids, keys)
        old = np.flatnonzero(found != _NONE)
        if len(old):
            slots = found[old]
            higher = versions[old] >= self.heads[slots]
            self.heads[slots[higher]] = versions[old][higher]
            self.kinds[slots[higher]] = kinds[old][higher]
        new = np.flatnonzero(found == _NONE)
        if len(new) == 0:
            return
        first = len(self.heads)
        if first + len(new) > int(_STREAM_LOW):
            raise CorruptStoreError(
                "the key index holds more than 2^32 streams. Hint: append in smaller stores"
            )
        slots = np.arange(first, first + len(new), dtype=np.uint64)
        packed = np.sort((keys[new] & _STREAM_HIGH) | slots)
        self.keys = np.insert(self.keys, np.searchsorted(self.keys, packed), packed)
        self.ids = pa.concat_arrays([self.ids, ids.take(pa.array(new))])
        self.heads = np.concatenate([self.heads, versions[new]])
        self.kinds = np.concatenate([self.kinds, kinds[new]])

    def lookup(self, ids: pa.Array, keys: Keys) -> tuple[npt.NDArray[np.int64], pa.Array]:
        """Each stream's head (0 when unknown) and stored aggregate_type (null when unknown)."""
        found = self.locate(ids, keys)
        known = found != _NONE
        heads = np.zeros(len(ids), np.int64)
        heads[known] = self.heads[found[known]]
        codes = np.zeros(len(ids), np.int32)
        codes[known] = self.kinds[found[known]]
        names = pa.array(self.kind_names or [""], pa.string())
        indices = pa.array(codes, mask=~known)
        return heads, pa.DictionaryArray.from_arrays(indices, names).dictionary_decode()


# The low half of a stream key holds the stream's slot (see _Heads).
_STREAM_LOW: Final = np.uint64(0xFFFFFFFF)
_STREAM_HIGH: Final = ~_STREAM_LOW


class _EventKeys:
    """Event keys in a few sorted runs; each key carries the number of the file holding it.

    A key is the event_id's hash with its low :data:`_FILE_BITS` bits replaced by the file's
    number, so a run is one sorted array and merging two runs is one sort of a concatenation
    (two sorted runs merge in linear time). A lookup compares the high bits only, and a match
    names the file; numbers beyond :data:`_FILE_BITS` bits wrap, and then a match names every
    file sharing the low bits, which the exact confirmation sorts out.

    A new commit's keys make a new run; a run is merged into the one before it once that one is
    no larger, as a binary counter carries, so a key is merged about log2(commits) times.
    """

    def __init__(self) -> None:
        self.runs: list[Keys] = []
        self.files = 0

    def add(self, files: Sequence[tuple[Keys, int]]) -> None:
        """Adds the keys of files, given with their numbers, as one run."""
        parts = [(keys & _HIGH) | np.uint64(number & _LOW) for keys, number in files if len(keys)]
        self.files = max([self.files, *(number + 1 for _, number in files)])
        if not parts:
            return
        run = np.concatenate(parts)
        run.sort()
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]) <= len(self.runs[-1]):
            newer = self.runs.pop()
            merged = np.concatenate([self.runs.pop(), newer])
            merged.sort(kind="stable")  # finds the two sorted runs and merges them
            self.runs.append(merged)

    def files_hit(self, keys: Keys) -> set[int]:
        """Numbers of the files that may hold an event whose key is among ``keys``."""
        if len(keys) == 0 or not self.runs:
            return set()
        high = np.sort(keys & _HIGH)  # sorted lookups keep the search in cache
        residues: set[int] = set()
        for run in self.runs:
            start = np.searchsorted(run, high, "left")
            inside = np.minimum(start, len(run) - 1)
            hit = np.flatnonzero((start < len(run)) & ((run[inside] & _HIGH) == high))
            if len(hit) == 0:
                continue
            stop = np.searchsorted(run, high[hit] | _LOW, "right")
            for first, last in zip(start[hit], stop, strict=True):
                residues.update(int(k) for k in run[int(first) : int(last)] & _LOW)
        if not residues:
            return set()
        if self.files <= int(_LOW) + 1:
            return residues
        return {n for n in range(self.files) if n & int(_LOW) in residues}


# Low bits of an event key that hold the file's number (see _EventKeys).
_FILE_BITS: Final = 20
_LOW: Final = np.uint64((1 << _FILE_BITS) - 1)
_HIGH: Final = ~_LOW


class KeyIndex:
    """Event keys and stream heads of exactly the files of one Delta log snapshot.

    The store calls :meth:`follow` with the log's files under its write lock; answers are
    brought up to date lazily, so a store that never appends a batch never builds the index.
    After its own commit the store lets the index catch up in a thread, while the caller
    prepares its next batch; every other call waits for that thread first.

    Examples:
        >>> import pyarrow as pa, tempfile
        >>> index = KeyIndex(Path(tempfile.mkdtemp()))
        >>> index.follow(pa.table({"path": pa.array([], pa.string())}))
        >>> heads, kinds = index.heads(pa.array(["acc-1"]))
        >>> int(heads[0]), kinds.to_pylist()
        (0, [None])
    """

    def __init__(self, table_path: Path) -> None:
        self.table_path = table_path
        self._root = str(table_path) + os.sep
        self._wanted: list[str] = []
        self._staged: dict[str, FileKeys] = {}
        self._pending: threading.Thread | None = None
        self._failed = False
        self._reset()

    def _reset(self) -> None:
        self._built = False
        self._paths: list[str] = []
        self._numbers: dict[str, int] = {}
        self._events = _EventKeys()
        self._heads = _Heads()
        self._overlay: tuple[tuple[str, ...], _EventKeys, _Heads] | None = None

    def follow(self, files: pa.Table, *, background: bool = False) -> None:
        """Sets the files the answers must cover (the ``path`` column of the log's files).

        Notes of staged files that the log does not list are dropped: they belong to an
        append that failed, or to one being staged now, which registers them again.
        ``background``: catch up in a thread (see :meth:`_wait`).
        """
        self._wait()
        self._wanted = [unquote(p) for p in files["path"].to_pylist()] if files.num_rows else []
        listed = set(self._wanted)
        self._staged = {p: keys for p, keys in self._staged.items() if p in listed}
        self._overlay = None
        if not self._built:
            if sum(len(n.event_keys) for n in self._staged.values()) > _MAX_NOTED_UNBUILT:
                self._staged.clear()  # the build will read these files instead
        elif any(path not in listed for path in self._paths):
            self._reset()  # a file left the log (compaction): build again when next asked
        elif background:
            # Not a daemon: the interpreter waits for it at exit. A daemon thread killed inside
            # Arrow's C++ at shutdown aborts the process ("exception not rethrown").
            self._pending = threading.Thread(target=self._sync_quietly, daemon=False)
            self._pending.start()
        else:
            self._sync()  # keeps the notes few: adds what this process wrote, reads the rest

    def _sync_quietly(self) -> None:
        try:
            self._sync()
        except BaseException:  # the next synchronous call meets it again, and raises
            self._failed = True

    def _wait(self) -> None:
        """Waits for a catch-up running in a thread; after a failed one, starts afresh."""
        if self._pending is None:
            return
        self._pending.join()
        self._pending = None
        if self._failed:
            self._failed = False
            self._reset()

    @property
    def built(self) -> bool:
        """Whether the index has been built (a build reads the files it has no notes of)."""
        return self._built

    def stage(self, relative_path: str, keys: FileKeys) -> None:
        """Notes what a written, not yet committed file holds, for when the log lists it."""
        self._staged[relative_path] = keys

    def _sync(self) -> None:
        wanted = self._wanted
        if len(self._paths) == len(wanted) and self._paths == wanted:
            return
        listed = set(wanted)
        if any(path not in listed for path in self._paths):
            self._reset()
        self._built = True
        added = [path for path in wanted if path not in self._numbers]
        unknown = [path for path in added if path not in self._staged]
        read = dict(zip(unknown, self._read(unknown), strict=True))
        events, streams = [], []
        for path in added:
            keys = self._staged.pop(path, None) or read[path]
            number = len(self._paths)
            self._paths.append(path)
            self._numbers[path] = number
            events.append((keys.event_keys, number))
            streams.append(keys.streams)
        self._events.add(events)
        if streams:
            self._heads.merge(_merged_streams(streams))

    def _read(self, paths: Sequence[str]) -> list[FileKeys]:
        """Reads what the index needs from committed files this process did not write."""
        if not paths:
            return []
        columns = ["event_id", "aggregate_id", "version", "aggregate_type"]

        def read(path: str) -> FileKeys:
            target = self.table_path / path
            try:
                rows = pq.read_table(target, columns=columns)
            except (OSError, pa.ArrowException) as exc:
                raise CorruptStoreError(
                    f"the data file {target} cannot be read: {exc}. Hint: the file the Delta "
                    "log names is missing or damaged; restore it from a backup"
                ) from exc
            return FileKeys.of(rows, presorted=_layout.is_sorted(rows, ["aggregate_id", "version"]))

        if len(paths) == 1:
            return [read(paths[0])]
        with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
            return list(pool.map(read, paths))

    def _relative(self, path: str) -> str:
        return path[len(self._root) :] if path.startswith(self._root) else path

    def _overlay_of(self, staged: Sequence[str]) -> tuple[_EventKeys, _Heads] | None:
        """The staged files' keys and heads, kept while the same files (and more) are asked."""
        if not staged:
            return None
        wanted = tuple(self._relative(p) for p in staged)
        overlay = self._overlay
        if overlay is None or wanted[: len(overlay[0])] != overlay[0]:
            overlay = ((), _EventKeys(), _Heads())
        done, events, heads = overlay
        added, streams = [], []
        for number, path in enumerate(wanted[len(done) :], start=len(done)):
            keys = self._staged[path]
            added.append((keys.event_keys, number))
            streams.append(keys.streams)
        events.add(added)
        if streams:
            heads.merge(_merged_streams(streams))
        self._overlay = (wanted, events, heads)
        return events, heads

    def files_holding(self, event_keys: Keys, staged: Sequence[str] = ()) -> list[str]:
        """Absolute paths of the committed (or listed staged) files that may hold these events.

        A file not returned certainly holds none of them.
        """
        self._wait()
        self._sync()
        numbers = self._events.files_hit(event_keys)
        paths = [str(self.table_path / self._paths[n]) for n in sorted(numbers)]
        overlay = self._overlay_of(staged)
        if overlay is not None:
            paths += [staged[n] for n in sorted(overlay[0].files_hit(event_keys))]
        return paths

    def heads(
        self, ids: pa.Array, staged: Sequence[str] = ()
    ) -> tuple[npt.NDArray[np.int64], pa.Array]:
        """Head version (0: no events) and stored aggregate_type of each distinct stream."""
        self._wait()
        self._sync()
        keys = hash_text(ids)
        heads, kinds = self._heads.lookup(ids, keys)
        overlay = self._overlay_of(staged)
        if overlay is not None:
            staged_heads, staged_kinds = overlay[1].lookup(ids, keys)
            later = staged_heads > heads
            heads = np.where(later, staged_heads, heads)
            kinds = pc.if_else(pa.array(later), staged_kinds, kinds)
        return heads, kinds

    def knows(self, staged: Iterable[str]) -> bool:
        """Whether every one of these staged files was noted by :meth:`stage`."""
        self._wait()
        return all(self._relative(p) in self._staged for p in staged)


def _merged_streams(parts: list[pa.Table]) -> pa.Table:
    return parts[0] if len(parts) == 1 else last_versions(pa.concat_tables(parts))


class KeyedSession(Session):
    """The store's DuckDB session, carrying the store's key index for the write path."""

    def __init__(self, keys: KeyIndex) -> None:
        super().__init__()
        self.keys = keys
