"""Benchmarks of the esworkbench store against PostgreSQL, measured in the same run.

For each size in ``--events`` the same generated events (``esworkbench.demo.generate``) are

1. staged once to Parquet (and to CSV for PostgreSQL), so no timing includes generation;
2. ingested: ``store.append_batch`` per staged batch into a fresh store, then ``store.compact()``;
   the batches come memory-mapped from an Arrow IPC copy of the staged events (``--ingest-from
   arrow``, the store's own cost) or decoded from the staged Parquet one batch ahead
   (``--ingest-from parquet``, where decoding shares the two cores);
   PostgreSQL: ``COPY ... FROM STDIN`` into a fresh ``bench_events`` table in the seed schema;
3. read one stream at a time (the same seeded sample of streams on both), before and after
   compaction: p50 and p99;
4. scanned in full: ``count(*), sum(length(data))``, median of three;
5. appended to one event at a time with the exact expected version (PostgreSQL: a transaction
   that locks the stream's head row, checks it and inserts, committed with synchronous_commit on).

On the smallest size the layout is then compared: ingest, compact, stream reads and full scan
for each ``--row-group-sizes`` value (the store's ``settings.row_group_size``).

Where the time of an append goes is measured by wrapping the store's steps with timers (the
wrappers only add a clock read around each call) and, once, by cProfile.

Run ``python benchmarks/bench_store.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import random
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

import esworkbench as esw
from esworkbench.demo import generate

HERE = Path(__file__).resolve().parent
PG_COLUMNS = (
    "event_id, event_type, aggregate_id, aggregate_type, version, data, metadata, timestamp"
)
PG_SCHEMA = """
DROP TABLE IF EXISTS bench_events;
CREATE TABLE bench_events (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    event_type text NOT NULL,
    aggregate_id text NOT NULL,
    aggregate_type text NOT NULL,
    version int NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb,
    timestamp timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aggregate_id, version)
);
"""
PG_READ = "SELECT * FROM bench_events WHERE aggregate_id = %s ORDER BY version"
PG_HEAD = (
    "SELECT version, aggregate_type FROM bench_events WHERE aggregate_id = %s "
    "ORDER BY version DESC LIMIT 1 FOR UPDATE"
)
PG_INSERT = (
    "INSERT INTO bench_events (event_id, event_type, aggregate_id, aggregate_type, version, "
    "data, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
SCAN_ESW = "select count(*), sum(length(data)) from events"
SCAN_PG = "select count(*), sum(length(data::text)) from bench_events"


# -- small helpers ---------------------------------------------------------------------------


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default does."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Load:
    """Measures how busy the machine was with other processes while a phase ran.

    Others' load = (machine busy CPU - this process's CPU) / wall time, in cores. PostgreSQL's
    own backends count as others during the PostgreSQL phases.
    """

    phases: ClassVar[dict[str, float]] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Load:
        self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.start[0]
        busy = _busy_seconds() - self.start[1]
        own = _own_seconds() - self.start[2]
        Load.phases[self.name] = max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Waits (up to max_wait seconds) until other processes use less than ``threshold`` cores
    over 10 s; returns the load last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        with Load("_probe"):
            time.sleep(10)
        seen = Load.phases.pop("_probe")
        if seen < threshold or time.monotonic() >= deadline:
            if seen >= threshold:
                log(f"machine still busy ({seen:.2f} cores used by others); going on")
            return seen
        log(f"waiting for a quiet machine: others use {seen:.2f} cores")


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Timers:
    """Wall time spent in named steps of the store, by wrapping them (only for attribution)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()
        self._undo.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: {"s": self.seconds[k], "calls": self.calls[k]} for k in self.seconds}


@contextlib.contextmanager
def store_timers() -> Iterator[Timers]:
    """Times the steps of append/append_batch: what the store does, attributed by phase."""
    import importlib

    timers = Timers()
    for module_name, attribute, label in STEPS:
        owner: Any = importlib.import_module(module_name)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        if hasattr(owner, name):
            timers.wrap(owner, name, label)
    try:
        yield timers
    finally:
        timers.undo()


