"""Laws of the store, checked with Hypothesis on fresh stores, and time zones in other processes.

(a) Whatever is appended reads back the same through read_stream, read_all and SQL, in append order.
(b) Compaction changes nothing a reader sees.
(c) An exact retry of an append is a no-op that answers as the first call did.
Then: instants survive a process whose local zone is not UTC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import esworkbench as esw

PROCS = Path(__file__).parent / "procs"
Rows = list[dict[str, Any]]
Audit = Callable[[Path], Rows]

# audit_store is a plain function with no state, so sharing it across examples is safe.
PROPERTY = settings(
    max_examples=int(os.environ.get("ESW_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ----------------------------------------------------------------------------

# Text as Python can hold it in UTF-8: no lone surrogates, and no NUL where the store refuses one.
no_nul = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=12
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
PROMOTED_KEYS = {
    "correlationId",
    "correlation_id",
    "causationId",
    "causation_id",
    "userId",
    "user_id",
}
metadatas = st.none() | st.builds(
    lambda rest, correlation, user: {
        **rest,
        **({"correlationId": correlation} if correlation else {}),
        **({"user_id": user} if user else {}),
    },
    st.dictionaries(
        st.text(max_size=6).filter(lambda k: k not in PROMOTED_KEYS), json_values, max_size=3
    ),
    st.none() | no_nul,
    st.none() | no_nul,
)
aggregate_types = (
    st.sampled_from(
        ["Account", "../x", "a/b", "%2F", "ünï", "x" * 300, "é" * 300, "..", "a=b", "C:\\t", " sp "]
    )
    | no_nul
)
instants = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.timezones()
)


@st.composite
def new_events(draw: st.DrawFn) -> dict[str, Any]:
    camel = draw(st.booleans())
    event: dict[str, Any] = {
        "eventType" if camel else "event_type": draw(no_nul),
        "data": draw(payloads),
    }
    if draw(st.booleans()):
        event["eventId" if camel else "event_id"] = str(draw(st.uuids(version=4)))
    if (metadata := draw(metadatas)) is not None:
        event["metadata"] = metadata
    if draw(st.booleans()):
        event["occurredAt" if camel else "occurred_at"] = draw(instants)
    if draw(st.booleans()):
        event["schema_version"] = draw(st.integers(1, 5))
    return event


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """Streams (aggregate_id, aggregate_type) and calls: single appends and batches of 1-5."""
    streams = draw(
        st.lists(
            st.tuples(no_nul, aggregate_types), min_size=1, max_size=4, unique_by=lambda s: s[0]
        )
    )
    seen: set[str] = set()
    calls: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["append", "batch", "arrow"]))
        if how == "append":
            events = draw(st.lists(new_events(), min_size=1, max_size=5))
            placed = [(draw(st.sampled_from(streams)), None)]
            placed = [(placed[0][0], e) for e in events]
        else:
            placed = draw(
                st.lists(st.tuples(st.sampled_from(streams), new_events()), min_size=1, max_size=5)
            )
        for _, event in placed:
            # Hypothesis likes to repeat values; a repeated id is a different law (see (c)).
            for key in ("event_id", "eventId"):
                if key in event and event[key] in seen:
                    del event[key]
                elif key in event:
                    seen.add(event[key])
        calls.append((how, placed))
    return streams, calls


# -- a model of what the store should hold -------------------------------------------------


def get(event: dict[str, Any], snake: str, camel: str) -> Any:
    return event.get(snake, event.get(camel))


def apply(store: esw.Store, calls: list[tuple[Any, ...]]) -> Rows:
    """Makes the calls and returns the rows they should have stored, in append order."""
    heads: dict[str, int] = {}
    expected: Rows = []
    for how, placed in calls:
        before = datetime.now(UTC)
        if how == "append":
            (aggregate_id, aggregate_type), _ = placed[0]
            version = store.append(
                aggregate_id,
                [e for _, e in placed],
                aggregate_type=aggregate_type,
                expected_version=heads.get(aggregate_id, 0),
            )
            assert version == heads.get(aggregate_id, 0) + len(placed)
        elif how == "batch":
            events = [{**e, "aggregateId": s[0], "aggregateType": s[1]} for s, e in placed]
            result = store.append_batch(events)
            assert result.events == len(placed)
        else:
            result = store.append_batch(arrow_batch(placed))
            assert result.events == len(placed)
        after = datetime.now(UTC)
        for (aggregate_id, aggregate_type), event in placed:
            heads[aggregate_id] = heads.get(aggregate_id, 0) + 1
            metadata = event.get("metadata")
            occurred = get(event, "occurred_at", "occurredAt")
            expected.append(
                {
                    "event_id": get(event, "event_id", "eventId"),
                    "event_type": get(event, "event_type", "eventType"),
                    "aggregate_type": aggregate_type,
                    "aggregate_id": aggregate_id,
                    "version": heads[aggregate_id],
                    "recorded_at": (before, after),
                    "occurred_at": None if occurred is None else occurred.astimezone(UTC),
                    "schema_version": event.get("schema_version", 1),
                    "data": event["data"],
                    "metadata": metadata,
                    "correlation_id": (metadata or {}).get("correlationId"),
                    "user_id": (metadata or {}).get("user_id"),
                }
            )
    return expected


def arrow_batch(placed: list[tuple[tuple[str, str], dict[str, Any]]]) -> pa.Table:
    events = [e for _, e in placed]
    metadata = [e.get("metadata") for e in events]
    return pa.table(
        {
            "event_id": [get(e, "event_id", "eventId") for e in events],
            "event_type": [get(e, "event_type", "eventType") for e in events],
            "aggregate_type": [s[1] for s, _ in placed],
            "aggregate_id": [s[0] for s, _ in placed],
            "data": [json.dumps(e["data"], ensure_ascii=False) for e in events],
            "metadata": [
                None if m is None else json.dumps(m, ensure_ascii=False) for m in metadata
            ],
            "occurred_at": pa.array(
                [get(e, "occurred_at", "occurredAt") for e in events], pa.timestamp("us", "UTC")
            ),
            "schema_version": pa.array([e.get("schema_version", 1) for e in events], pa.int32()),
        }
    )


def assert_matches(rows: Rows, expected: Rows) -> None:
    """Stored rows (in position order) against the model (in append order)."""
    assert len(rows) == len(expected)
    positions = [r["position"] for r in rows]
    assert positions == sorted(set(positions)), "positions do not increase in append order"
    for row, want in zip(rows, expected, strict=True):
        low, high = want["recorded_at"]
        # Microseconds are kept, so the stored instant lies within the call, give or take 1 us.
        assert low - timedelta(microseconds=1) <= row["recorded_at"] <= high
        assert row["occurred_at"] == (want["occurred_at"] or row["recorded_at"])
        if want["event_id"] is not None:
            assert row["event_id"] == want["event_id"]
        assert json.loads(row["data"]) == want["data"]
        assert (None if row["metadata"] is None else json.loads(row["metadata"])) == want[
            "metadata"
        ]
        for name in ("event_type", "aggregate_type", "aggregate_id", "version", "schema_version"):
            assert row[name] == want[name], name
        assert row["correlation_id"] == want["correlation_id"]
        assert row["user_id"] == want["user_id"]


# -- (a) what goes in comes out ------------------------------------------------------------


# Stream ids beyond U+1FFFF lost their stats in the Delta log (see the test after this one).
BEYOND_BMP = (
    [("\U00020000", "Account")],
    [("append", [(("\U00020000", "Account"), {"event_type": "E", "data": {}})])],
)


@PROPERTY
@given(history=histories())
@example(history=BEYOND_BMP)
def test_appends_read_back_identical_through_every_reader(history: Any, audit_store: Audit) -> None:
    streams, calls = history
    with tempfile.TemporaryDirectory() as tmp:
        store = esw.open_store(Path(tmp) / "s")
        expected = apply(store, calls)
        rows = audit_store(store.path)  # read_all == SQL == read_stream; versions, positions
        assert_matches(rows, expected)
        for aggregate_id, _ in streams:
            mine = [r for r in rows if r["aggregate_id"] == aggregate_id]
            assert store.read_stream(aggregate_id).to_pylist() == mine
            by_sql = store.sql(
                "select * from events where aggregate_id = ? order by version", [aggregate_id]
            ).to_arrow_table()
            assert by_sql.to_pylist() == mine
            assert store.stream_version(aggregate_id) == len(mine)
        store.close()


def test_a_stream_id_beyond_u_1ffff_keeps_its_head(tmp_path: Path) -> None:
    """Regression: file stats were written as JSON with \\ud840\\udc00 escapes, which the Delta
    reader decodes to another character (U+20000 came back as U+10000). A file's aggregate_id max
    then came out too low and the file was pruned from stream reads: read_stream was empty, the
    head read 0, and a second expected_version=0 append stored version 1 twice. A stream whose own
    id decodes fine (U+15000) was lost too when it shared a file with such an id."""
    high, middle = "\U00020000", "\U00015000"  # 𠀀 (CJK Extension B) and a Tangut-range id
    first = esw.open_store(tmp_path / "s")
    first.append(
        high, [{"event_type": "Opened", "data": {}}], aggregate_type="A", expected_version=0
    )
    first.append_batch(
        [
            {"event_type": "Opened", "data": {}, "aggregate_id": s, "aggregate_type": "A"}
            for s in ("a", middle, high)
        ]
    )
    store = esw.open_store(tmp_path / "s")
    assert [store.read_stream(s).num_rows for s in ("a", middle, high)] == [1, 1, 2]
    assert store.stream_version(high) == 2
    with pytest.raises(esw.ConcurrencyError):
        store.append(high, [{"event_type": "Opened", "data": {}}], expected_version=0)


def test_text_that_utf8_cannot_hold_is_an_invalid_event(tmp_path: Path) -> None:
    """A lone surrogate (as os.fsdecode makes of undecodable bytes) is refused with the store's own
    error, naming the field, not with pyarrow's UnicodeEncodeError."""
    store = esw.open_store(tmp_path / "s")
    with pytest.raises(esw.InvalidEventError, match="event_type"):
        store.append("a", [{"event_type": "Bad\udcff", "data": {}}], aggregate_type="Account")


