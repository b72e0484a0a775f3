"""Stream continuity during an import: which rows continue their stream, and which cannot.

An import places its rows against the stream heads the store had when it began plus what the
import itself has placed so far. The heads of the streams an import has touched are kept in
sorted runs keyed by a 64-bit hash of the aggregate_id (:mod:`._runs`, 32 bytes a stream, spilled
to a folder of the store past a few megabytes), so a batch needs no scan of the files the import
has staged and no Python loop over its rows; the store is asked only for the heads of streams the
import meets for the first time.

A row breaks its stream when its version leaves a gap, repeats a version the stream has (a
duplicate (aggregate_id, version)), or its aggregate_type differs from the stream's. Once a row of
a stream is refused (by this check or by the field checks), the stream's later rows cannot
continue it without a gap, so they are refused too, with a reason that points at the first.

Two streams whose ids share a 64-bit hash (odds near 10^-7 among a million streams) would share a
head; with versions in the source that shows as a refused row, never as a silent merge.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.query import Session
from esworkbench.sources._runs import Places, SortedRuns

__all__ = ["Continuity", "Verdict"]

_BATCH: Final = "_esw_import_batch"
# The rows by stream, then by place in the source: DuckDB sorts in C++, on both cores.
_HASHES: Final = f"""
SELECT _i, hash(aggregate_id) AS k, hash(aggregate_type) AS t FROM {_BATCH}
ORDER BY k, source_position
"""
_STORED: Final = f"""
SELECT hash(aggregate_id) AS k, max(version) AS head,
       hash(arg_max(aggregate_type, version)) AS t, arg_max(aggregate_type, version) AS kind
