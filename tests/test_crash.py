"""A writer killed with SIGKILL at random moments never leaves a half-written append behind.

The writer (``tests/procs/crash_writer.py``) appends in a loop: single appends of several events,
batches over several streams and partitions, and now and then a compaction. The test kills it at a
random moment, checks the store as every reader sees it, and starts the next writer on the same
store, which first repeats the call the killed one had in flight. ``ESW_CRASH_RUNS`` raises the
number of kills (15 by default).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import esworkbench as esw

PROCS = Path(__file__).parent / "procs"
RUNS = int(os.environ.get("ESW_CRASH_RUNS", "15"))


def read_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            break  # the kill cut the last line short
    return lines


def kill_writer_at_random(
    store: Path, seed: str, inflight: Path | None, out: Path, rng: random.Random
) -> list[dict[str, Any]]:
    """Starts a writer, kills it 0.05-1.0 s after it is ready, and returns what it printed."""
    args = [sys.executable, str(PROCS / "crash_writer.py"), str(store), seed]
    if inflight is not None:
        args.append(str(inflight))
    err = out.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + 60
    while '"ready"' not in out.read_text():
        assert proc.poll() is None, f"writer died before it was ready:\n{err.read_text()}"
        assert time.monotonic() < deadline, "writer never got ready"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.05, 1.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"writer ended by itself:\n{err.read_text()}"
    return read_lines(out)


def test_a_writer_killed_at_random_moments_leaves_only_whole_appends(
    tmp_path: Path, audit_store: Callable[[Path], list[dict[str, Any]]]
) -> None:
    store = tmp_path / "store"
    long_lived = esw.open_store(store)  # a reader that stays open across every crash
    rng = random.Random(os.environ.get("ESW_CRASH_SEED", "20240501"))
    acked: set[str] = set()
    attempted: set[str] = set()  # ids of calls that were started but never acknowledged
    inflight: Path | None = None
    stats = {"acks": 0, "retried": 0, "inflight_committed": 0, "compactions": 0}

    for run in range(RUNS):
        lines = kill_writer_at_random(store, f"r{run}", inflight, tmp_path / f"run{run}.out", rng)

        retried_op, retried_result = None, None
        if inflight is not None:
            retried = [line for line in lines if "retried" in line]
            if retried:
                retried_op, retried_result = retried[0]["retried"], retried[0]["result"]
                acked |= {e["event_id"] for e in retried_op["events"]}
                stats["retried"] += 1
                inflight = None  # else the killed writer had it in flight too: repeat it again
        pending = None
        for line in lines:
            if "attempt" in line:
                pending = line["attempt"]
            elif "ack" in line:
                assert pending is not None
                assert line["ack"] == pending["append_no"]
                acked |= set(line["ids"])
                stats["acks"] += 1
                stats["compactions"] += pending["kind"] == "compact"
                pending = None
        if pending is not None and pending["events"]:
            attempted |= {e["event_id"] for e in pending["events"]}
            inflight = tmp_path / f"inflight{run}.json"
            inflight.write_text(json.dumps(pending))

        rows = audit_store(store)
        check_whole_appends(rows, acked, attempted)
        if retried_op is not None:
            # The repeated call is a no-op if the killed writer committed it, else it commits;
            # either way it answers as the first call would have.
            check_retry(rows, retried_op, retried_result)
        stats["inflight_committed"] += bool(
            pending and pending["events"] and pending["events"][0]["event_id"] in _ids(rows)
        )
        again = long_lived.sql("select * from events order by position").to_arrow_table()
        assert again.to_pylist() == rows, "a handle opened before the crash sees other rows"

    # After the last crash the store still takes appends, and compaction changes nothing.
    final = esw.open_store(store)
    version = final.append("acct-0", [{"event_type": "Checked", "data": {}}])
    assert version == final.stream_version("acct-0") >= 1
    before = audit_store(store)
    final.compact()
    assert audit_store(store) == before
    print(f"\n{RUNS} kills: {stats}, {len(before)} events stored")


def _ids(rows: list[dict[str, Any]]) -> set[str]:
    return {r["event_id"] for r in rows}


def check_retry(rows: list[dict[str, Any]], op: dict[str, Any], result: Any) -> None:
    where = {r["event_id"]: r for r in rows}
    placed = [where[e["event_id"]] for e in op["events"]]
    if op["kind"] == "append":
        assert result == op["expected"] + len(op["events"])
        assert [r["version"] for r in placed] == list(range(op["expected"] + 1, result + 1))
        assert {r["aggregate_id"] for r in placed} == {op["stream"]}
    else:
        events, first, last = result
        assert events == len(op["events"])
        assert [r["position"] for r in placed] == list(range(first, last + 1))


def check_whole_appends(rows: list[dict[str, Any]], acked: set[str], attempted: set[str]) -> None:
    stored = _ids(rows)
    assert acked <= stored, f"{len(acked - stored)} acknowledged events are missing"
    assert stored - acked <= attempted, "events appeared that no call wrote"
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        data = json.loads(row["data"])
        if "append_no" in data:
            groups[data["append_no"]].append((row["position"], data))
    for append_no, members in groups.items():
        n = members[0][1]["n"]
        assert sorted(d["k"] for _, d in members) == list(range(n)), f"{append_no} is partial"
        positions = [p for p, _ in members]
        assert positions == list(range(positions[0], positions[0] + n)), (
            f"{append_no} is not one commit"
        )
