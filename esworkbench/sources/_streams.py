"""Stream continuity during an import: which rows continue their stream, and which cannot.

An import places its rows against the stream heads the store had when it began plus what the
import itself has placed so far. Those heads live in a DuckDB table for the length of the import,
so each batch needs one query: no scan of the files the import has staged, no Python loop over
rows. A row breaks its stream when its version leaves a gap, repeats a version the stream has
(a duplicate (aggregate_id, version)), or its aggregate_type differs from the stream's. Once a
row of a stream is refused (by this check or by the field checks), the stream's later rows cannot
continue it without a gap, so they are refused too, with a reason that points at the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.query import Session

__all__ = ["Continuity", "Verdict"]

_HEADS: Final = "_esw_import_heads"
_BATCH: Final = "_esw_import_batch"

# One row per row of the batch (good rows, then refused ones), in batch order: its version (when
# it continues its stream), its problem (when it does not), and the first refused source position
# of its stream. Rows are ranked by source position, so a stream breaks where a refused row stands.
_JUDGE: Final = f"""
WITH ids AS (SELECT DISTINCT aggregate_id FROM {_BATCH}),
known AS (
    SELECT h.* FROM {_HEADS} h SEMI JOIN ids USING (aggregate_id)
),
stored AS (
    SELECT aggregate_id, max(version) AS head, arg_max(aggregate_type, version) AS kind,
           CAST(NULL AS BIGINT) AS broken_at
    FROM events
    WHERE aggregate_id IN (SELECT aggregate_id FROM ids ANTI JOIN known USING (aggregate_id))
    GROUP BY aggregate_id
),
heads AS (SELECT * FROM known UNION ALL SELECT * FROM stored),
ranked AS (
    SELECT b.*, coalesce(h.head, 0) AS head, h.broken_at,
           coalesce(h.kind, first_value(b.aggregate_type) OVER w) AS kind,
           row_number() OVER w AS rank
    FROM {_BATCH} b LEFT JOIN heads h USING (aggregate_id)
    WINDOW w AS (PARTITION BY b.aggregate_id ORDER BY b.source_position)
),
judged AS (
    SELECT *, CASE
        WHEN refused THEN 'refused'
        WHEN broken_at IS NOT NULL THEN 'broken'
        WHEN aggregate_type <> kind THEN 'type'
        WHEN version IS NOT NULL AND version < head + rank THEN 'duplicate'
        WHEN version IS NOT NULL AND version > head + rank THEN 'gap'
    END AS problem
    FROM ranked
)
SELECT _i, head + rank AS next_version, problem, kind, broken_at,
       min(CASE WHEN problem IS NOT NULL THEN source_position END)
           OVER (PARTITION BY aggregate_id) AS first_bad
FROM judged ORDER BY _i
"""

# The heads after the batch: each stream moves by its rows that continue it.
_MOVE: Final = f"""
INSERT OR REPLACE INTO {_HEADS}
SELECT aggregate_id, coalesce(max(next_version) FILTER (WHERE ok), min(next_version) - 1),
       any_value(kind), min(first_bad)
