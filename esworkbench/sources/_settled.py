"""Reading PostgreSQL sources only as far as their positions are settled.

A sequence hands out ids when rows are inserted, but rows become visible when their transactions
commit, which may happen in another order: while a writer holds id 1 uncommitted, another
commits id 2. An import that read id 2 and moved its checkpoint there would never read id 1. So a
reader passes a gap in positions only once no transaction that could still fill it is running.

Which transactions could? One that took an id below the highest visible one took it before that
row committed, so before the reader's snapshot (a sequence's values grow in the order they are
taken), and from then until it ends it holds a write lock on the table (an INSERT takes it before
computing its id) or on the sequence (``nextval`` takes it). So the reading transaction
(REPEATABLE READ: rows and snapshot agree) starts with one small query that takes the snapshot
and then lists, from ``pg_locks`` (live, not MVCC), the other transactions holding such a lock
on the table, on the tables a view reads directly, or on the sequences of their column
defaults; it also counts the transactions in progress at the snapshot (``pg_snapshot_xip``) that
have committed since (``pg_xact_status``): they may have written the table, unseen.

- None of either (the usual case): every gap is permanent (a rolled-back insert, a deleted row)
  and every visible row is read, as fast as without the check.
- Some: rows are read up to the first gap past ``after`` (on a first read, a first position
  above 1 counts as one). There the reader waits, up to :data:`SETTLE_SECONDS`, for the lock
  holders to end, then reads the rest of what its snapshot saw (up to the highest position it
  saw) in a new snapshot, which sees all they committed: a gap left there is permanent. If some
  are still running, the read ends at the gap and returns :class:`Unsettled`; the next read
  starts there. Rows past the first snapshot's highest position are left for the next read.

Limits: ids must grow in the order they are taken, as a sequence's do with ``CACHE 1`` (the
default). A writer is missed if it took its id before the snapshot without yet having a
transaction id and committed in the microseconds between the snapshot and the reading of
``pg_locks`` within the same statement. Needs PostgreSQL 13 or later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import pyarrow as pa

from esworkbench.sources._sql import run, stream

if TYPE_CHECKING:
    from adbc_driver_manager.dbapi import Connection
    from psycopg import sql

__all__ = ["SETTLE_SECONDS", "Source", "Unsettled", "between", "first_gap", "read_settled"]

SETTLE_SECONDS: float = 5.0
"""How long a reader waits at a gap for the transactions that may fill it (read at each call)."""
_POLL_SECONDS: Final = 0.05

# The first statement of the reading transaction: it takes the snapshot, then reads pg_locks.
_WRITERS: Final = """
WITH named AS (
    SELECT to_regclass(name)::oid AS rel FROM jsonb_array_elements_text($1::jsonb) AS name
), tables AS (  -- with the tables a view reads
    SELECT rel FROM named
    UNION
    SELECT d.refobjid FROM named n JOIN pg_rewrite r ON r.ev_class = n.rel
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
    WHERE d.refclassid = 'pg_class'::regclass
), watched AS (  -- with the sequences of their column defaults
    SELECT rel FROM tables
    UNION
    SELECT d.refobjid FROM tables t JOIN pg_attrdef a ON a.adrelid = t.rel
    JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
    WHERE d.refclassid = 'pg_class'::regclass
)
SELECT
    (SELECT coalesce(jsonb_agg(DISTINCT l.virtualtransaction), '[]')::text FROM pg_locks l
     WHERE l.locktype = 'relation' AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.relation IN (SELECT rel FROM watched)
       AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                      'AccessExclusiveLock')
       AND l.pid IS DISTINCT FROM pg_backend_pid()) AS running,
    (SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
     WHERE pg_xact_status(x) = 'committed') AS committed
