"""The snapshot advisor: per aggregate type, stream lengths, replay cost and an interval."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import numpy as np

from esworkbench.aggregates import Aggregate
from esworkbench.engine import SELECT_COLUMNS, Folder, Source
from esworkbench.errors import EsWorkbenchError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["snapshot_advice"]


def snapshot_advice(
    store: Source,
    aggregate_type: str | None = None,
    *,
    aggregate: Aggregate | None = None,
    target_ms: float = 10.0,
    sample_events: int = 50_000,
) -> pd.DataFrame:
    """Per aggregate type: how long streams are, what a replay costs, and a snapshot interval.

    Stream lengths come from one SQL query. The replay rate is measured by folding a sample
    of the longest streams (up to ``sample_events`` events per type) with ``aggregate`` (by
    default the generic fold), and a stream read is timed on the longest stream. The estimated
    cost of a replay is read time + events / rate. A snapshot saves folding, not reading: the
    suggested interval keeps the fold of the tail after the nearest snapshot within
    ``target_ms``, and is empty (None) when the longest stream folds within ``target_ms``
    without snapshots (a snapshot lookup costs a few milliseconds of its own).

    Columns: aggregate_type, streams, events, mean_events, p99_events, max_events,
    events_per_second, read_ms, p99_replay_ms, max_replay_ms, suggested_interval.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5})] * 3,
        ...                  aggregate_type="Account")
        >>> advice = esw.snapshot_advice(store)
        >>> advice[["aggregate_type", "streams", "max_events", "suggested_interval"]].values
        array([['Account', 1, 3, None]], dtype=object)
    """
    import pandas as pd

    from esworkbench.aggregates import generic

    if target_ms <= 0:
        raise EsWorkbenchError(f"target_ms={target_ms!r} must be positive. Hint: target_ms=10")
    sizes = store.sql(
        "SELECT aggregate_type, count(*) AS streams, sum(n) AS events, avg(n) AS mean, "
        "quantile_disc(n, 0.99) AS p99, max(n) AS longest FROM (SELECT aggregate_type, "
        "aggregate_id, count(*) AS n FROM events WHERE (? IS NULL OR aggregate_type = ?) "
        "GROUP BY ALL) GROUP BY aggregate_type ORDER BY aggregate_type",
        [aggregate_type, aggregate_type],
    ).fetchall()
    rows = []
    for kind, streams, events, mean, p99, longest in sizes:
        fold = aggregate if aggregate is not None and aggregate.name == kind else generic(kind)
        rate, read_ms = _measure(store, fold, sample_events)
        p99_ms = read_ms + 1000 * p99 / rate
        max_ms = read_ms + 1000 * longest / rate
        interval = None
        if 1000 * longest / rate > target_ms:  # snapshots save folding, not reading
            interval = _round_interval(max(1.0, rate * target_ms / 1000))
        rows.append(
            {
                "aggregate_type": kind,
                "streams": int(streams),
                "events": int(events),
                "mean_events": float(mean),
                "p99_events": int(p99),
                "max_events": int(longest),
                "events_per_second": rate,
                "read_ms": read_ms,
                "p99_replay_ms": p99_ms,
                "max_replay_ms": max_ms,
                "suggested_interval": interval,
            }
        )
    frame = pd.DataFrame(rows, columns=_ADVICE_COLUMNS)
    intervals = [row["suggested_interval"] for row in rows]
    frame["suggested_interval"] = pd.Series(intervals, index=frame.index, dtype=object)
    return frame


_ADVICE_COLUMNS: Final = [
    "aggregate_type",
    "streams",
    "events",
    "mean_events",
    "p99_events",
    "max_events",
    "events_per_second",
    "read_ms",
    "p99_replay_ms",
    "max_replay_ms",
    "suggested_interval",
]


def _measure(store: Source, aggregate: Aggregate, budget: int) -> tuple[float, float]:
    """(events folded per second, ms to read the longest stream) for one aggregate type."""
    from esworkbench.engine import fold_chunk

    chosen = store.sql(
        "SELECT aggregate_id, n FROM (SELECT aggregate_id, count(*) AS n FROM events "
        "WHERE aggregate_type = ? GROUP BY ALL) "
        "QUALIFY sum(n) OVER (ORDER BY n DESC, aggregate_id ROWS UNBOUNDED PRECEDING) - n < ? "
        "ORDER BY n DESC, aggregate_id",
        [aggregate.name, budget],
    ).fetchall()
    ids = [row[0] for row in chosen]
    batch = store.sql(
        f"SELECT {SELECT_COLUMNS} FROM events WHERE aggregate_type = ? AND aggregate_id IN "
        "(SELECT unnest(CAST(? AS VARCHAR[]))) ORDER BY aggregate_id, version",
        [aggregate.name, ids],
    ).to_arrow_table()
    # Folded again until 20 ms have passed, so that a small sample measures the fold rather
    # than the fixed cost of one call; the best of the rounds (the least disturbed) counts.
    folder, best, spent = Folder(aggregate), float("inf"), 0.0
    while spent < 0.02:
        started = time.perf_counter()
        fold_chunk(folder, batch)
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    rate = max(batch.num_rows, 1) / max(best, 1e-7)
    reads = []
    for _ in range(3):
        started = time.perf_counter()
        store.read_stream(ids[0])
        reads.append(time.perf_counter() - started)
    return rate, 1000 * sorted(reads)[1]


def _round_interval(value: float) -> int:
    """A round number at or below ``value``: 1, 2, 5, 10, 20, 50, 100, ..."""
    magnitude = 10 ** int(np.floor(np.log10(value)))
    for step in (5, 2, 1):
        if step * magnitude <= value:
            return int(step * magnitude)
    return int(magnitude)