# -- (b) compaction is invisible -----------------------------------------------------------


@PROPERTY
@given(history=histories())
def test_compaction_changes_nothing_a_reader_sees(history: Any, audit_store: Audit) -> None:
    streams, calls = history
    with tempfile.TemporaryDirectory() as tmp:
        store = esw.open_store(Path(tmp) / "s")
        apply(store, calls)
        stale = esw.open_store(store.path)  # a second handle that last looked before compaction
        rows = audit_store(store.path)
        before = {s: store.read_stream(s).to_pylist() for s, _ in streams}
        store.compact()
        assert audit_store(store.path) == rows
        assert [r for b in stale.read_all() for r in b.to_pylist()] == rows
        assert {s: store.read_stream(s).to_pylist() for s, _ in streams} == before
        kinds = {r["aggregate_type"] for r in rows}
        assert len(DeltaTable(str(store.path / "events")).file_uris()) == len(kinds)
        # Appends go on after compaction: the next version and the next position.
        aggregate_id, kind = streams[0]
        head = store.stream_version(aggregate_id)
        after = [{"event_type": "After", "data": {}}]
        store.append(aggregate_id, after, aggregate_type=kind, expected_version=head)
        last = store.read_stream(aggregate_id, from_version=head + 1).to_pylist()
        assert [(r["version"], r["position"]) for r in last] == [(head + 1, len(rows) + 1)]
        store.close()
        stale.close()