# The steps of a write, in the order they run, by (module, attribute path, label); indented
# labels are parts of the step above. Steps the store does not have (it is being refactored) are
# skipped; threads make "summed" steps add up to more than the wall time.
STEPS: list[tuple[str, str, str]] = [
    ("esworkbench._checks", "canonical_batch", "check + canonicalise the batch"),
    ("esworkbench._checks", "_valid_json", "  of which JSON validity (a thread of its own)"),
    ("esworkbench._checks", "_promoted", "  of which ids promoted from metadata"),
    ("esworkbench._checks", "_refuse_repeats", "  of which repeated-id check"),
    ("esworkbench.store", "Store._bind", "rebind SQL views to the new file list"),
    ("esworkbench._keys", "KeyIndex._wait", "wait for the key index to take in the last commit"),
    ("esworkbench._writes", "find_stored", "find_stored: event_id keys against the key index"),
    ("esworkbench._writes", "place", "place: sort, stream heads, versions, positions, gather"),
    ("esworkbench._writes", "_heads", "  of which stream heads from the key index"),
    ("esworkbench._layout", "gather", "  of which gathering rows in sorted order (2 threads)"),
    ("esworkbench.store", "Store._head", "stream head lookup (_head)"),
    ("esworkbench._layout", "partitions", "split by partition (rows come sorted)"),
    ("esworkbench._layout", "write_file", "write Parquet file(s) incl. fsyncs (summed)"),
    ("esworkbench._layout", "fsync", "  of which fsync of file + partition dir (summed)"),
    ("esworkbench._keys", "FileKeys.of", "  of which key-index notes of each file (summed)"),
    ("deltalake", "DeltaTable.create_write_transaction", "Delta commit (create_write_transaction)"),
    ("esworkbench.store", "_fsync_commit", "fsync commit JSON + _delta_log dir"),
    ("esworkbench.store", "Store.refresh", "refresh (log check, reload snapshot)"),
    ("deltalake", "DeltaTable.update_incremental", "  of which DeltaTable.update_incremental"),
    ("deltalake", "DeltaTable.get_add_actions", "  of which DeltaTable.get_add_actions"),
    (
        "esworkbench._keys",
        "KeyIndex._sync",
        "key index takes in new files (in a thread after each commit; summed, overlaps)",
    ),
]


# -- staging ---------------------------------------------------------------------------------


def stage(events: int, seed: int, batch_size: int, directory: Path) -> tuple[Path, Path, float]:
    """Writes the generated events once to Parquet and to CSV (for COPY); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    import hashlib
    import inspect

    import esworkbench.demo

    # The generator is still changing: a staged copy is only reused for the same generator code.
    code = hashlib.sha256(inspect.getsource(esworkbench.demo).encode()).hexdigest()[:8]
    parquet = directory / f"staged-{events}-seed{seed}-{code}.parquet"
    csv = directory / f"staged-{events}-seed{seed}-{code}.csv"
    if parquet.exists() and csv.exists() and pq.ParquetFile(parquet).metadata.num_rows == events:
        log(f"staged files for {events:,} events exist, reusing {parquet.name}")
        return parquet, csv, float("nan")
    start = time.perf_counter()
    pg_columns = [
        "event_id", "event_type", "aggregate_id", "aggregate_type", "version", "data",
        "metadata", "recorded_at",
    ]  # fmt: skip
    with (
        pq.ParquetWriter(parquet, esw.EVENT_SCHEMA, compression="zstd") as writer,
        pacsv.CSVWriter(
            csv,
            pa.schema([esw.EVENT_SCHEMA.field(c) for c in pg_columns]),
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="needed"),
        ) as csv_writer,
    ):
        for table in generate(events, seed=seed, batch_size=batch_size):
            writer.write_table(table, row_group_size=batch_size)
            csv_writer.write_table(table.select(pg_columns))
    took = time.perf_counter() - start
    log(f"staged {events:,} events in {took:.1f}s")
    return parquet, csv, took


INGEST_FROM = {
    "arrow": "batches memory-mapped from staged Arrow IPC",
    "parquet": "incl. decoding staged zstd Parquet one batch ahead",
}


def staged_batches(parquet: Path, batch_size: int) -> Iterator[pa.Table]:
    source = pq.ParquetFile(parquet)
    for batch in source.iter_batches(batch_size=batch_size):
        yield pa.Table.from_batches([batch])


def staged_arrow(parquet: Path, batch_size: int) -> Path:
    """The staged events also as an uncompressed Arrow IPC file of ``batch_size``-row batches
    (written once from the staged Parquet), which ingest reads memory-mapped: batches arrive as
    an importer or an application hands them over, and the figure is the store's own cost."""
    arrow = parquet.with_name(f"{parquet.stem}-{batch_size}.arrow")
    if not arrow.exists():
        partial = arrow.with_suffix(".partial")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, esw.EVENT_SCHEMA) as out:
            for table in staged_batches(parquet, batch_size):
                out.write_table(table, max_chunksize=batch_size)
        partial.rename(arrow)
    return arrow


def arrow_batches(arrow: Path) -> Iterator[pa.Table]:
    """The batches of a staged Arrow IPC file, memory-mapped (no copy, no decoding)."""
    with pa.memory_map(str(arrow)) as source:
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(index)])


def ingest_batches(parquet: Path, batch_size: int, source: str) -> Iterator[pa.Table]:
    """The staged batches as ``--ingest-from`` says: memory-mapped Arrow, or zstd Parquet
    decoded one batch ahead in a thread."""
    if source == "arrow":
        return arrow_batches(staged_arrow(parquet, batch_size))
    return read_ahead(staged_batches(parquet, batch_size))