"""
# Every running transaction holds a lock on its own virtual transaction id.
_STILL_RUNNING: Final = """
SELECT count(DISTINCT virtualtransaction) AS running FROM pg_locks
WHERE virtualtransaction IN (SELECT jsonb_array_elements_text($1::jsonb))
"""


@dataclass(frozen=True, slots=True)
class Unsettled:
    """Why a read ended before the last visible row: the rows past ``position`` were left for
    the next read, because ``writers`` transactions that may still write the position after it
    were running.

    Examples:
        >>> Unsettled(position=41, writers=1)
        Unsettled(position=41, writers=1)
    """

    position: int
    writers: int


@dataclass(frozen=True, slots=True)
class Source:
    """A PostgreSQL source as :func:`read_settled` reads it.

    ``relations`` are the SQL names whose writers matter (the table or view, and any sequence
    that writers draw positions from outside the column default); ``highest`` is a query for the
    highest position; ``rows(after, upto)`` the query for the rows past ``after`` (and up to
    ``upto``, when given) in position order, with a ``source_position`` column.
    """

    relations: Sequence[str]
    highest: str
    rows: Callable[[int, int | None], str]


def read_settled(
    connection: Connection,
    source: Source,
    *,
    after: int,
    batch_size: int,
    finish: Callable[[pa.Table], pa.Table],
    seconds: float | None = None,
) -> Generator[pa.Table, None, Unsettled | None]:
    """Yields ``finish`` of each batch of settled rows past ``after``; see the module docstring.

    Returns:
        None when every row visible at the start was read, else :class:`Unsettled`.
    """
    connection.rollback()  # a new transaction: its first statement below takes the snapshot
    run(connection, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    found = run(connection, _WRITERS, (json.dumps(list(source.relations)),)).to_pylist()[0]
    running: list[str] = json.loads(found["running"])
    if not running and not found["committed"]:
        with closing(stream(connection, source.rows(after, None), batch_size)) as batches:
            for batch in batches:
                yield finish(batch)
        return None
    upto = run(connection, source.highest).column(0)[0].as_py()
    if upto is None or upto <= after:
        return None
    last = after
    with closing(stream(connection, source.rows(after, None), batch_size)) as batches:
        for batch in batches:
            cut = first_gap(batch["source_position"], last)
            settled = batch if cut is None else batch.slice(0, cut)
            if settled.num_rows:
                last = int(settled["source_position"][-1].as_py())
                yield finish(settled)
            if cut is not None:
                break
        else:
            return None
    connection.rollback()
    still = _wait(connection, running, SETTLE_SECONDS if seconds is None else seconds)
    if still:
        return Unsettled(position=last, writers=still)
    with closing(stream(connection, source.rows(last, upto), batch_size)) as batches:
        for batch in batches:
            yield finish(batch)
    return None


def _wait(connection: Connection, running: list[str], seconds: float) -> int:
    """How many of these transactions still run after up to ``seconds`` of waiting for them."""
    deadline = time.monotonic() + seconds
    ids = (json.dumps(running),)
    while True:
        still = int(run(connection, _STILL_RUNNING, ids).column(0)[0].as_py()) if running else 0
        left = deadline - time.monotonic()
        if not still or left <= 0:
            connection.rollback()
            return still
        time.sleep(min(_POLL_SECONDS, left))


def first_gap(positions: pa.ChunkedArray | pa.Array, last: int) -> int | None:
    """The index of the first row more than one position past the row before it (the first
    row: past ``last``), or None when the positions are contiguous.

    Examples:
        >>> first_gap(pa.array([3, 4, 5]), 2), first_gap(pa.array([3, 4, 6]), 2)
        (None, 2)
        >>> first_gap(pa.array([5, 6]), 0)
        0
    """
    values = positions.to_numpy()
    gaps = np.flatnonzero(np.diff(values, prepend=last) > 1)
    return int(gaps[0]) if len(gaps) else None


def between(column: sql.Composable, after: int, upto: int | None) -> sql.Composable:
    """The condition ``column > after``, and ``column <= upto`` when ``upto`` is given.

    Examples:
        >>> from psycopg import sql
        >>> between(sql.Identifier("id"), 4, 9).as_string()
        '"id" > 4 AND "id" <= 9'
    """
    from psycopg import sql  # the postgres extra: only PostgreSQL sources reach here

    above = sql.SQL("{} > {}").format(column, sql.Literal(after))
    if upto is None:
        return above
    return sql.SQL("{} AND {} <= {}").format(above, column, sql.Literal(upto))
