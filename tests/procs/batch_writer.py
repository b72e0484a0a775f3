"""One writer of the multi-stream batch test: append_batch over its own streams, in rounds.

Usage: batch_writer.py STORE PREFIX ROUNDS START_FILE

Waits until START_FILE exists, then, ROUNDS times, appends one batch holding two events for each of
three streams PREFIX-0..2 (in two aggregate types, so one commit writes two partitions). Prints one
JSON line per acknowledged batch: {"ids": [...], "first": p, "last": q}, then {"done": true}.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import esworkbench as esw


def main() -> None:
    store_path, prefix, rounds, start_file = sys.argv[1:5]
    start = Path(start_file)
    deadline = time.monotonic() + 60
    while not start.exists():
        if time.monotonic() > deadline:
            sys.exit("the start file never appeared")
        time.sleep(0.001)
    store = esw.open_store(store_path)
    for r in range(int(rounds)):
        batch = [
            {
                "event_id": str(uuid.uuid4()),
                "event_type": "Counted",
                "aggregate_id": f"{prefix}-{s}",
                "aggregate_type": "Even" if s % 2 == 0 else "Odd",
                "data": {"round": r, "k": k},
            }
            for s in range(3)
            for k in range(2)
        ]
        result = store.append_batch(batch)
        ids = [e["event_id"] for e in batch]
        line = {"ids": ids, "first": result.first_position, "last": result.last_position}
        print(json.dumps(line), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
