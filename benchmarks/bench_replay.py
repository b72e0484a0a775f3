"""Replay benchmarks on the generator's bank workload, each figure beside its anchor, same run.

The workload: the Account streams of ``esworkbench.demo.generate`` (opened, deposits in two schema
versions, withdrawals with balanceAfter, freezes, closures), ``--events`` of them, in one compacted
store; PostgreSQL gets the same events in the seed schema (``bench_replay_events``) by COPY.

1. Every account as of the last instant with a declared fold (``demo_folds.ACCOUNT_SUMMARY``, the
   SQL engine), against PostgreSQL answering the same question (DISTINCT ON per last-value field
   plus one GROUP BY for counts, sums and instants) and against a hand-written DuckDB query over
   the same Parquet files (written with the domain's knowledge: which event type carries what).
2. A Python fold (``demo_folds.ACCOUNT``: JSON payloads, exact Decimals) over every event, end to
   end through ``esw.as_of``, against a naive Python loop over already-decoded dicts.
3. One stream's state as of a random instant (``esw.replay(..., at=T)``): p50 and p99 over a
   seeded sample of accounts; anchor: the same fold over PostgreSQL's rows of that stream.
4. Peak memory of the Python replay of item 2, in a fresh process (main + worker peaks), in a
   run of its own: the sampler costs CPU, so the timed runs of item 2 go without it.

Medians of ``--repeat`` runs. Run ``python benchmarks/bench_replay.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_store import PG_SCHEMA, log, pct, pg_connect, wait_quiet  # noqa: E402

import esworkbench as esw  # noqa: E402
from esworkbench.demo import generate  # noqa: E402
from esworkbench.demo_folds import ACCOUNT, ACCOUNT_SUMMARY  # noqa: E402

TABLE = "bench_replay_events"  # not bench_store's table: the two benchmarks may run together
PG_COLUMNS = [
    "event_id", "event_type", "aggregate_id", "aggregate_type", "version", "data", "metadata",
    "recorded_at",
]  # fmt: skip
STATUS = "('AccountOpened', 'AccountFrozen', 'AccountUnfrozen', 'AccountClosed')"

HAND_DUCKDB = f"""
SELECT aggregate_id, max(version) AS version, max(recorded_at) AS last_event_at,
  any_value(data->>'$.owner') FILTER (WHERE event_type = 'AccountOpened') AS owner,
  any_value(data->>'$.currency') FILTER (WHERE event_type = 'AccountOpened') AS currency,
  arg_max(data->>'$.balanceAfter', version)
    FILTER (WHERE event_type = 'MoneyWithdrawn' OR (event_type = 'MoneyDeposited'
            AND schema_version = 2)) AS balance,
  count(*) FILTER (WHERE event_type = 'MoneyDeposited') AS deposits,
  sum(CAST(data->>'$.amount' AS DECIMAL(38, 18)))
    FILTER (WHERE event_type = 'MoneyWithdrawn') AS withdrawn,
  arg_max(event_type, version) FILTER (WHERE event_type IN {STATUS}) AS status,
  min(recorded_at) AS opened_at, max(recorded_at) AS last_activity
FROM events WHERE aggregate_type = 'Account' GROUP BY aggregate_id
"""

PG_SAME_QUESTION = f"""
WITH last AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, version, timestamp
  FROM bench_replay_events WHERE aggregate_type = 'Account' ORDER BY aggregate_id, version DESC),
balance AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, data->'balanceAfter' AS balance
  FROM bench_replay_events WHERE aggregate_type = 'Account' AND data ? 'balanceAfter'
  ORDER BY aggregate_id, version DESC),
status AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, event_type AS status
  FROM bench_replay_events WHERE event_type IN {STATUS} ORDER BY aggregate_id, version DESC),
opened AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, data->>'owner' AS owner,
    data->>'currency' AS currency
  FROM bench_replay_events WHERE event_type = 'AccountOpened' ORDER BY aggregate_id, version DESC),
totals AS (
  SELECT aggregate_id, count(*) FILTER (WHERE event_type = 'MoneyDeposited') AS deposits,
    sum((data->>'amount')::numeric) FILTER (WHERE event_type = 'MoneyWithdrawn') AS withdrawn,
    min(timestamp) AS opened_at, max(timestamp) AS last_activity
  FROM bench_replay_events WHERE aggregate_type = 'Account' GROUP BY aggregate_id)