FROM events WHERE aggregate_id IN (SELECT aggregate_id FROM {_BATCH})
GROUP BY aggregate_id
"""
# Problems of a row, in the order they are looked for.
_REFUSED, _BROKEN, _TYPE, _DUPLICATE, _GAP = 1, 2, 3, 4, 5
_NONE: Final = np.iinfo(np.int64).max


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

    def __init__(
        self, session: Session, *, stored: bool, spill: str | os.PathLike[str] | None = None
    ) -> None:
        self._session = session
        self._stored = stored  # whether the store held events when the import began
        # Per stream: head, hash of its aggregate_type, first refused source position (or _NONE).
        self._streams = SortedRuns(width=3, folder=spill)
        self._names: dict[int, str] = {}  # aggregate_type hash -> name, for messages

    def _query(self, query: str, table: pa.Table) -> pa.Table:
        with self._session._lock:
            connection = self._session.connection
            connection.register(_BATCH, table)
            try:
                return connection.sql(query).to_arrow_table()
            finally:
                connection.unregister(_BATCH)

    def judge(self, good: pa.Table, bad: pa.Table) -> Verdict:
        """Splits ``good`` (rows that passed the field checks, in source order) into rows that
        continue their streams and rows that cannot; ``bad`` (rows the field checks refused)
        break their streams from their source position on."""
        streamed = bad.filter(pc.is_valid(bad["aggregate_id"]))
        count = good.num_rows
        if count + streamed.num_rows == 0:
            return Verdict(good, good.slice(0, 0), [], [])
        names = ["source_position", "aggregate_id", "aggregate_type", "version"]
        rows = good.select(names)
        if streamed.num_rows:
            rows = pa.concat_tables([rows, streamed.select(names)])
        s = self._sorted(rows)
        head, kind, broken, places, known = self._look_up(
            s.streams, rows, s.order[s.first], s.kind[s.first]
        )
        expected = head[s.group] + s.rank
        problem = _problems(s, expected, kind, broken, refused=s.order >= count)
        at = np.where(problem > 0, s.position, _NONE)
        first_bad = np.minimum.reduceat(at, s.first)
        ok_s = (problem == 0) & (s.position < first_bad[s.group])
        moved = np.stack(
            [
                head + np.add.reduceat(ok_s.astype(np.int64), s.first),
                kind.view(np.int64),
                np.minimum(broken, first_bad),
            ],
            axis=1,
        )
        self._streams.update(places, moved)
        self._streams.add(s.streams[~known], moved[~known])
        # Back from stream order to the batch's order.
        ok = np.empty(len(s.order), dtype=bool)
        ok[s.order] = ok_s
        versions = np.empty(len(s.order), np.int64)
        versions[s.order] = expected
        keep = ok[:count]
        if keep.all():  # the usual case: no copy of the batch
            return Verdict(_with_versions(good, versions[:count]), good.slice(0, 0), [], [])
        placed = _with_versions(good.filter(pa.array(keep)), versions[:count][keep])
        back = np.empty(len(s.order), np.int64)
        back[s.order] = np.arange(len(s.order))  # row -> its place in stream order
        out = np.flatnonzero(~keep)
        refused = good.take(pa.array(out))
        reasons: list[str] = []
        heads: list[int | None] = []
        for row, i in zip(refused.to_pylist(), back[out], strict=True):
            stream = s.group[i]
            reason, conflict = _reason(
                row,
                problem=int(problem[i]),
                expected=int(expected[i]),
                broken_at=int(broken[stream]),
                first_bad=int(first_bad[stream]),
                kind=self._names.get(int(kind[stream])),
            )
            reasons.append(reason)
            heads.append(int(expected[i]) - 1 if conflict else None)
        return Verdict(placed, refused, reasons, heads)

    def _sorted(self, rows: pa.Table) -> _Sorted:
        """The batch's rows in stream order, each stream's rows by place in the source."""
        total = rows.num_rows
        hashes = self._query(
            _HASHES,
            rows.select(["source_position", "aggregate_id", "aggregate_type"]).append_column(
                "_i", pa.array(np.arange(total))
            ),
        )
        order = hashes["_i"].to_numpy()
        key = hashes["k"].to_numpy()
        kind = hashes["t"].to_numpy()
        kinds, where = np.unique(kind, return_index=True)  # a few aggregate_types: for messages
        names = rows["aggregate_type"].take(pa.array(order[where])).to_pylist()
        self._names.update(zip(kinds.tolist(), names, strict=True))
        starts = np.ones(total, dtype=bool)
        starts[1:] = key[1:] != key[:-1]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        version = pc.fill_null(rows["version"], 0).to_numpy()  # 0: none given (versions >= 1)
        return _Sorted(
            order=order,
            streams=key[first],
            kind=kind,
            position=rows["source_position"].to_numpy()[order],
            version=version[order],
            group=group,
            first=first,
            rank=np.arange(total) - first[group] + 1,
        )

    def _look_up(
        self, streams: np.ndarray, rows: pa.Table, firsts: np.ndarray, first_kinds: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Places, np.ndarray]:
        """Head, aggregate_type hash and broken position of each stream (sorted keys), where
        the known ones live, and which are known."""
        values, known, places = self._streams.find(streams)
        head = values[:, 0]
        kinds = np.where(known, values[:, 1].view(np.uint64), first_kinds)
        broken = np.where(known, values[:, 2], _NONE)
        if self._stored and not known.all():
            new = rows["aggregate_id"].take(pa.array(firsts[~known]))
            stored = self._query(_STORED, pa.table({"aggregate_id": new}))
            if stored.num_rows:
                found = np.searchsorted(streams, stored["k"].to_numpy())
                head[found] = stored["head"].to_numpy()
                kinds[found] = stored["t"].to_numpy()
                for t, name in zip(
                    stored["t"].to_pylist(), stored["kind"].to_pylist(), strict=True
                ):
                    self._names.setdefault(int(t), str(name))
        return head, kinds, broken, places, known


@dataclass(frozen=True, slots=True)
class _Sorted:
    """A batch in stream order: ``order`` maps each place to the row of the batch."""

    order: np.ndarray
    streams: np.ndarray  # the hash of each stream, ascending
    kind: np.ndarray  # the hash of each row's aggregate_type
    position: np.ndarray
    version: np.ndarray  # 0 where none is given
    group: np.ndarray  # each row's stream, as an index into streams
    first: np.ndarray  # each stream's first place
    rank: np.ndarray  # 1 for a stream's first row in the batch, 2 for the next ...


def _problems(
    s: _Sorted, expected: np.ndarray, kind: np.ndarray, broken: np.ndarray, refused: np.ndarray
) -> np.ndarray:
    """Each row's problem (0 for none); where several apply, the last listed wins."""
    problem = np.zeros(len(s.order), np.int8)
    given = s.version > 0
    for code, where in (
        (_GAP, given & (s.version > expected)),
        (_DUPLICATE, given & (s.version < expected)),
        (_TYPE, s.kind != kind[s.group]),
        (_BROKEN, broken[s.group] != _NONE),
        (_REFUSED, refused),
    ):
        problem[where] = code
    return problem


def _with_versions(table: pa.Table, versions: np.ndarray) -> pa.Table:
    at = table.schema.get_field_index("version")
    return table.set_column(at, "version", pa.array(versions, pa.int64()))


def _reason(
    row: Mapping[str, object],
    *,
    problem: int,
    expected: int,
    broken_at: int,
    first_bad: int,
    kind: str | None,
) -> tuple[str, bool]:
    """Why a row cannot continue its stream, and whether that is a version conflict."""
    stream = row["aggregate_id"]
    following = broken_at if problem == _BROKEN else first_bad
    if problem in (0, _BROKEN) or row["source_position"] != following:
        return (
            f"stream {stream!r} was broken at source position {following}, which is refused; "
            "its later events cannot continue it without a gap",
            False,
        )
    if problem == _TYPE:
        return (
            f"field 'aggregate_type' is {row['aggregate_type']!r}, but stream {stream!r} is of "
            f"aggregate_type {kind!r}; a stream keeps one aggregate_type",
            False,
        )
    if problem == _DUPLICATE:
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