def read_ahead(batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Reads the next batch in a thread while the caller appends this one, as an importer's
    pipelined reader does (Parquet decoding runs outside the GIL, on the core the store's
    single-threaded steps leave idle)."""
    import queue
    import threading

    ready: queue.Queue[pa.Table | BaseException | None] = queue.Queue(maxsize=1)

    def produce() -> None:
        try:
            for table in batches:
                ready.put(table)
        except BaseException as exc:  # handed to the consumer
            ready.put(exc)
        else:
            ready.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ready.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def pick_streams(parquet: Path, count: int, seed: int, hot_share: float) -> dict[str, Any]:
    """A seeded sample of stream ids: mostly uniform over streams, plus the hottest streams."""
    con = duckdb.connect()
    rows = con.execute(
        "select aggregate_id, aggregate_type, count(*) n, max(version) v "
        "from read_parquet(?) group by all order by aggregate_id",
        [str(parquet)],
    ).fetchall()
    con.close()
    rng = random.Random(seed)
    by_count = sorted(rows, key=lambda r: -r[2])
    hot_n = max(1, round(count * hot_share))
    hot = [r[0] for r in by_count[:hot_n]]
    hot_set = set(hot)
    pool = [r[0] for r in rows if r[0] not in hot_set]
    uniform = rng.sample(pool, count - hot_n)
    reads = hot + uniform
    rng.shuffle(reads)
    sizes = {r[0]: r[2] for r in rows}
    versions = {r[0]: r[3] for r in rows}
    warmup = rng.sample(pool, 20)
    append_to = rng.sample(pool, min(len(pool), count * 4))
    return {
        "reads": reads,
        "hot": hot,
        "warmup": warmup,
        "append_pool": append_to,
        "sizes": sizes,
        "versions": versions,
        "streams": len(rows),
        "max_stream": by_count[0][2],
        "hot_sizes": [r[2] for r in by_count[:hot_n]],
    }


# -- esworkbench -----------------------------------------------------------------------------


def make_store(path: Path, row_group_size: int | None) -> esw.Store:
    rmtree(path)
    store = esw.open_store(path)
    if row_group_size is not None and store.settings["row_group_size"] != row_group_size:
        marker = path / "store.json"
        body = json.loads(marker.read_text())
        body["settings"]["row_group_size"] = row_group_size
        marker.write_text(json.dumps(body, indent=2) + "\n")
        store.close()
        store = esw.open_store(path)
    return store


def esw_ingest(
    store: esw.Store, parquet: Path, batch_size: int, source: str = "arrow"
) -> dict[str, Any]:
    total = 0
    in_append = 0.0
    per_batch: list[float] = []
    with store_timers() as timers:
        start = time.perf_counter()
        cpu_start = _own_seconds()
        for table in ingest_batches(parquet, batch_size, source):
            t0 = time.perf_counter()
            result = store.append_batch(table)
            took = time.perf_counter() - t0
            in_append += took
            per_batch.append(took)
            total += result.events
        wall = time.perf_counter() - start
        cpu = _own_seconds() - cpu_start
        steps = timers.snapshot()
    return {
        "events": total,
        "wall_s": wall,
        "cpu_s": cpu,
        "append_s": in_append,
        "eps_wall": total / wall,
        "eps_append": total / in_append,
        "batches": len(per_batch),
        "batch_s": per_batch,
        "steps": steps,
        "files": store._files.num_rows,
    }


def esw_compact(store: esw.Store) -> dict[str, Any]:
    before = store._files.num_rows
    start = time.perf_counter()
    merged = store.compact()
    took = time.perf_counter() - start
    return {
        "s": took,
        "merged": merged,
        "files_before": before,
        "files_after": store._files.num_rows,
    }


def timed_reads(read: Callable[[str], int], ids: list[str], warmup: list[str]) -> dict[str, Any]:
    for stream in warmup:
        read(stream)
    times: list[float] = []
    rows = 0
    for stream in ids:
        start = time.perf_counter()
        rows += read(stream)
        times.append(time.perf_counter() - start)
    ms = [t * 1000 for t in times]
    return {
        "n": len(ms),
        "rows": rows,
        "p50_ms": pct(ms, 0.5),
        "p90_ms": pct(ms, 0.9),
        "p99_ms": pct(ms, 0.99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "ms": ms,
    }


def esw_reads(store: esw.Store, picks: dict[str, Any]) -> dict[str, Any]:
    out = timed_reads(lambda s: store.read_stream(s).num_rows, picks["reads"], picks["warmup"])
    out.update(split_hot(out["ms"], picks))
    return out


def split_hot(ms: list[float], picks: dict[str, Any]) -> dict[str, Any]:
    hot = set(picks["hot"])
    hot_ms = [t for s, t in zip(picks["reads"], ms, strict=True) if s in hot]
    cold_ms = [t for s, t in zip(picks["reads"], ms, strict=True) if s not in hot]
    return {
        "hot_p50_ms": pct(hot_ms, 0.5),
        "hot_max_ms": max(hot_ms) if hot_ms else float("nan"),
        "other_p50_ms": pct(cold_ms, 0.5),
        "other_p99_ms": pct(cold_ms, 0.99),
    }


def esw_scan(store: esw.Store) -> dict[str, Any]:
    times = []
    result = None
    for _ in range(3):
        start = time.perf_counter()
        result = store.sql(SCAN_ESW).fetchall()
        times.append(time.perf_counter() - start)
    assert result is not None
    return {"median_s": statistics.median(times), "runs_s": times, "result": list(result[0])}


def esw_appends(store: esw.Store, streams: list[str]) -> dict[str, Any]:
    """One event per append with the exact expected version; the version is tracked in memory
    after one stream_version() per stream (timed separately), as an application would do."""
    read_times: list[float] = []
    versions: dict[str, int] = {}
    for stream in streams:
        start = time.perf_counter()
        versions[stream] = store.stream_version(stream)
        read_times.append(time.perf_counter() - start)
    latencies: list[float] = []
    with store_timers() as timers:
        start_all = time.perf_counter()
        for i, stream in enumerate(streams):
            event = esw.NewEvent("BenchmarkNoted", {"n": i, "note": "single append"})
            start = time.perf_counter()
            new = store.append(stream, [event], expected_version=versions[stream])
            latencies.append(time.perf_counter() - start)
            versions[stream] = new
        wall = time.perf_counter() - start_all
        steps = timers.snapshot()
    ms = [t * 1000 for t in latencies]
    return {
        "n": len(streams),
        "wall_s": wall,
        "per_s": len(streams) / wall,
        "p50_ms": pct(ms, 0.5),
        "p99_ms": pct(ms, 0.99),
        "first10_ms": statistics.fmean(ms[:10]),
        "last10_ms": statistics.fmean(ms[-10:]),
        "stream_version_p50_ms": pct([t * 1000 for t in read_times], 0.5),
        "files_after": store._files.num_rows,
        "steps": steps,
    }


def profile_appends(store: esw.Store, streams: list[str], path: Path) -> str:
    """cProfile of single appends; writes the full listing to ``path``, returns the top lines."""
    versions = {s: store.stream_version(s) for s in streams}
    profiler = cProfile.Profile()
    profiler.enable()
    for i, stream in enumerate(streams):
        event = esw.NewEvent("BenchmarkNoted", {"n": i, "note": "profiled append"})
        store.append(stream, [event], expected_version=versions[stream])
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    path.write_text(text.getvalue())
    short = io.StringIO()
    pstats.Stats(profiler, stream=short).sort_stats("tottime").print_stats(15)
    return short.getvalue()


def profile_ingest(store: esw.Store, parquet: Path, batch_size: int, path: Path) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for table in staged_batches(parquet, batch_size):
        store.append_batch(table)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    path.write_text(text.getvalue())
    short = io.StringIO()
    pstats.Stats(profiler, stream=short).sort_stats("tottime").print_stats(12)
    return short.getvalue()


# -- PostgreSQL ------------------------------------------------------------------------------


def pg_connect(dsn: str) -> Any:
    import psycopg
    from psycopg.types.string import TextLoader

    conn = psycopg.connect(dsn, autocommit=False)
    # Both sides hand back JSON as text: the store returns it as strings in Arrow.
    conn.adapters.register_loader("jsonb", TextLoader)
    return conn


def pg_facts(dsn: str) -> dict[str, str]:
    with pg_connect(dsn) as conn:
        names = (
            "server_version", "fsync", "synchronous_commit", "wal_sync_method",
            "shared_buffers", "max_wal_size", "full_page_writes",
        )  # fmt: skip
        return {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}


def pg_ingest(dsn: str, csv: Path) -> dict[str, Any]:
    with pg_connect(dsn) as conn:
        conn.execute(PG_SCHEMA)
        conn.commit()
        start = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY bench_events ({PG_COLUMNS}) FROM STDIN (FORMAT csv)") as copy,
            csv.open("rb") as source,
        ):
            while chunk := source.read(1 << 20):
                copy.write(chunk)
        conn.commit()
        took = time.perf_counter() - start
        count = conn.execute("SELECT count(*) FROM bench_events").fetchone()[0]
        conn.commit()
        start = time.perf_counter()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE bench_events")
        analyze = time.perf_counter() - start
        size = conn.execute("SELECT pg_total_relation_size('bench_events')").fetchone()[0]
    return {
        "events": count,
        "s": took,
        "eps": count / took,
        "vacuum_analyze_s": analyze,
        "bytes": size,
    }


def pg_reads(dsn: str, picks: dict[str, Any]) -> dict[str, Any]:
    with pg_connect(dsn) as conn:
        conn.autocommit = True
        cur = conn.cursor()

        def read(stream: str) -> int:
            cur.execute(PG_READ, (stream,), prepare=True)
            return len(cur.fetchall())

        out = timed_reads(read, picks["reads"], picks["warmup"])
    out.update(split_hot(out["ms"], picks))
    return out


def pg_scan(dsn: str) -> dict[str, Any]:
    with pg_connect(dsn) as conn:
        conn.autocommit = True
        times = []
        result = None
        for _ in range(3):
            start = time.perf_counter()
            result = conn.execute(SCAN_PG).fetchone()
            times.append(time.perf_counter() - start)
    assert result is not None
    return {"median_s": statistics.median(times), "runs_s": times, "result": list(result)}


def pg_appends(dsn: str, streams: list[str], versions: dict[str, int]) -> dict[str, Any]:
    """Per append one transaction: lock the stream's head row, check the expected version,
    insert, commit (synchronous_commit on, so the commit waits for the WAL flush)."""
    import uuid

    expected = {s: versions[s] for s in streams}
    with pg_connect(dsn) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.commit()
        latencies: list[float] = []
        start_all = time.perf_counter()
        for i, stream in enumerate(streams):
            start = time.perf_counter()
            with conn.transaction():
                row = conn.execute(PG_HEAD, (stream,), prepare=True).fetchone()
                head, kind = row if row else (0, None)
                if head != expected[stream]:
                    raise RuntimeError(f"{stream} is at {head}, expected {expected[stream]}")
                conn.execute(
                    PG_INSERT,
                    (
                        uuid.uuid4(), "BenchmarkNoted", stream, kind, head + 1,
                        json.dumps({"n": i, "note": "single append"}), None,
                    ),
                    prepare=True,
                )  # fmt: skip
            expected[stream] = head + 1
            latencies.append(time.perf_counter() - start)
        wall = time.perf_counter() - start_all
    ms = [t * 1000 for t in latencies]
    return {
        "n": len(streams),
        "wall_s": wall,
        "per_s": len(streams) / wall,
        "p50_ms": pct(ms, 0.5),
        "p99_ms": pct(ms, 0.99),
    }


# -- the run ---------------------------------------------------------------------------------


def run_size(events: int, args: argparse.Namespace, stores: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"events": events}
    parquet, csv, stage_s = stage(events, args.seed, args.batch_size, stores)
    result["stage_s"] = stage_s
    picks = pick_streams(parquet, args.reads, args.seed, args.hot_share)
    result["streams"] = picks["streams"]
    result["max_stream"] = picks["max_stream"]
    result["hot_sizes"] = picks["hot_sizes"]
    result["read_rows_mean"] = statistics.fmean(picks["sizes"][s] for s in picks["reads"])
    path = stores / f"store-{events}"
    if args.wait_quiet:
        result["quiet_probe_cores"] = wait_quiet(args.wait_quiet)

    # Ingest into a fresh store --ingest-runs times; the median run is reported, the others'
    # rates beside it. Every run writes the same events, so the last run's store goes on.
    runs = []
    for run in range(args.ingest_runs):
        store = make_store(path, None)
        log(f"[{events:,}] esworkbench ingest, run {run + 1} of {args.ingest_runs}")
        with Load(f"{events}:esw ingest run {run + 1}"):
            runs.append(esw_ingest(store, parquet, args.batch_size, args.ingest_from))
        log(f"  {runs[-1]['eps_wall']:,.0f} events/s")
        if run + 1 < args.ingest_runs:
            store.close()
    median = sorted(runs, key=lambda r: r["eps_wall"])[len(runs) // 2]
    result["esw_ingest"] = median
    result["esw_ingest_runs"] = [r["eps_wall"] for r in runs]
    result["ingest_from"] = args.ingest_from
    result["row_group_size"] = store.settings["row_group_size"]
    log(f"[{events:,}] esworkbench reads before compact")
    with Load(f"{events}:esw reads before compact"):
        result["esw_reads_before"] = esw_reads(store, picks)
    log(f"[{events:,}] compact")
    with Load(f"{events}:esw compact"):
        result["esw_compact"] = esw_compact(store)
    log(f"  {result['esw_compact']}")
    log(f"[{events:,}] esworkbench reads after compact")
    with Load(f"{events}:esw reads after compact"):
        result["esw_reads_after"] = esw_reads(store, picks)
    log(f"[{events:,}] esworkbench full scan")
    with Load(f"{events}:esw scan"):
        result["esw_scan"] = esw_scan(store)
    result["esw_store_bytes"] = sum(f.stat().st_size for f in path.rglob("*.parquet"))
    log(f"[{events:,}] esworkbench single appends")
    pool = picks["append_pool"]
    with Load(f"{events}:esw appends"):
        result["esw_appends"] = esw_appends(store, pool[: args.appends])
    log(f"  {result['esw_appends']['per_s']:.1f} appends/s")
    if args.profile:
        result["esw_append_profile"] = profile_appends(
            store, pool[args.appends : args.appends + 50], stores / f"profile-append-{events}.txt"
        )
    store.close()
    if args.profile:
        profiled = make_store(stores / f"store-{events}-profiled", None)
        result["esw_ingest_profile"] = profile_ingest(
            profiled, parquet, args.batch_size, stores / f"profile-ingest-{events}.txt"
        )
        profiled.close()
        rmtree(stores / f"store-{events}-profiled")
    result["peak_rss_mb_esw"] = peak_rss_mb()

    if not args.skip_postgres:
        log(f"[{events:,}] PostgreSQL COPY")
        with Load(f"{events}:pg ingest (others include PostgreSQL)"):
            result["pg_ingest"] = pg_ingest(args.dsn, csv)
        log(f"  {result['pg_ingest']['eps']:,.0f} events/s")
        log(f"[{events:,}] PostgreSQL reads, scan, appends")
        with Load(f"{events}:pg reads, scan, appends (others include PostgreSQL)"):
            result["pg_reads"] = pg_reads(args.dsn, picks)
            result["pg_scan"] = pg_scan(args.dsn)
            result["pg_appends"] = pg_appends(args.dsn, pool[: args.appends], picks["versions"])

    if events == min(args.events) and args.row_group_sizes:
        result["layouts"] = []
        for size in args.row_group_sizes:
            log(f"[{events:,}] layout: row_group_size={size}")
            lpath = stores / f"store-{events}-rg{size}"
            lstore = make_store(lpath, size)
            with Load(f"{events}:layout rg={size}"):
                ingest = esw_ingest(lstore, parquet, args.batch_size)
                compact = esw_compact(lstore)
                reads = esw_reads(lstore, picks)
                scan = esw_scan(lstore)
            result["layouts"].append(
                {
                    "row_group_size": size,
                    "ingest_eps": ingest["eps_wall"],
                    "compact_s": compact["s"],
                    "reads": reads,
                    "scan_s": scan["median_s"],
                    "bytes": sum(f.stat().st_size for f in lpath.rglob("*.parquet")),
                }
            )
            lstore.close()
            if not args.keep_stores:
                rmtree(lpath)
    if not args.keep_stores:
        rmtree(path)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _git_head() -> str:
    """The repository's HEAD, with '+dirty' when esworkbench/ has uncommitted changes."""
    import subprocess

    root = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "-uno", "--", "esworkbench"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    import deltalake

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    facts: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "duckdb": duckdb.__version__,
        "deltalake": deltalake.__version__,
        "pyarrow": pa.__version__,
        "esworkbench": esw.__version__,
        "commit": _git_head(),
        "command": "python " + " ".join(sys.argv),
    }
    if not args.skip_postgres:
        import psycopg

        facts["psycopg"] = psycopg.__version__
        facts["postgres"] = pg_facts(args.dsn)
    return facts