SELECT last.aggregate_id, last.version, last.timestamp, owner, currency, balance, deposits,
  withdrawn, status, opened_at, last_activity
FROM last JOIN totals USING (aggregate_id) LEFT JOIN balance USING (aggregate_id)
  LEFT JOIN status USING (aggregate_id) LEFT JOIN opened USING (aggregate_id)
"""


def build(events: int, seed: int, work: Path) -> tuple[Path, Path]:
    """A compacted store of ``events`` Account events, and the same events as CSV for COPY."""
    path = work / f"bank-{events}-seed{seed}"
    csv = work / f"bank-{events}-seed{seed}.csv"
    done = path / "bench-complete"
    if done.exists() and csv.exists():
        log(f"reusing {path.name}")
        return path, csv
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    store = esw.open_store(path)
    schema = pa.schema([esw.EVENT_SCHEMA.field(c) for c in PG_COLUMNS])
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    written = 0
    start = time.perf_counter()
    with pacsv.CSVWriter(csv, schema, write_options=options) as writer:
        # Accounts are about half of the generated events: generate enough, keep only them.
        for table in generate(int(events / 0.5) + 100_000, seed=seed, batch_size=400_000):
            accounts = table.filter(pc.equal(table["aggregate_type"], "Account"))
            accounts = accounts.slice(0, events - written)
            store.append_batch(accounts)
            writer.write_table(accounts.select(PG_COLUMNS))
            written += accounts.num_rows
            if written >= events:
                break
    store.compact()
    store.close()
    done.touch()
    log(f"built {written:,} Account events in {time.perf_counter() - start:.0f}s")
    return path, csv


def pg_load(dsn: str, csv: Path) -> float:
    """COPY the events into ``bench_replay_events`` (the seed schema); returns the seconds."""
    with pg_connect(dsn) as conn:
        conn.execute(PG_SCHEMA.replace("bench_events", TABLE))
        conn.commit()
        start = time.perf_counter()
        copy_sql = f"COPY {TABLE} ({', '.join(PG_COLUMNS[:-1])}, timestamp) FROM STDIN (FORMAT csv)"
        with conn.cursor() as cur, cur.copy(copy_sql) as copy, csv.open("rb") as source:
            while chunk := source.read(1 << 20):
                copy.write(chunk)
        conn.commit()
        took = time.perf_counter() - start
        conn.autocommit = True
        conn.execute(f"VACUUM ANALYZE {TABLE}")
    return took


def median_time(run: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


BALANCE = esw.Aggregate("Account", fields={"balance": esw.last("balanceAfter")}, decimals=True)
HAND_BALANCE = """
SELECT aggregate_id, max(version) AS version, max(recorded_at) AS last_event_at,
  arg_max(data->>'$.balanceAfter', version) FILTER (WHERE json_exists(data, '$.balanceAfter'))
FROM events WHERE aggregate_type = 'Account' GROUP BY aggregate_id
"""
PG_BALANCE = f"""
WITH last AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, version, timestamp
  FROM {TABLE} WHERE aggregate_type = 'Account' ORDER BY aggregate_id, version DESC),
balance AS (
  SELECT DISTINCT ON (aggregate_id) aggregate_id, data->'balanceAfter' AS balance
  FROM {TABLE} WHERE aggregate_type = 'Account' AND data ? 'balanceAfter'
  ORDER BY aggregate_id, version DESC)
SELECT last.*, balance FROM last LEFT JOIN balance USING (aggregate_id)
"""


def declared_balance(store: esw.Store, dsn: str | None, repeat: int) -> dict[str, Any]:
    """The smallest declared fold: each account's last balanceAfter (and version, instant)."""
    ours, frame = median_time(lambda: esw.as_of(store, BALANCE), repeat)
    hand_df, _ = median_time(lambda: store.sql(HAND_BALANCE).df(), repeat)
    out: dict[str, Any] = {"esw_s": ours, "hand_duckdb_df_s": hand_df}
    if dsn:
        out["postgres_s"] = postgres_time(dsn, PG_BALANCE, repeat, len(frame))
    return out


