"""Hashes of the rows the eventsourcing library recorded, as it wrote them (see ``_digest``).

A stored event's hash covers its position and the row as stored (``originator_id``,
``originator_version``, ``topic``, ``state``), not its decoding: checking the rows up to a
checkpoint then reads them without decoding a single state, which is most of the reader's work.
The same function hashes the rows the import reads and the rows a later check reads again, in
SQLite and in PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any, Final, cast

import duckdb
import numpy as np
import pyarrow as pa

from esworkbench.sources._digest import HASH_VERSION, Tally, row_hashes
from esworkbench.sources._recorders import stored_table

if TYPE_CHECKING:
    from collections.abc import Generator

    from esworkbench.sources._recorders import Recorder, Row

__all__ = ["SCHEME", "raw_hashes", "recorder_digest"]

SCHEME: Final = f"eventsourcing-{HASH_VERSION}/2"
"""The digest scheme of the hashes made here (a change to them must change it)."""


def raw_hashes(rows: Sequence[Row], connection: duckdb.DuckDBPyConnection) -> np.ndarray[Any, Any]:
    """The hash of each stored row ``(position, originator_id, version, topic, state)``.

    Examples:
        >>> rows = [(1, "a1", 1, "m:A.Opened", b'{"x": 1}'), (2, "a1", 2, "m:A.Done", b"{}")]
        >>> hashes = raw_hashes(rows, duckdb.connect())
        >>> len(hashes), bool(hashes[0] != hashes[1])
        (2, True)
    """
    return row_hashes(stored_table(rows), connection)


def recorder_digest(
    recorder: Recorder, positions: Sequence[int], *, batch_size: int = 100_000
) -> list[tuple[int, int]]:
    """For each position (ascending), the stored rows up to it and the sum of their hashes;
    the rows past the last position are not read."""
    tally = Tally(wanted=positions)
    upto = positions[-1]
    batches = cast("Generator[pa.Table, None, None]", recorder.stored(0, batch_size))
    with duckdb.connect() as connection, closing(batches):
        for table in batches:
            found = np.asarray(table["position"].to_numpy(), np.int64)
            kept = int(np.searchsorted(found, upto, side="right"))
            tally.add(found[:kept], row_hashes(table.slice(0, kept), connection))
            if kept < len(found):
                break
    tally.close()
    return [tally.found[position] for position in positions]
