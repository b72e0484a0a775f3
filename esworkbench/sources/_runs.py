"""Sorted runs of 64-bit keys with integer values: what an import remembers, batch by batch.

Inserting a batch into one sorted array moves the whole array each time, which makes a long
import quadratic. Here each batch becomes a run of its own, and runs of similar size are merged
(like the carries of a binary counter), so adding n keys costs O(n log N) over the import and a
lookup searches a handful of runs.

An import remembers something for every event, so what it keeps in memory would grow with the
source. Once the runs in memory pass ``memory_bytes``, they are merged into one sorted run in a
file (a spill), chunk by chunk, and memory starts again from nothing. A lookup reads the spill in
chunks too: a batch's keys are spread over the whole key space, so they meet nearly every page
of it anyway, and reading it costs about what searching it in memory would. Memory stays bounded
by ``memory_bytes`` plus a chunk, whatever the length of the source; the price is one pass over
the spill per batch (a memory copy from the page cache, some milliseconds a million keys).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np

__all__ = ["MEMORY_BYTES", "Places", "SortedRuns"]

MEMORY_BYTES = 8 << 20
"""The most bytes of keys and values an import keeps in memory for one structure by default."""

_CHUNK: Final = 1 << 18  # keys read from a spill at a time
_SPILLED: Final = -1  # the run number of the spill in Places

Places = list[tuple[int, np.ndarray, np.ndarray]]
"""Where found keys live: (run, indices into the looked-up keys, indices into the run)."""


class SortedRuns:
    """Unique uint64 keys, each with ``width`` int64 values, spilled to ``folder`` past
    ``memory_bytes`` (kept in memory when ``folder`` is None).

    Examples:
        >>> import numpy as np, tempfile
        >>> runs = SortedRuns(width=1, folder=tempfile.mkdtemp(), memory_bytes=16)
        >>> runs.add(np.array([3, 7], np.uint64), np.array([[30], [70]]))
        >>> runs.add(np.array([5], np.uint64), np.array([[50]]))
        >>> values, found, places = runs.find(np.array([1, 5, 7], np.uint64))
        >>> found.tolist(), values[:, 0].tolist(), len(runs)
        ([False, True, True], [0, 50, 70], 3)
        >>> runs.update(places, values + 1)
        >>> runs.find(np.array([7], np.uint64))[0][:, 0].tolist()
        [71]
    """

    def __init__(
        self,
        *,
        width: int,
        folder: str | os.PathLike[str] | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        self.width = width
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._memory = 0  # keys in self._runs
        budget = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._limit = max(1, budget // (8 * (1 + width)))
        self._spill = _Spill(Path(folder), width) if folder is not None else None

    def __len__(self) -> int:
        return self._memory + (len(self._spill) if self._spill else 0)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, Places]:
        """Values (zero where absent), whether each key is present, and where it lives.

        ``keys`` must be sorted (searching sorted needles is much faster).
        """
        values = np.zeros((len(keys), self.width), np.int64)
        found = np.zeros(len(keys), dtype=bool)
        places: Places = []
        for number, (run, stored) in enumerate(self._runs):
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            hit = np.flatnonzero(run[at] == keys)
            if len(hit) == 0:
                continue
            values[hit] = stored[at[hit]]
            found[hit] = True
            places.append((number, hit, at[hit]))
        if self._spill is not None and len(self._spill):
            hit, at = self._spill.find(keys)
            if len(hit):
                values[hit] = self._spill.values(at)
                found[hit] = True
                places.append((_SPILLED, hit, at))
        return values, found, places

    def update(self, places: Places, values: np.ndarray) -> None:
        """Sets the values of keys found by :meth:`find` (no key was added in between)."""
        for number, hit, at in places:
            if number == _SPILLED:
                assert self._spill is not None
                self._spill.update(at, values[hit])
            else:
                self._runs[number][1][at] = values[hit]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds sorted keys that are not present yet."""
        if len(keys) == 0:
            return
        self._runs.append((keys, values.reshape(len(keys), self.width)))
        self._memory += len(keys)
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a, va), (b, vb) = self._runs[-2], self._runs[-1]
            self._runs[-2:] = [_merged(a, va, b, vb)]
        if self._spill is not None and self._memory > self._limit:
            while len(self._runs) > 1:
                (a, va), (b, vb) = self._runs[-2], self._runs[-1]
                self._runs[-2:] = [_merged(a, va, b, vb)]
            self._spill.merge(*self._runs.pop())
            self._memory = 0