def postgres_time(dsn: str, query: str, repeat: int, rows: int) -> float:
    """Median seconds of PostgreSQL answering ``query``, checked to give ``rows`` rows."""
    with pg_connect(dsn) as conn:
        took, answer = median_time(lambda: conn.execute(query).fetchall(), repeat)
    assert len(answer) == rows, (len(answer), rows)
    return took


def naive_end_to_end(store: esw.Store) -> float:
    """Events/s of a replay script: DuckDB rows in stream order, json.loads, a loop of ifs."""
    import json as stdjson
    from decimal import Decimal

    start = time.perf_counter()
    reader = store.sql(
        "SELECT aggregate_id, event_type, data FROM events WHERE aggregate_type = 'Account' "
        "ORDER BY aggregate_id, version"
    ).to_arrow_reader(100_000)
    states: dict[str, dict[str, Any]] = {}
    count = 0
    for batch in reader:
        for aggregate_id, kind, text in zip(*(c.to_pylist() for c in batch.columns), strict=True):
            data = stdjson.loads(text, parse_float=Decimal)
            state = states.get(aggregate_id) or {"owner": None, "currency": None, "balance": 0,
                                                 "status": None, "moves": 0}  # fmt: skip
            if kind == "AccountOpened":
                state = {**state, "owner": data["owner"], "currency": data["currency"],
                         "balance": data.get("openingBalance", 0), "status": "open"}  # fmt: skip
            elif kind == "MoneyDeposited":
                amount = data["amount"] if "amount" in data else data["amt"]
                state = {**state, "balance": state["balance"] + amount,
                         "moves": state["moves"] + 1}  # fmt: skip
            elif kind == "MoneyWithdrawn":
                state = {**state, "balance": state["balance"] - data["amount"],
                         "moves": state["moves"] + 1}  # fmt: skip
            states[aggregate_id] = state
            count += 1
    return count / (time.perf_counter() - start)


def declared(store: esw.Store, dsn: str | None, repeat: int) -> dict[str, Any]:
    ours, frame = median_time(lambda: esw.as_of(store, ACCOUNT_SUMMARY), repeat)
    hand, rows = median_time(lambda: store.sql(HAND_DUCKDB).to_arrow_table(), repeat)
    hand_df, _ = median_time(lambda: store.sql(HAND_DUCKDB).df(), repeat)
    out: dict[str, Any] = {
        "esw_s": ours,
        "hand_duckdb_s": hand,
        "hand_duckdb_df_s": hand_df,
        "accounts": len(frame),
    }
    assert rows.num_rows == len(frame), (rows.num_rows, len(frame))
    if dsn:
        out["postgres_s"] = postgres_time(dsn, PG_SAME_QUESTION, repeat, len(frame))
    return out


def naive_rate(store: esw.Store, sample: int) -> float:
    """Events/s of a plain Python loop over already-decoded dicts, with the same fold logic."""
    import json as stdjson
    from decimal import Decimal

    rows = store.sql(
        "SELECT aggregate_id, event_type, data FROM events WHERE aggregate_type = 'Account' "
        "ORDER BY aggregate_id, version LIMIT ?",
        [sample],
    ).fetchall()
    events = [
        {"aggregate_id": a, "event_type": t, "data": stdjson.loads(d, parse_float=Decimal)}
        for a, t, d in rows
    ]
    states: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for event in events:
        state = states.get(event["aggregate_id"])
        if state is None:
            state = {"owner": None, "currency": None, "balance": 0, "status": None, "moves": 0}
        data, kind = event["data"], event["event_type"]
        if kind == "AccountOpened":
            state = {**state, "owner": data["owner"], "currency": data["currency"],
                     "balance": data.get("openingBalance", 0), "status": "open"}  # fmt: skip
        elif kind == "MoneyDeposited":
            amount = data["amount"] if "amount" in data else data["amt"]
            state = {**state, "balance": state["balance"] + amount, "moves": state["moves"] + 1}
        elif kind == "MoneyWithdrawn":
            state = {**state, "balance": state["balance"] - data["amount"],
                     "moves": state["moves"] + 1}  # fmt: skip
        states[event["aggregate_id"]] = state
    return len(events) / (time.perf_counter() - start)


def _pss_kb(pid: int | str) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_pss_mb() -> float:
    """PSS of this process and its children (the engine's workers), in MB."""
    pids = {str(os.getpid())}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids |= set((task / "children").read_text().split())
    return sum(_pss_kb(pid) for pid in pids) / 1024


