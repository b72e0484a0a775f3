"""Import rates and peak memory: JSON Lines, Parquet and PostgreSQL (common schema) into a store.

Each import runs in its own process, so its peak RSS is its own; each is run ``--runs`` times
and the table shows the median rate and time and the highest peak RSS. The events come from
``esworkbench.demo.generate``; the files are written by esworkbench's exporters and the
PostgreSQL table by COPY. Usage::

    .venv/bin/python benchmarks/bench_import.py --events 1000000 5000000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

DSN = "postgresql://postgres@127.0.0.1:5432/test"
TABLE = "bench_import_events"

_CHILD = """
import json, sys, time
import esworkbench as esw
store_path, source, table, size = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
store = esw.open_store(store_path)
options = {"batch_size": int(size)} if size else {}
started = time.perf_counter()
result = esw.import_events(store, source, table=table, **options)
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report the peak
# of the benchmark process that started it (which generated the events).
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
print(json.dumps({"imported": result.imported, "seconds": seconds, "peak_rss_mb": rss}))
"""


def run_child(store: Path, source: str, table: str, batch_size: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store), source, table, batch_size],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage(events: int, work: Path) -> tuple[Path, Path]:
    import esworkbench as esw
    from esworkbench.demo import write_demo

    store = esw.open_store(work / "origin")
    write_demo(store, events, seed=0)
    jsonl, parquet = work / "events.jsonl", work / "events.parquet"
    esw.export_jsonl(store, jsonl)
    esw.export_parquet(store, parquet)
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        connection.execute(
            f"CREATE TABLE {TABLE} (id BIGSERIAL PRIMARY KEY, event_id UUID UNIQUE, "
            "event_type TEXT, aggregate_id TEXT, aggregate_type TEXT, version INT, data JSONB, "
            "metadata JSONB, timestamp TIMESTAMPTZ, UNIQUE (aggregate_id, version))"
        )
        columns = "event_id, event_type, aggregate_id, aggregate_type, version, data, metadata"
        with connection.cursor().copy(f"COPY {TABLE} ({columns}, timestamp) FROM STDIN") as copy:
            for batch in store.read_all(batch_size=100_000):
                for row in batch.select(
                    [
                        "event_id",
                        "event_type",
                        "aggregate_id",
                        "aggregate_type",
                        "version",
                        "data",
                        "metadata",
                        "recorded_at",
                    ]
                ).to_pylist():
                    copy.write_row(tuple(row.values()))
    return jsonl, parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--runs", type=int, default=3, help="imports per source (median)")
    parser.add_argument("--batch-size", default="", help="default: import_events' own")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| events | source | events/s (median) | seconds (median) | peak RSS MB (max) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for events in args.events:
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent / "stores") as folder:
            work = Path(folder)
            jsonl, parquet = stage(events, work)
            for name, source, table in (
                ("JSON Lines", str(jsonl), ""),
                ("Parquet", str(parquet), ""),
                ("PostgreSQL (common schema, ADBC)", DSN, TABLE),
            ):
                runs = []
                for run in range(args.runs):
                    store = work / f"store-{len(name)}-{run}"
                    figures = run_child(store, source, table, args.batch_size)
                    assert figures["imported"] == events, figures
                    runs.append(figures)
                    shutil.rmtree(store)
                seconds = statistics.median(r["seconds"] for r in runs)
                rss = max(r["peak_rss_mb"] for r in runs)
                print(
                    f"| {events:,} | {name} | {events / seconds:,.0f} | {seconds:.1f} "
                    f"| {rss:,.0f} |",
                    flush=True,
                )
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")


if __name__ == "__main__":
    main()
