"""Appends events with instants given in many ways, then reports what every reader sees.

Usage: tz_roundtrip.py STORE CASES_JSON   (run with TZ set to some zone other than UTC)

Each case [how, text, zone, fold] becomes one event in its own stream e<i>: recorded_at is the
instant, occurred_at the instant one hour earlier. ``how`` is "aware" (datetime with ZoneInfo and
fold), "iso" (ISO text with an offset, in the camelCase shape), "naive" (naive datetime, zone named
with tz=), "arrow" (Arrow column of that zone) or "arrow_naive" (naive Arrow column and tz=).
Prints one JSON object: the local UTC offset in January, and for each event the instants as
integer microseconds (read_stream and SQL), as SQL text, as Python datetimes, and the number of
rows seen with until= at the instant (written in a third zone), 1 us before, and 1 us after.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa

import esworkbench as esw

HOUR = timedelta(hours=1)


def instant(text: str, zone: str | None, fold: int) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=ZoneInfo(zone), fold=fold) if zone else value


def append(store: esw.Store, stream: str, case: list[Any]) -> None:
    how, text, zone, fold = case
    if how == "iso":
        at = datetime.fromisoformat(text)
        event = {
            "eventType": "Timed",
            "data": {},
            "timestamp": text,
            "occurredAt": (at - HOUR).isoformat(),
        }
        store.append(stream, [event], aggregate_type="Clock", expected_version=0)
    elif how in ("aware", "naive"):
        at = instant(text, zone if how == "aware" else None, fold)
        event = {"event_type": "Timed", "data": {}, "recorded_at": at}
        # Subtract in UTC: wall-clock arithmetic on aware datetimes ignores DST changes.
        before = (at.astimezone(UTC) - HOUR).astimezone(at.tzinfo) if how == "aware" else at - HOUR
        event["occurred_at"] = before
        tz = zone if how == "naive" else None
        store.append(stream, [event], aggregate_type="Clock", expected_version=0, tz=tz)
    else:
        naive = how == "arrow_naive"
        at = instant(text, None if naive else zone, fold)
        earlier = at - HOUR if naive else (at.astimezone(UTC) - HOUR).astimezone(at.tzinfo)
        kind = pa.timestamp("us") if naive else pa.timestamp("us", zone)
        table = pa.table(
            {
                "event_type": ["Timed"],
                "aggregate_type": ["Clock"],
                "aggregate_id": [stream],
                "data": ["{}"],
                "recorded_at": pa.array([at], kind),
                "occurred_at": pa.array([earlier], kind),
            }
        )
        store.append_batch(table, tz=zone if naive else None)


def main() -> None:
    store = esw.open_store(sys.argv[1])
    cases = json.loads(sys.argv[2])
    for i, case in enumerate(cases):
        append(store, f"e{i}", case)
    elsewhere = ZoneInfo("Pacific/Chatham")
    report: dict[str, Any] = {
        "local_offset_hours": -time.timezone / 3600,
        "events": [],
    }
    for i in range(len(cases)):
        stream = f"e{i}"
        table = store.read_stream(stream)
        recorded = table.column("recorded_at").to_pylist()[0]
        micros = [
            table.column(c).cast(pa.int64()).to_pylist()[0] for c in ("recorded_at", "occurred_at")
        ]
        sql = store.sql(
            "select epoch_us(recorded_at), epoch_us(occurred_at),"
            " strftime(recorded_at, '%Y-%m-%d %H:%M:%S.%f'), recorded_at, occurred_at"
            " from events where aggregate_id = ?",
            [stream],
        ).fetchall()[0]
        bound = recorded.astimezone(elsewhere)
        tick = timedelta(microseconds=1)
        hits = store.sql(
            "select count(*) from events where recorded_at = ? and aggregate_id = ?",
            [bound, stream],
        ).fetchall()[0][0]
        report["events"].append(
            {
                "read_stream": micros,
                "sql_epoch_us": [sql[0], sql[1]],
                "sql_text": sql[2],
                "python": [sql[3].astimezone(UTC).isoformat(), sql[4].astimezone(UTC).isoformat()],
                "python_read_stream": recorded.isoformat(),
                "until": [
                    store.read_stream(stream, until=bound).num_rows,
                    store.read_stream(stream, until=bound - tick).num_rows,
                    store.read_stream(stream, until=bound + tick).num_rows,
                ],
                "sql_param_hits": hits,
            }
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
