"""Writers in separate OS processes against one store: no lost, doubled or misplaced commit.

Each writer is a real process (``tests/procs/*.py``, run with this interpreter). The writers wait
for a start file so that they begin together, and report every acknowledged event on stdout; the
test then reads the store as every reader sees it and holds it to what was acknowledged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import esworkbench as esw

PROCS = Path(__file__).parent / "procs"
TIMEOUT = 180


def start(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROCS / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]]) -> list[list[dict[str, Any]]]:
    """Waits for every writer; fails with its stderr if one did not end cleanly."""
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"writer failed ({proc.returncode}):\n{err}"
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[-1].get("done"), f"writer stopped early:\n{out}\n{err}"
        outputs.append(lines)
    return outputs


def test_writers_racing_on_one_stream_lose_and_double_nothing(
    tmp_path: Path, audit_store: Callable[[Path], list[dict[str, Any]]]
) -> None:
    path = tmp_path / "store"
    esw.open_store(path).close()
    go = tmp_path / "go"
    writers, each = 3, 30
    procs = [start("contend.py", path, "counter-1", each, go, f"w{n}") for n in range(writers)]
    go.touch()
    outputs = finish(procs)

    acks = [line for lines in outputs for line in lines if "ack" in line]
    conflicts = sum(lines[-1]["conflicts"] for lines in outputs)
    print(f"\n{writers} writers x {each} appends to one stream: {conflicts} conflicts retried")

    total = writers * each
    rows = audit_store(path)  # versions 1..total, positions 1..N, unique ids, readers agree
    assert [r["version"] for r in rows] == list(range(1, total + 1))
    stored = {r["event_id"]: r for r in rows}
    assert len(acks) == total
    assert {a["ack"] for a in acks} == set(stored), "acknowledged and stored events differ"
    for ack in acks:
        assert stored[ack["ack"]]["version"] == ack["version"], "append returned a wrong version"
    for n, lines in enumerate(outputs):
        mine = [line for line in lines if "ack" in line]
        assert [a["version"] for a in mine] == sorted(a["version"] for a in mine)
        data = [json.loads(stored[a["ack"]]["data"]) for a in mine]
        assert data == [{"writer": f"w{n}", "i": i} for i in range(each)]


def test_batch_writers_on_their_own_streams_commit_everything_in_order(
    tmp_path: Path, audit_store: Callable[[Path], list[dict[str, Any]]]
) -> None:
    path = tmp_path / "store"
    esw.open_store(path).close()
    go = tmp_path / "go"
    rounds = 25
    procs = [start("batch_writer.py", path, prefix, rounds, go) for prefix in ("left", "right")]
    go.touch()
    outputs = finish(procs)

    rows = audit_store(path)
    assert len(rows) == 2 * rounds * 6, "a commit was lost"
    position_of = {r["event_id"]: r["position"] for r in rows}
    for lines in outputs:
        batches = [line for line in lines if "ids" in line]
        assert len(batches) == rounds
        for batch in batches:
            # One batch is one commit: its events got consecutive positions, in input order.
            assert [position_of[i] for i in batch["ids"]] == list(
                range(batch["first"], batch["last"] + 1)
            )
    for prefix in ("left", "right"):
        for s in range(3):
            assert len([r for r in rows if r["aggregate_id"] == f"{prefix}-{s}"]) == 2 * rounds


def test_writers_that_create_the_same_store_at_once_share_it(
    tmp_path: Path, audit_store: Callable[[Path], list[dict[str, Any]]]
) -> None:
    path = tmp_path / "new" / "store"
    go = tmp_path / "go"
    procs = [start("batch_writer.py", path, f"p{n}", 2, go) for n in range(3)]
    go.touch()
    finish(procs)
    assert len(audit_store(path)) == 3 * 2 * 6


def test_a_reader_sees_only_whole_commits_while_another_process_appends_and_compacts(
    tmp_path: Path, audit_store: Callable[[Path], list[dict[str, Any]]]
) -> None:
    """The crash test's writer (appends, batches over two partitions, compactions) runs while this
    process reads for a few seconds: every read is gapless, and extends the one before."""
    path = tmp_path / "store"
    reader = esw.open_store(path)
    writer = start("crash_writer.py", path, "reader-test")
    seen: list[str] = []  # event_ids in position order, as last read
    reads = 0
    began = time.monotonic()
    try:
        while time.monotonic() - began < 4 or not seen:
            assert writer.poll() is None, writer.communicate()[1]
            assert time.monotonic() - began < 60, "the writer wrote nothing"
            rows = [r for b in reader.read_all() for r in b.to_pylist()]
            assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))
            ids = [r["event_id"] for r in rows]
            assert ids[: len(seen)] == seen, "a read lost or changed events seen before"
            seen = ids
            for stream in ("acct-0", "item-0"):
                versions = reader.read_stream(stream)["version"].to_pylist()
                assert versions == list(range(1, len(versions) + 1)), stream
            [(count,)] = reader.sql("select count(*) from events").fetchall()
            assert count >= len(seen)
            reads += 1
    finally:
        writer.kill()
        out, _ = writer.communicate()
    lines = []
    for text in out.splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            break  # the kill cut the last line short
    calls = sum(1 for line in lines if "ack" in line)
    compactions = sum(
        1 for line in lines if "ack" in line and line["result"] is not None and not line["ids"]
    )
    print(f"\n{reads} reads while the writer made {calls} calls, {compactions} compactions")
    assert [r["event_id"] for r in audit_store(path)][: len(seen)] == seen