def _merged(
    a: np.ndarray, va: np.ndarray, b: np.ndarray, vb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    merged = np.concatenate([a, b])
    order = np.argsort(merged, kind="stable")  # two sorted runs: a linear merge
    return merged[order], np.concatenate([va, vb])[order]


class _Spill:
    """One sorted run in files: the keys (uint64) and their values (int64 rows of ``width``).

    Read and written with plain file calls, never mapped: a mapped file's pages would count in
    the process's memory as much as an array does.
    """

    def __init__(self, folder: Path, width: int) -> None:
        self._folder = folder
        self._width = width
        self._count = 0
        self._generation = 0
        self._keys = folder / "keys-0.u64"
        self._values = folder / "values-0.i64"

    def __len__(self) -> int:
        return self._count

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first, keys) of each chunk of the spilled keys, in order."""
        with self._keys.open("rb") as file:
            for start in range(0, self._count, _CHUNK):
                yield start, np.fromfile(file, np.uint64, min(_CHUNK, self._count - start))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of the sorted ``keys`` are spilled (their indices), and where."""
        hits, places = [], []
        for start, chunk in self._chunks():
            lo = int(np.searchsorted(keys, chunk[0], "left"))
            hi = int(np.searchsorted(keys, chunk[-1], "right"))
            if lo == hi:
                continue
            at = np.searchsorted(chunk, keys[lo:hi])  # < len(chunk): keys <= chunk[-1]
            hit = np.flatnonzero(chunk[at] == keys[lo:hi])
            hits.append(hit + lo)
            places.append(at[hit] + start)
        if not hits:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(hits), np.concatenate(places)

    def _rows(self, at: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """The sorted places ``at`` by chunk: (which of them, first row, rows) to read."""
        for first in range(0, self._count, _CHUNK):
            lo, hi = np.searchsorted(at, [first, first + _CHUNK])
            if lo < hi:
                low = int(at[lo])
                yield np.arange(lo, hi), low, int(at[hi - 1]) - low + 1

    def values(self, at: np.ndarray) -> np.ndarray:
        """The values at the sorted places ``at``."""
        out = np.empty((len(at), self._width), np.int64)
        if self._width == 0:
            return out
        row = 8 * self._width
        with self._values.open("rb") as file:
            for which, first, count in self._rows(at):
                file.seek(first * row)
                block = np.fromfile(file, np.int64, count * self._width)
                out[which] = block.reshape(count, self._width)[at[which] - first]
        return out

    def update(self, at: np.ndarray, values: np.ndarray) -> None:
        """Sets the values at the sorted places ``at``."""
        if self._width == 0:
            return
        row = 8 * self._width
        with self._values.open("r+b") as file:
            for which, first, count in self._rows(at):
                file.seek(first * row)
                block = np.fromfile(file, np.int64, count * self._width).reshape(-1, self._width)
                block[at[which] - first] = values[which]
                file.seek(first * row)
                block.tofile(file)

    def merge(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Merges a sorted run of new keys into the spill, a chunk at a time."""
        self._generation += 1
        keys_to = self._folder / f"keys-{self._generation}.u64"
        values_to = self._folder / f"values-{self._generation}.i64"
        taken = 0
        with keys_to.open("wb") as out_keys, values_to.open("wb") as out_values:
            if self._count:
                values_from = self._values.open("rb")
                with values_from:
                    for start, chunk in self._chunks():
                        old = np.fromfile(values_from, np.int64, len(chunk) * self._width)
                        upto = len(keys) if start + len(chunk) == self._count else None
                        if upto is None:
                            upto = int(np.searchsorted(keys, chunk[-1], "right"))
                        merged, rows = _merged(
                            chunk,
                            old.reshape(len(chunk), self._width),
                            keys[taken:upto],
                            values[taken:upto],
                        )
                        merged.tofile(out_keys)
                        rows.tofile(out_values)
                        taken = upto
            keys[taken:].tofile(out_keys)
            values[taken:].tofile(out_values)
        for old_file in (self._keys, self._values):
            old_file.unlink(missing_ok=True)
        self._keys, self._values = keys_to, values_to
        self._count += len(keys)
