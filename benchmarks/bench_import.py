"""Import rates and peak memory: JSON Lines, Parquet and PostgreSQL (common schema) into a store.

Each import runs in its own process, so its peak RSS is its own. The events come from
``esworkbench.demo.generate``; the files are written by esworkbench's exporters and the
PostgreSQL table by COPY. Usage::

    .venv/bin/python benchmarks/bench_import.py --events 1000000 5000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

DSN = "postgresql://postgres@127.0.0.1:5432/test"
TABLE = "bench_import_events"

_CHILD = """
import json, resource, sys, time
import esworkbench as esw
store_path, source, table = sys.argv[1], sys.argv[2], sys.argv[3] or None
store = esw.open_store(store_path)
started = time.perf_counter()
result = esw.import_events(store, source, table=table, batch_size=100_000)
seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"imported": result.imported, "seconds": seconds, "peak_rss_mb": rss}))
"""


def run_child(store: Path, source: str, table: str = "") -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(store), source, table],
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
    args = parser.parse_args()
    print("| events | source | events/s | seconds | peak RSS MB |")
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
                figures = run_child(work / f"store-{len(name)}", source, table)
                assert figures["imported"] == events, figures
                rate = events / figures["seconds"]
                print(
                    f"| {events:,} | {name} | {rate:,.0f} | {figures['seconds']:.1f} "
                    f"| {figures['peak_rss_mb']:,.0f} |",
                    flush=True,
                )
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")


if __name__ == "__main__":
    main()