# -- (c) an exact retry is a no-op ----------------------------------------------------------


@PROPERTY
@given(
    history=histories(),
    retried=st.lists(new_events(), min_size=1, max_size=5),
    later=st.integers(0, 2),
    batch=st.booleans(),
)
def test_an_exact_retry_is_a_no_op_answering_as_the_first_call(
    history: Any, retried: list[dict[str, Any]], later: int, batch: bool, audit_store: Audit
) -> None:
    streams, calls = history
    for event in retried:  # the retried events carry their own ids, distinct from the history
        for key in ("event_id", "eventId"):
            event.pop(key, None)
        event["event_id"] = str(__import__("uuid").uuid4())
    with tempfile.TemporaryDirectory() as tmp:
        store = esw.open_store(Path(tmp) / "s")
        apply(store, calls)
        aggregate_id, aggregate_type = streams[-1]
        head = store.stream_version(aggregate_id)
        if batch:
            events = [
                {**e, "aggregate_id": aggregate_id, "aggregate_type": aggregate_type}
                for e in retried
            ]
            first: Any = store.append_batch(events)
        else:
            first = store.append(
                aggregate_id, retried, aggregate_type=aggregate_type, expected_version=head
            )
            assert first == head + len(retried)
        for n in range(later):  # the stream moves on before the retry arrives
            store.append(aggregate_id, [{"event_type": f"Later{n}", "data": {}}])
        rows = audit_store(store.path)
        again = (
            store.append_batch(events)
            if batch
            else store.append(
                aggregate_id, retried, aggregate_type=aggregate_type, expected_version=head
            )
        )
        assert again == first
        assert audit_store(store.path) == rows
        # The same ids anywhere else are refused, and refusing them changes nothing.
        with pytest.raises(esw.DuplicateEventError):
            store.append(f"{aggregate_id}-other", retried, aggregate_type=aggregate_type)
        assert audit_store(store.path) == rows
        store.close()


