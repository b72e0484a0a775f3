"""What an import keeps of the rows it read, so that the next import can tell whether they changed.

Every row read gets a 64-bit hash of its content and its source position. A digest is a few
marks along the source: at a source position, how many rows the source held up to it and the sum
of their hashes (mod 2**64). The position is in each hash, so the sum depends on the order of the
rows; it changes when a row up to the mark changes, goes, or is added, and two marks bracket a
change: the rows between the last mark that still agrees and the first that does not.

Sums, not a chained hash, because a database computes them in one aggregate over its own rows
(see :mod:`esworkbench.sources._digest_sql`), and because a sum up to any row can be a mark: the
marks of an import are chosen among its rows (every row of a small source, an even share of a
large one), at most :data:`MAX_MARKS` of them, keeping as many rows between each pair.

The hashes of rows that the importer reads itself (files, the eventsourcing library's recorders)
come from :func:`row_hashes`: DuckDB's ``hash()`` of the row's values. It is the same on every
machine; it may change between DuckDB's releases, so the digests' schemes name DuckDB's version
(:data:`HASH_VERSION`), and a digest of another version is made again rather than compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final

import duckdb
import numpy as np
import pyarrow as pa

__all__ = ["HASH_VERSION", "MAX_MARKS", "ROW_HASH", "Digest", "Mark", "Tally", "row_hashes", "thin"]

ROW_HASH: Final = "_esw_row_hash"
"""The column of a reader's batches that holds each row's hash, when the source computes it."""
MAX_MARKS: Final = 256
"""The most marks a digest keeps (about 10 kB of a store's ``imports.json``)."""
HASH_VERSION: Final = f"duckdb-{duckdb.__version__}"
"""What :func:`row_hashes` depends on, for the schemes of digests made with it."""
_TABLE: Final = "_esw_hashed"


@dataclass(frozen=True, slots=True)
class Mark:
    """At source ``position``: the ``rows`` up to it and the sum of their hashes (``total``).

    Examples:
        >>> Mark(4, rows=4, total=255).to_json()
        [4, 4, '00000000000000ff']
        >>> Mark.from_json([4, 4, "00000000000000ff"])
        Mark(position=4, rows=4, total=255)
    """

    position: int
    rows: int
    total: int

    def to_json(self) -> list[object]:
        """The mark as ``imports.json`` keeps it: position, rows, the total in 16 hex digits."""
        return [self.position, self.rows, f"{self.total:016x}"]

    @staticmethod
    def from_json(item: Any) -> Mark:
        """The mark :meth:`to_json` wrote.

        Raises:
            ValueError: ``item`` is not such a mark.
        """
        position, rows, total = item
        if isinstance(position, bool) or not isinstance(position, int) or not isinstance(rows, int):
            raise ValueError(f"not a mark: {item!r}")
        return Mark(position, rows, int(total, 16))


@dataclass(frozen=True, slots=True)
class Digest:
    """The marks of a source's rows up to its last imported position, and how rows were hashed.

    ``scheme`` names the hash: two digests are compared only when it is the same.

    Examples:
        >>> digest = Digest("rows/1", (Mark(2, 2, 7), Mark(5, 4, 9)))
        >>> Digest.from_json(digest.to_json()) == digest, digest.position
        (True, 5)
        >>> Digest.from_json({"scheme": "rows/1", "marks": "?"}) is None
        True
    """

    scheme: str
    marks: tuple[Mark, ...]

    @property
    def position(self) -> int:
        """The last position the digest covers (its last mark's)."""
        return self.marks[-1].position

    def to_json(self) -> dict[str, object]:
        """The digest as ``imports.json`` keeps it."""
        return {"scheme": self.scheme, "marks": [mark.to_json() for mark in self.marks]}

    @staticmethod
    def from_json(body: object) -> Digest | None:
        """The digest :meth:`to_json` wrote; None for anything else (read as no digest)."""
        if not isinstance(body, Mapping) or not isinstance(body.get("scheme"), str):
            return None
        try:
            marks = tuple(Mark.from_json(item) for item in body["marks"])
        except (KeyError, TypeError, ValueError):
            return None
        if not marks or any(a.position >= b.position for a, b in pairwise(marks)):
            return None
        return Digest(str(body["scheme"]), marks)


def thin(marks: Sequence[Mark], limit: int = MAX_MARKS) -> list[Mark]:
    """At most ``limit`` of the marks, the last always, the others about as many rows apart.

    Examples:
        >>> marks = [Mark(p, p, 0) for p in range(1, 11)]
        >>> [m.position for m in thin(marks, 4)]
        [3, 5, 8, 10]
    """
    if len(marks) <= limit:
        return list(marks)
    rows = np.fromiter((mark.rows for mark in marks), np.int64, len(marks))
    targets = np.arange(1, limit) * (rows[-1] / limit)
    picks = np.unique(np.searchsorted(rows, targets, side="left"))
    return [marks[int(i)] for i in picks if i < len(marks) - 1] + [marks[-1]]


class Tally:
    """The running count and sum of row hashes along a source read in position order.

    It gives the values at ``wanted`` positions (the marks of an earlier digest, to compare) and
    proposes marks for a new digest. It may start from the values at a position already counted
    (``rows`` and ``total``), to go on past it.

    Examples:
        >>> tally = Tally(wanted=[2, 9])
        >>> tally.add(np.array([1, 2, 3]), np.array([5, 6, 7], np.uint64))
        >>> tally.found, tally.counted_past(2), tally.counted_past(9)
        ({2: (2, 11)}, True, False)
        >>> tally.close()
        >>> tally.found[9], tally.marks()[-1]
        ((3, 18), Mark(position=3, rows=3, total=18))
    """

    def __init__(self, *, rows: int = 0, total: int = 0, wanted: Iterable[int] = ()) -> None:
        self.rows = rows
        self.total = total
        self.position: int | None = None  # the last position counted
        self.found: dict[int, tuple[int, int]] = {}
        self._wanted = np.array(sorted(set(wanted)), np.int64)
        self._proposed: list[Mark] = []

    def counted_past(self, position: int) -> bool:
        """Whether every row up to ``position`` has been counted (a later one was)."""
        return self.position is not None and self.position >= position

    def add(self, positions: np.ndarray[Any, Any], hashes: np.ndarray[Any, Any]) -> None:
        """Counts rows, in order of their (strictly increasing) positions."""
        n = len(positions)
        if n == 0:
            return
        sums = np.cumsum(hashes.astype(np.uint64, copy=False), dtype=np.uint64)
        sums += np.uint64(self.total)  # wraps: the sums are mod 2**64
        due = self._wanted[self._wanted <= positions[-1]]
        for position in due.tolist():
            k = int(np.searchsorted(positions, position, side="right"))
            self.found[position] = (self.rows + k, int(sums[k - 1]) if k else self.total)
        self._wanted = self._wanted[len(due) :]
        if self._proposed and self._proposed[-1].position >= positions[0]:
            self._proposed.pop()  # a position in two batches: only its last row can be a mark
        step = max(1, n // (2 * MAX_MARKS))
        for i in [*range(step - 1, n - 1, step), n - 1]:
            self._proposed.append(Mark(int(positions[i]), self.rows + i + 1, int(sums[i])))
        if len(self._proposed) > 4 * MAX_MARKS:
            self._proposed = thin(self._proposed, 2 * MAX_MARKS)
        self.rows += n
        self.total = int(sums[-1])
        self.position = int(positions[-1])

    def close(self) -> None:
        """The end of the source: wanted positions past its last row hold every row."""
        for position in self._wanted.tolist():
            self.found[position] = (self.rows, self.total)
        self._wanted = self._wanted[:0]

    def marks(self, before: Sequence[Mark] = ()) -> list[Mark]:
        """Marks for a new digest: ``before`` (up to where the tally started), then its own."""
        return thin([*before, *self._proposed])


# -- the hash of a row that the importer reads itself ------------------------------------------


def row_hashes(table: pa.Table, connection: duckdb.DuckDBPyConnection) -> np.ndarray[Any, Any]:
    """A 64-bit hash of each row of ``table``: DuckDB's ``hash()`` of all its columns in order
    (null apart from every value, so a null text is not an empty one).

    DuckDB's hash is the same on every machine but may change between its releases: the
    schemes of the digests made with it name DuckDB's version (:data:`HASH_VERSION`), so after
    an upgrade a digest is not compared but made again. It costs about a tenth of MD5 of the row.

    Args:
        table: the rows (any column types DuckDB reads from Arrow).
        connection: a DuckDB connection (the table is registered there for the call).

    Returns:
        A ``uint64`` array with one hash per row.

    Examples:
        >>> connection = duckdb.connect()
        >>> hashes = row_hashes(pa.table({"p": [1, 2, 3], "s": ["a", None, ""]}), connection)
        >>> hashes.dtype, len(set(hashes.tolist()))
        (dtype('uint64'), 3)
        >>> again = row_hashes(pa.table({"p": [1, 2, 3], "s": ["a", None, ""]}), connection)
        >>> bool((again == hashes).all())
        True
    """
    columns = ", ".join(_quote(name) for name in table.column_names)
    connection.register(_TABLE, table)
    try:
        found = connection.sql(f"SELECT hash({columns}) FROM {_TABLE}").to_arrow_table()
    finally:
        connection.unregister(_TABLE)
    hashes: np.ndarray[Any, Any] = np.asarray(found.column(0).to_numpy(), np.uint64)
    return hashes


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