# -- report ----------------------------------------------------------------------------------


def ratio(ours: float, anchor: float | None, higher_is_better: bool) -> str:
    """How many times better (>1) or worse (<1) than PostgreSQL, as 'x' text."""
    if anchor is None or anchor != anchor or ours != ours or anchor == 0 or ours == 0:
        return "-"
    value = ours / anchor if higher_is_better else anchor / ours
    return f"{value:.2f}x"


def verdict(value: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return ("met" if ok else "MISSED") + f" ({'>=' if higher_is_better else '<='} {target:g})"


def report(facts: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        f"Run {facts['date']}: `{facts['command']}`",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} RAM, "
        f"Linux {facts['kernel']}, Python {facts['python']}; duckdb {facts['duckdb']}, "
        f"deltalake {facts['deltalake']}, pyarrow {facts['pyarrow']}, "
        f"esworkbench {facts['esworkbench']} at {facts.get('commit', '?')}"
        + (
            f"; PostgreSQL {facts['postgres']['server_version']} (fsync "
            f"{facts['postgres']['fsync']}, synchronous_commit "
            f"{facts['postgres']['synchronous_commit']}, wal_sync_method "
            f"{facts['postgres']['wal_sync_method']}, shared_buffers "
            f"{facts['postgres']['shared_buffers']}), psycopg {facts['psycopg']}"
            if "postgres" in facts
            else ""
        ),
        "",
        "Ratio: how many times better esworkbench is than PostgreSQL in the same run "
        "(< 1 means slower).",
        "",
    ]
    for r in results:
        n = r["events"]
        pg = "pg_ingest" in r
        ing, rb, ra = r["esw_ingest"], r["esw_reads_before"], r["esw_reads_after"]
        ap, sc, cp = r["esw_appends"], r["esw_scan"], r["esw_compact"]
        pgi = r.get("pg_ingest", {})
        pgr = r.get("pg_reads", {})
        pga = r.get("pg_appends", {})
        pgs = r.get("pg_scan", {})
        big = n >= 5_000_000
        lines += [
            f"### {n:,} events ({r['streams']:,} streams, longest {r['max_stream']:,} events; "
            f"row_group_size {r['row_group_size']}; peak RSS {r['peak_rss_mb']:.0f} MB)",
            "",
            "| figure | esworkbench | PostgreSQL | ratio | target (5M) |",
            "| --- | ---: | ---: | ---: | --- |",
            f"| batch ingest, events/s (wall; {INGEST_FROM[r.get('ingest_from', 'parquet')]}) | "
            f"{ing['eps_wall']:,.0f} | {pgi.get('eps', float('nan')):,.0f} | "
            f"{ratio(ing['eps_wall'], pgi.get('eps'), True)} | "
            f"{verdict(ing['eps_wall'], 500_000, True) if big else '>= 500,000'} |",
            f"| batch ingest, events/s, each run (the median above) | "
            f"{', '.join(f'{x:,.0f}' for x in r.get('esw_ingest_runs', [ing['eps_wall']]))} "
            f"| | | |",
            f"| batch ingest, events/s (inside append_batch only) | {ing['eps_append']:,.0f} "
            f"| | | |",
            f"| batch ingest, CPU seconds of this process (all threads, incl. reading) | "
            f"{ing['cpu_s']:.1f} ({ing['cpu_s'] / n * 1e6:.2f} µs an event) | | | |",
            f"| ingest wall, s ({ing['batches']} commits; PostgreSQL: COPY + commit) | "
            f"{ing['wall_s']:.1f} | {pgi.get('s', float('nan')):.1f} | | |",
            f"| compact after ingest, s ({cp['files_before']} -> {cp['files_after']} files) | "
            f"{cp['s']:.1f} | (VACUUM ANALYZE {pgi.get('vacuum_analyze_s', float('nan')):.1f}) "
            "| | |",
            f"| stream read p50, ms, before compact | {rb['p50_ms']:.2f} | "
            f"{pgr.get('p50_ms', float('nan')):.2f} | "
            f"{ratio(rb['p50_ms'], pgr.get('p50_ms'), False)} | |",
            f"| stream read p99, ms, before compact | {rb['p99_ms']:.2f} | "
            f"{pgr.get('p99_ms', float('nan')):.2f} | "
            f"{ratio(rb['p99_ms'], pgr.get('p99_ms'), False)} | |",
            f"| stream read p50, ms, after compact | {ra['p50_ms']:.2f} | "
            f"{pgr.get('p50_ms', float('nan')):.2f} | "
            f"{ratio(ra['p50_ms'], pgr.get('p50_ms'), False)} | "
            f"{verdict(ra['p50_ms'], 10, False) if big else '<= 10'} |",
            f"| stream read p99, ms, after compact | {ra['p99_ms']:.2f} | "
            f"{pgr.get('p99_ms', float('nan')):.2f} | "
            f"{ratio(ra['p99_ms'], pgr.get('p99_ms'), False)} | "
            f"{verdict(ra['p99_ms'], 30, False) if big else '<= 30'} |",
            f"| stream read p99 without the {len(r['hot_sizes'])} hot streams, ms, after compact "
            f"| {ra['other_p99_ms']:.2f} | {pgr.get('other_p99_ms', float('nan')):.2f} | "
            f"{ratio(ra['other_p99_ms'], pgr.get('other_p99_ms'), False)} | |",
            f"| hot-stream read p50, ms, after compact (streams of "
            f"{min(r['hot_sizes']):,}-{max(r['hot_sizes']):,} events) | {ra['hot_p50_ms']:.1f} | "
            f"{pgr.get('hot_p50_ms', float('nan')):.1f} | "
            f"{ratio(ra['hot_p50_ms'], pgr.get('hot_p50_ms'), False)} | |",
            f"| single appends/s (exact expected_version, durable commit) | {ap['per_s']:.1f} | "
            f"{pga.get('per_s', float('nan')):.0f} | {ratio(ap['per_s'], pga.get('per_s'), True)} "
            f"| {verdict(ap['per_s'], 50, True) if big else '>= 50'} |",
            f"| single append p50 / p99, ms | {ap['p50_ms']:.1f} / {ap['p99_ms']:.1f} | "
            f"{pga.get('p50_ms', float('nan')):.2f} / {pga.get('p99_ms', float('nan')):.2f} | | |",
            f"| single append mean ms: first 10 / last 10 of {ap['n']} | "
            f"{ap['first10_ms']:.1f} / {ap['last10_ms']:.1f} | | | |",
            f"| full scan, s (median of 3) | {sc['median_s']:.3f} | "
            f"{pgs.get('median_s', float('nan')):.3f} | "
            f"{ratio(sc['median_s'], pgs.get('median_s'), False)} | |",
            f"| full scan, events/s | {n / sc['median_s']:,.0f} | "
            f"{(n / pgs['median_s']) if pgs else float('nan'):,.0f} | | |",
            f"| size on disk, MB | {r['esw_store_bytes'] / 1e6:.0f} | "
            f"{pgi.get('bytes', float('nan')) / 1e6:.0f} | | |",
            "",
        ]
        if pg and sc["result"] != pgs["result"]:
            lines += [
                f"Scan results differ: esworkbench {sc['result']}, PostgreSQL {pgs['result']} "
                "(PostgreSQL's jsonb text is normalised, so the lengths may differ).",
                "",
            ]
        lines += [
            f"Ingest per commit, s: {', '.join(f'{s:.2f}' for s in ing['batch_s'])}",
            "",
            steps_table(
                "Where ingest time goes (summed over all commits)", ing["steps"], ing["append_s"]
            ),
            steps_table(
                f"Where single-append time goes ({ap['n']} appends)", ap["steps"], ap["wall_s"]
            ),
        ]
        if r.get("layouts"):
            lines += [
                f"Layout on {n:,} events (fresh store each; reads after compact):",
                "",
                "| row_group_size | ingest events/s | compact s | read p50 ms | read p99 ms | "
                "other p99 ms | hot p50 ms | full scan s | MB |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for lay in r["layouts"]:
                rd = lay["reads"]
                lines.append(
                    f"| {lay['row_group_size']} | {lay['ingest_eps']:,.0f} | "
                    f"{lay['compact_s']:.1f} | {rd['p50_ms']:.2f} | {rd['p99_ms']:.2f} | "
                    f"{rd['other_p99_ms']:.2f} | {rd['hot_p50_ms']:.1f} | {lay['scan_s']:.3f} | "
                    f"{lay['bytes'] / 1e6:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def steps_table(title: str, steps: dict[str, dict[str, float]], total: float) -> str:
    rows = [
        f"{title}: total {total:.2f} s",
        "",
        "| step | calls | s | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    order = [label for _, _, label in STEPS]
    for name, value in sorted(steps.items(), key=lambda kv: order.index(kv[0])):
        rows.append(
            f"| {name} | {int(value['calls'])} | {value['s']:.3f} | {value['s'] / total:.0%} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--row-group-sizes", type=int, nargs="*", default=[8192, 65536])
    parser.add_argument("--batch-size", type=int, default=200_000, help="events per commit")
    parser.add_argument(
        "--ingest-from",
        choices=["arrow", "parquet"],
        default="arrow",
        help="staged batches memory-mapped from Arrow IPC (the store's own cost), or zstd "
        "Parquet decoded one batch ahead in a thread (reading shares the two cores)",
    )
    parser.add_argument(
        "--ingest-runs", type=int, default=3, help="ingests into a fresh store; median reported"
    )
    parser.add_argument(
        "--hot-share", type=float, default=0.05, help="share of reads on hot streams"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test"
        ),
    )
    parser.add_argument("--stores", type=Path, default=HERE / "stores", help="work directory")
    parser.add_argument("--keep-stores", action="store_true")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=600,
        metavar="SECONDS",
        help="before each size, wait up to this long for other processes to go quiet (0: don't)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    args.events = sorted(args.events)
    args.stores.mkdir(parents=True, exist_ok=True)

    facts = machine_facts(args)
    results = [run_size(n, args, args.stores) for n in args.events]
    text = report(facts, results)
    text += "\nLoad from other processes while each phase ran (cores busy, of "
    text += f"{facts['nproc']}):\n\n| phase | other cores |\n| --- | ---: |\n"
    text += "".join(f"| {k} | {v:.2f} |\n" for k, v in Load.phases.items())
    for r in results:
        for key in ("esw_append_profile", "esw_ingest_profile"):
            if key in r:
                text += f"\n<details><summary>{key} (cProfile, by tottime)</summary>\n\n```\n"
                text += r[key].strip() + "\n```\n</details>\n"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        for r in results:
            for reads in ("esw_reads_before", "esw_reads_after", "pg_reads"):
                r.get(reads, {}).pop("ms", None)
            for lay in r.get("layouts", []):
                lay["reads"].pop("ms", None)
        args.json.write_text(
            json.dumps(
                {"facts": facts, "results": results, "load": Load.phases}, indent=1, default=str
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