# -- instants in a process whose local zone is not UTC ---------------------------------------

# (how the instant is handed in, its text, its zone, fold) -> the UTC instant that must be stored
TZ_CASES = [
    ("aware", "2024-03-10T01:59:59.999999", "America/New_York", 0, "2024-03-10T06:59:59.999999"),
    ("aware", "2024-11-03T01:30:00", "America/New_York", 1, "2024-11-03T06:30:00"),
    ("aware", "2024-11-03T01:30:00", "America/New_York", 0, "2024-11-03T05:30:00"),
    ("aware", "2024-06-01T00:00:00", "Asia/Kolkata", 0, "2024-05-31T18:30:00"),
    ("aware", "2024-01-01T00:00:00", "Asia/Kathmandu", 0, "2023-12-31T18:15:00"),
    ("aware", "2024-04-07T01:45:00", "Australia/Lord_Howe", 1, "2024-04-06T15:15:00"),
    ("aware", "1969-12-31T23:59:59.5", "UTC", 0, "1969-12-31T23:59:59.500000"),
    ("iso", "2024-07-04T12:00:00-04:00", None, 0, "2024-07-04T16:00:00"),
    ("iso", "2024-07-04T12:00:00Z", None, 0, "2024-07-04T12:00:00"),
    ("iso", "2024-12-24T23:30:00+05:30", None, 0, "2024-12-24T18:00:00"),
    ("naive", "2024-01-15T09:00:00", "America/New_York", 0, "2024-01-15T14:00:00"),
    ("naive", "2024-07-15T09:00:00", "America/New_York", 0, "2024-07-15T13:00:00"),
    ("naive", "2024-07-15T09:00:00", "Asia/Kolkata", 0, "2024-07-15T03:30:00"),
    ("arrow", "2024-07-15T09:00:00", "Asia/Kolkata", 0, "2024-07-15T03:30:00"),
    ("arrow", "2024-01-15T09:00:00", "America/New_York", 0, "2024-01-15T14:00:00"),
    ("arrow_naive", "2024-07-15T09:00:00", "Europe/Berlin", 0, "2024-07-15T07:00:00"),
    ("arrow_naive", "2024-01-15T09:00:00", "America/New_York", 0, "2024-01-15T14:00:00"),
]


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata"])
def test_instants_survive_a_process_in_another_local_zone(tmp_path: Path, zone: str) -> None:
    cases = [list(c[:4]) for c in TZ_CASES]
    env = {**os.environ, "TZ": zone}
    done = subprocess.run(
        [sys.executable, str(PROCS / "tz_roundtrip.py"), str(tmp_path / "s"), json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["local_offset_hours"] == {"America/New_York": -5.0, "Asia/Kolkata": 5.5}[zone]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for i, case in enumerate(TZ_CASES):
        want = datetime.fromisoformat(case[4]).replace(tzinfo=UTC)
        micros = (want - epoch) // timedelta(microseconds=1)
        # recorded_at is the instant itself, occurred_at the same instant one hour earlier.
        got = report["events"][i]
        assert got["read_stream"] == [micros, micros - 3_600_000_000], case
        assert got["sql_epoch_us"] == [micros, micros - 3_600_000_000], case
        assert got["sql_text"] == want.strftime("%Y-%m-%d %H:%M:%S.%f"), case
        assert got["python"] == [want.isoformat(), (want - timedelta(hours=1)).isoformat()], case
        assert got["until"] == [1, 0, 1], case
        assert got["sql_param_hits"] == 1, case


def test_naive_arrow_timestamps_resolve_a_named_zone_like_dicts_do(tmp_path: Path) -> None:
    """tz= names the zone of naive instants; an Arrow batch and dicts must agree on what it means,
    also for a wall time that occurs twice (the first one, as datetime's fold=0 does) and one that
    never occurs (the store's own error, or the dicts' answer)."""
    store = esw.open_store(tmp_path / "s")
    for n, naive in enumerate([datetime(2024, 11, 3, 1, 30), datetime(2024, 3, 10, 2, 30)]):
        store.append_batch(
            [
                {
                    "event_type": "T",
                    "aggregate_type": "C",
                    "aggregate_id": f"d{n}",
                    "data": {},
                    "occurred_at": naive,
                }
            ],
            tz="America/New_York",
        )
        by_dict = store.read_stream(f"d{n}")["occurred_at"].to_pylist()
        batch = pa.table(
            {
                "event_type": ["T"],
                "aggregate_type": ["C"],
                "aggregate_id": [f"a{n}"],
                "data": ["{}"],
                "occurred_at": pa.array([naive], pa.timestamp("us")),
            }
        )
        try:
            store.append_batch(batch, tz="America/New_York")
        except esw.InvalidEventError:
            assert n == 1, "a wall time that occurs twice is refused from Arrow but not from dicts"
            continue
        assert store.read_stream(f"a{n}")["occurred_at"].to_pylist() == by_dict


def test_an_unknown_zone_for_an_arrow_batch_is_an_invalid_event(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    batch = pa.table(
        {
            "event_type": ["T"],
            "aggregate_type": ["C"],
            "aggregate_id": ["a"],
            "data": ["{}"],
            "occurred_at": pa.array([datetime(2024, 1, 1)], pa.timestamp("us")),
        }
    )
    with pytest.raises(esw.InvalidEventError, match="Mars/Olympus"):
        store.append_batch(batch, tz="Mars/Olympus")
    with pytest.raises(esw.InvalidEventError, match="Mars/Olympus"):
        store.append_batch([{**batch.to_pylist()[0], "data": {}}], tz="Mars/Olympus")