FROM {_BATCH} GROUP BY aggregate_id
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of a batch: the rows that continue their streams, and the rest.

    ``good`` holds the rows that continue their streams, with their versions filled in;
    ``refused`` the rows that do not, in source order, each with a reason in ``reasons``, and in
    ``heads`` the stream's head where the row is a version conflict (else None).
    """

    good: pa.Table
    refused: pa.Table
    reasons: list[str]
    heads: list[int | None]


class Continuity:
    """The heads of the streams an import touches, moved batch by batch."""

    def __init__(self, session: Session) -> None:
        self._session = session
        session.execute(
            f"CREATE OR REPLACE TEMP TABLE {_HEADS} (aggregate_id VARCHAR PRIMARY KEY, "
            "head BIGINT, kind VARCHAR, broken_at BIGINT)"
        )

    def close(self) -> None:
        """Drops the heads table."""
        self._session.execute(f"DROP TABLE IF EXISTS {_HEADS}")

    def judge(self, good: pa.Table, bad: pa.Table) -> Verdict:
        """Splits ``good`` (rows that passed the field checks, in source order) into rows that
        continue their streams and rows that cannot; ``bad`` (rows the field checks refused)
        break their streams from their source position on."""
        count = good.num_rows
        streamed = bad.filter(pc.is_valid(bad["aggregate_id"]))
        total = count + streamed.num_rows
        columns = {"_i": pa.array(np.arange(total), pa.int64())}
        for name in ("source_position", "aggregate_id", "aggregate_type", "version"):
            columns[name] = pa.concat_arrays(
                [good[name].combine_chunks(), streamed[name].combine_chunks()]
            )
        columns["refused"] = pa.array(np.arange(total) >= count, pa.bool_())
        batch = pa.table(columns)
        session = self._session
        with session._lock:
            connection = session.connection
            connection.register(_BATCH, batch)
            try:
                out = connection.sql(_JUDGE).to_arrow_table()
            finally:
                connection.unregister(_BATCH)
            positions = batch["source_position"]
            problem = out["problem"]
            first_bad = out["first_bad"]
            ok = pc.and_(
                pc.is_null(problem),
                pc.fill_null(pc.less(positions, first_bad), True),
            )
            moved = pa.table(
                {
                    "aggregate_id": batch["aggregate_id"],
                    "next_version": out["next_version"],
                    "kind": out["kind"],
                    "first_bad": pc.coalesce(out["broken_at"], first_bad),
                    "ok": ok,
                }
            )
            connection.register(_BATCH, moved)
            try:
                connection.execute(_MOVE)
            finally:
                connection.unregister(_BATCH)
        return self._split(good, batch, out, ok)

    @staticmethod
    def _split(good: pa.Table, batch: pa.Table, out: pa.Table, ok: pa.ChunkedArray) -> Verdict:
        count = good.num_rows
        index = batch["_i"].to_numpy()
        keep = ok.to_numpy(zero_copy_only=False) & (index < count)
        order = index[keep]  # rows of `good`, in source order
        versions = out["next_version"].filter(pa.array(keep))
        placed = good.take(pa.array(order))
        placed = placed.set_column(
            placed.schema.get_field_index("version"), "version", versions.cast(pa.int64())
        )
        refused_at = ~ok.to_numpy(zero_copy_only=False) & (index < count)
        if not refused_at.any():
            return Verdict(placed, good.slice(0, 0), [], [])
        rows = np.flatnonzero(refused_at)
        refused = good.take(pa.array(index[rows]))
        details = out.take(pa.array(rows)).to_pylist()
        reasons: list[str] = []
        heads: list[int | None] = []
        for row, detail in zip(refused.to_pylist(), details, strict=True):
            reason, conflict = _reason(row, detail)
            reasons.append(reason)
            heads.append(int(str(detail["next_version"])) - 1 if conflict else None)
        return Verdict(placed, refused, reasons, heads)


def _reason(row: dict[str, object], detail: dict[str, object]) -> tuple[str, bool]:
    """Why a row cannot continue its stream, and whether that is a version conflict."""
    stream = row["aggregate_id"]
    problem = detail["problem"]
    following = detail["broken_at"] if problem == "broken" else detail["first_bad"]
    if problem in (None, "broken") or row["source_position"] != following:
        return (
            f"stream {stream!r} was broken at source position {following}, which is refused; "
            "its later events cannot continue it without a gap",
            False,
        )
    if problem == "type":
        return (
            f"field 'aggregate_type' is {row['aggregate_type']!r}, but stream {stream!r} is of "
            f"aggregate_type {detail['kind']!r}; a stream keeps one aggregate_type",
            False,
        )
    expected = detail["next_version"]
    if problem == "duplicate":
        return (
            f"field 'version' is {row['version']}, which stream {stream!r} already has (a "
            f"duplicate); its next version is {expected}",
            True,
        )
    return (
        f"field 'version' is {row['version']}, but stream {stream!r} continues at version "
        f"{expected} (a gap)",
        True,
    )
