"""The writer of the crash test: appends until it is killed, saying what it tried and what it got.

Usage: crash_writer.py STORE SEED [INFLIGHT_JSON]

Prints JSON lines, each flushed at once:

- {"ready": true} once the store is open;
- {"retried": op, "result": r} after redoing INFLIGHT_JSON, the operation the previous writer had
  started but not seen acknowledged (same event_ids, same expected_version): the store must treat
  it as a no-op if it was committed and commit it otherwise;
- {"attempt": op} before each call, where op says everything needed to repeat the call;
- {"ack": append_no, "ids": [...], "result": r} after the call returned.

Operations are single ``append`` calls of 1-5 events to one stream, ``append_batch`` calls over 2-4
streams of two aggregate types, and now and then ``compact``. Each event carries in its data the
append_no of its call, the call's size n and its index k, so a reader can tell whether each call
was stored whole.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import esworkbench as esw

ACCOUNTS = [f"acct-{i}" for i in range(4)]
ITEMS = [f"item-{i}" for i in range(8)]
TYPES = {**dict.fromkeys(ACCOUNTS, "Account"), **dict.fromkeys(ITEMS, "Item/../x")}


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def events_for(append_no: str, n: int, streams: list[str] | None) -> list[dict[str, Any]]:
    out = []
    for k in range(n):
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "event_type": "Happened",
            "data": {"append_no": append_no, "n": n, "k": k, "pad": "x" * (k * 37)},
        }
        if streams is not None:
            stream = streams[k % len(streams)]
            event["aggregate_id"] = stream
            event["aggregate_type"] = TYPES[stream]
        out.append(event)
    return out


def run(store: esw.Store, op: dict[str, Any]) -> Any:
    if op["kind"] == "append":
        return store.append(
            op["stream"],
            op["events"],
            aggregate_type=TYPES[op["stream"]],
            expected_version=op["expected"],
        )
    if op["kind"] == "batch":
        result = store.append_batch(op["events"])
        return [result.events, result.first_position, result.last_position]
    return store.compact()


def main() -> None:
    store_path, seed = sys.argv[1], sys.argv[2]
    rng = random.Random(seed)
    store = esw.open_store(store_path)
    emit({"ready": True})
    if len(sys.argv) > 3:
        op = json.loads(Path(sys.argv[3]).read_text())
        emit({"retried": op, "result": run(store, op)})
    for count in range(1_000_000):
        append_no = f"{seed}-{count}"
        roll = rng.random()
        if roll < 0.45:
            stream = rng.choice(ACCOUNTS)
            op = {
                "kind": "append",
                "append_no": append_no,
                "stream": stream,
                "expected": store.stream_version(stream),
                "events": events_for(append_no, rng.randint(1, 5), None),
            }
        elif roll < 0.93:
            streams = rng.sample(ACCOUNTS + ITEMS, rng.randint(2, 4))
            op = {
                "kind": "batch",
                "append_no": append_no,
                "events": events_for(append_no, rng.randint(len(streams), 8), streams),
            }
        else:
            op = {"kind": "compact", "append_no": append_no, "events": []}
        emit({"attempt": op})
        result = run(store, op)
        emit({"ack": append_no, "ids": [e["event_id"] for e in op["events"]], "result": result})


if __name__ == "__main__":
    main()