def python_fold_child(
    store_path: str, workers: int | None, *, floats: bool = False, sample: bool = False
) -> None:
    """Run in a fresh process: the Python replay of every account; prints JSON figures.

    With ``sample``, peak memory is sampled every 20 ms as the summed PSS of this process and
    its workers, so pages the forked workers share with it count once (ru_maxrss would count
    them per process). The sampler reads /proc/PID/smaps_rollup, which walks each process's page
    tables and costs CPU on the same two cores, so timed runs go without it.
    """
    store = esw.open_store(store_path, create=False)
    count = store.sql("select count(*) from events").fetchall()[0][0]
    peak = [0.0]
    done = threading.Event()

    def sampling() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_pss_mb())

    sampler = threading.Thread(target=sampling, daemon=True)
    if sample:
        sampler.start()
    start = time.perf_counter()
    fold = dataclasses.replace(ACCOUNT, decimals=False) if floats else ACCOUNT
    frame = esw.as_of(store, fold, workers=workers, progress=False)
    took = time.perf_counter() - start
    done.set()
    if sample:
        sampler.join()
    print(json.dumps({"events": count, "s": took, "eps": count / took, "accounts": len(frame),
                      "peak_pss_mb": peak[0] if sample else None}))  # fmt: skip


def python_fold(
    store: Path, repeat: int, workers: int | None, *, floats: bool = False
) -> dict[str, Any]:
    """Medians of ``repeat`` timed runs, each in a fresh process; then, unless ``floats``, one
    more run with the memory sampler for the peak."""

    def run(sample: bool) -> dict[str, Any]:
        command = [sys.executable, __file__, "--child", str(store), *(["--floats"] * floats)]
        command += ["--sample"] * sample
        if workers is not None:
            command += ["--workers", str(workers)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    runs = [run(sample=False) for _ in range(repeat)]
    best = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]
    result = {**best, "runs_s": [r["s"] for r in runs]}
    if not floats:
        sampled = run(sample=True)
        result.update(peak_total_mb=sampled["peak_pss_mb"], sampled_s=sampled["s"])
    return result


