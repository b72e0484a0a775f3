"""Sorted runs of 64-bit keys with integer values: what an import remembers, batch by batch.

Inserting a batch into one sorted array moves the whole array each time, which makes a long
import quadratic. Here each batch becomes a run of its own, and runs of similar size are merged
(like the carries of a binary counter), so adding n keys costs O(n log N) over the import and a
lookup searches a handful of runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Places", "SortedRuns"]

Places = list[tuple[int, np.ndarray, np.ndarray]]
"""Where found keys live: (run, indices into the looked-up keys, indices into the run)."""


@dataclass
class SortedRuns:
    """Unique uint64 keys, each with ``width`` int64 values.

    Examples:
        >>> import numpy as np
        >>> runs = SortedRuns(width=1)
        >>> runs.add(np.array([3, 7], np.uint64), np.array([[30], [70]]))
        >>> values, found, _ = runs.find(np.array([1, 7], np.uint64))
        >>> found.tolist(), values[:, 0].tolist()
        ([False, True], [0, 70])
    """

    width: int
    _runs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

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
        return values, found, places

    def update(self, places: Places, values: np.ndarray) -> None:
        """Sets the values of keys found by :meth:`find` (no run was added in between)."""
        for number, hit, at in places:
            self._runs[number][1][at] = values[hit]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds sorted keys that are not present yet."""
        if len(keys) == 0:
            return
        self._runs.append((keys, values.reshape(len(keys), self.width)))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a, va), (b, vb) = self._runs[-2], self._runs[-1]
            merged = np.concatenate([a, b])
            order = np.argsort(merged, kind="stable")  # two sorted runs: a linear merge
            self._runs[-2:] = [(merged[order], np.concatenate([va, vb])[order])]
