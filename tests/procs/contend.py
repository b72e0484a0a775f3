"""One writer of the same-stream test: read the head, append one event, retry on a conflict.

Usage: contend.py STORE STREAM COUNT START_FILE WRITER

Waits until START_FILE exists (so that every writer starts at once), then appends COUNT events to
STREAM, one per call, each with expected_version set to the version it just read. On a
ConcurrencyError it reads the head again and retries with the same event. Prints one JSON line per
acknowledged event ({"ack": event_id, "version": v}) as soon as append returns, and a last line
{"conflicts": n, "done": true}.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import esworkbench as esw


def main() -> None:
    store_path, stream, count, start_file, writer = sys.argv[1:6]
    start = Path(start_file)
    deadline = time.monotonic() + 60
    while not start.exists():
        if time.monotonic() > deadline:
            sys.exit("the start file never appeared")
        time.sleep(0.001)
    store = esw.open_store(store_path)
    conflicts = 0
    for i in range(int(count)):
        event = {
            "event_id": str(uuid.uuid4()),
            "event_type": "Ticked",
            "data": {"writer": writer, "i": i},
        }
        while True:
            head = store.stream_version(stream)
            try:
                version = store.append(
                    stream, [event], aggregate_type="Counter", expected_version=head
                )
            except esw.ConcurrencyError:
                conflicts += 1
                continue
            break
        print(json.dumps({"ack": event["event_id"], "version": version}), flush=True)
    print(json.dumps({"conflicts": conflicts, "done": True}), flush=True)


if __name__ == "__main__":
    main()