def one_stream(store: esw.Store, dsn: str | None, samples: int, seed: int) -> dict[str, Any]:
    ids = [r[0] for r in store.sql("select aggregate_id from streams order by 1").fetchall()]
    first, last = store.sql("select min(recorded_at), max(recorded_at) from events").fetchall()[0]
    rng = random.Random(seed)
    picks = [
        (rng.choice(ids), first + timedelta(seconds=rng.uniform(0, (last - first).total_seconds())))
        for _ in range(samples)
    ]
    for aggregate_id, at in picks[:20]:  # warm the footers' cache, as a notebook session would
        esw.replay(store, ACCOUNT, aggregate_id, at=at)
    ms = []
    for aggregate_id, at in picks:
        start = time.perf_counter()
        esw.replay(store, ACCOUNT, aggregate_id, at=at)
        ms.append((time.perf_counter() - start) * 1000)
    out: dict[str, Any] = {"p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99), "samples": samples}
    if dsn:
        from esworkbench.engine import Folder, decode_events, fold_events

        pg_ms = []
        with pg_connect(dsn) as conn:
            for aggregate_id, at in picks:
                start = time.perf_counter()
                rows = conn.execute(
                    "SELECT aggregate_id, version, event_type, data::text, 1 AS schema_version "
                    "FROM bench_replay_events WHERE aggregate_id = %s AND timestamp <= %s "
                    "ORDER BY version",
                    [aggregate_id, at],
                ).fetchall()
                table = pa.table(
                    list(zip(*rows, strict=True)) if rows else [[], [], [], [], []],
                    names=["aggregate_id", "version", "event_type", "data", "schema_version"],
                )
                fold_events(Folder(ACCOUNT), decode_events(table, ACCOUNT))
                pg_ms.append((time.perf_counter() - start) * 1000)
        out["postgres_p50_ms"] = pct(pg_ms, 0.5)
        out["postgres_p99_ms"] = pct(pg_ms, 0.99)
    return out


def report(r: dict[str, Any]) -> str:
    """The figures as the Markdown of RESULTS.md, ratios against the anchors of the same run."""
    d, p, o, b = r["declared"], r["python"], r["one_stream"], r["declared_balance"]
    pg = d.get("postgres_s")
    lines = [
        f"Run {r['date']}, `{r['command']}`; {p['events']:,} Account events, "
        f"{d['accounts']:,} accounts.",
        "",
        "| question | esworkbench | anchor (same run) | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| every account as of the last instant, rich declared fold (8 fields) | "
        f"{d['esw_s']:.2f} s | "
        f"PostgreSQL DISTINCT ON {pg:.2f} s | {pg / d['esw_s']:.1f}× faster | ≥ 15× |"
        if pg
        else f"| every account, declared fold | {d['esw_s']:.2f} s | (no PostgreSQL) | | |",
        f"| every account's last balanceAfter, declared fold | {b['esw_s']:.2f} s | PostgreSQL "
        f"DISTINCT ON {b.get('postgres_s', float('nan')):.2f} s | "
        f"{b.get('postgres_s', float('nan')) / b['esw_s']:.1f}× faster | ≥ 15× |",
        f"| the same | {b['esw_s']:.2f} s | hand-written DuckDB to pandas "
        f"{b['hand_duckdb_df_s']:.2f} s | {b['esw_s'] / b['hand_duckdb_df_s']:.2f}× its time "
        "| ≤ 1.5× |",
        f"| the rich fold as above | {d['esw_s']:.2f} s | hand-written DuckDB "
        f"{d['hand_duckdb_s']:.2f} s "
        f"(to pandas {d['hand_duckdb_df_s']:.2f} s) | "
        f"{d['esw_s'] / d['hand_duckdb_df_s']:.2f}× its time | ≤ 1.5× |",
        f"| Python fold over every event (bank fold, exact Decimals) | "
        f"{p['eps'] / 1e6:.2f}M events/s ({p['s']:.1f} s) | naive loop over decoded dicts "
        f"{r['naive_loop_eps'] / 1e6:.2f}M events/s; a naive replay script end to end "
        f"(DuckDB rows, json.loads, a loop of ifs) {r['naive_end_to_end_eps'] / 1e6:.2f}M "
        "events/s | | ≥ 1M events/s |",
        f"| the same fold with floats (``decimals=False``) | "
        f"{r['python_floats']['eps'] / 1e6:.2f}M events/s ({r['python_floats']['s']:.1f} s) "
        "| | | |",
        f"| one stream as of a random instant, p50 / p99 | {o['p50_ms']:.1f} / "
        f"{o['p99_ms']:.1f} ms | PostgreSQL read + the same fold "
        f"{o.get('postgres_p50_ms', float('nan')):.1f} / "
        f"{o.get('postgres_p99_ms', float('nan')):.1f} ms | | p50 ≤ 15 ms |",
        f"| peak memory of the Python replay (main + workers, PSS; a run of its own with the "
        f"sampler, {p['sampled_s']:.1f} s) | {p['peak_total_mb']:.0f} MB | | | ≤ 2 GB |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--work", type=Path, default=HERE / "stores")
    parser.add_argument("--wait-quiet", type=float, default=300, help="seconds to wait at most")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--floats", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        python_fold_child(args.child, args.workers, floats=args.floats, sample=args.sample)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    path, csv = build(args.events, args.seed, args.work)
    dsn = None if args.skip_postgres else args.dsn
    if dsn:
        log("loading PostgreSQL (COPY into bench_replay_events)")
        pg_load(dsn, csv)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    store = esw.open_store(path, create=False)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["benchmarks/bench_replay.py", *(argv or sys.argv[1:])]),
    }
    log("declared fold, every account")
    results["declared"] = declared(store, dsn, args.repeat)
    log("python fold, every event")
    results["python"] = python_fold(path, args.repeat, args.workers)
    results["python_floats"] = python_fold(path, args.repeat, args.workers, floats=True)
    results["naive_loop_eps"] = naive_rate(store, 500_000)
    log("naive replay script, end to end")
    results["naive_end_to_end_eps"] = naive_end_to_end(store)
    log("declared fold of one field")
    results["declared_balance"] = declared_balance(store, dsn, args.repeat)
    log("one stream as of T")
    results["one_stream"] = one_stream(store, dsn, args.samples, args.seed)
    print(json.dumps(results, indent=2, default=str))
    print(report(results))
    if dsn:
        with pg_connect(dsn) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_replay_events")
            conn.commit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
