"""Late events (one SQL query) and the restatements they caused (bitemporal replay)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esworkbench as esw

T0 = datetime(2024, 3, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def ledger(path: Path) -> esw.Store:
    """acc-1: deposits on days 1 and 5 recorded on time; a fee that took effect on day 3 is
    recorded on day 6 (late); a refund of day 4 recorded on day 6 as well, in the same append.
    acc-2: its only event took effect on day 2 but was recorded on day 7: late store-wide (the
    store had heard of day 5 already), not within its own stream."""
    store = esw.open_store(path)
    store.append(
        "acc-1",
        [
            esw.NewEvent("MoneyDeposited", {"amount": 100}, occurred_at=day(1), recorded_at=day(1)),
            esw.NewEvent("MoneyDeposited", {"amount": 50}, occurred_at=day(5), recorded_at=day(5)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "acc-1",
        [
            esw.NewEvent("FeeCharged", {"amount": 7}, occurred_at=day(3), recorded_at=day(6)),
            esw.NewEvent("FeeRefunded", {"amount": 2}, occurred_at=day(4), recorded_at=day(6)),
        ],
        expected_version=2,
    )
    store.append(
        "acc-2",
        [esw.NewEvent("MoneyDeposited", {"amount": 1}, occurred_at=day(2), recorded_at=day(7))],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "ord-1",
        [esw.NewEvent("OrderPlaced", {}, occurred_at=day(0), recorded_at=day(8))],
        aggregate_type="Order",
        expected_version=0,
    )
    return store


ACCOUNT = esw.Aggregate(
    "Account",
    fields={
        "deposited": esw.sum("amount", types="MoneyDeposited"),
        "fees": esw.sum("amount", types="FeeCharged"),
        "refunds": esw.sum("amount", types="FeeRefunded"),
        "events": esw.count(),
    },
)


def test_late_within_streams(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    late = esw.late_events(store)
    assert isinstance(late, pd.DataFrame)
    assert late[["aggregate_id", "version", "event_type"]].to_dict("records") == [
        {"aggregate_id": "acc-1", "version": 3, "event_type": "FeeCharged"},
        {"aggregate_id": "acc-1", "version": 4, "event_type": "FeeRefunded"},
    ]
    assert late["ahead_occurred_at"].tolist() == [day(5), day(5)]
    assert late["late_by"].tolist() == [timedelta(days=2), timedelta(days=1)]
    ids = store.read_stream("acc-1")["event_id"].to_pylist()
    assert late["ahead_event_id"].tolist() == [ids[1], ids[1]]
    assert late.columns.tolist() == [
        "position",
        "aggregate_type",
        "aggregate_id",
        "version",
        "event_type",
        "event_id",
        "occurred_at",
        "recorded_at",
        "ahead_occurred_at",
        "ahead_event_id",
        "late_by",
    ]


def test_late_store_wide(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    late = esw.late_events(store, scope="store")
    assert list(zip(late["aggregate_id"], late["version"], strict=True)) == [
        ("acc-1", 3),
        ("acc-1", 4),
        ("acc-2", 1),
        ("ord-1", 1),
    ]
    orders = esw.late_events(store, "Order", scope="store")  # still compared with every type
    assert orders["aggregate_id"].tolist() == ["ord-1"]
    assert orders["ahead_occurred_at"].tolist() == [day(5)]
    assert esw.late_events(store, "Order")["aggregate_id"].tolist() == []
    polars = esw.late_events(store, "Account", scope="store", output="polars")
    assert isinstance(polars, pl.DataFrame)
    assert polars["aggregate_id"].to_list() == ["acc-1", "acc-1", "acc-2"]


def test_same_instant_is_never_late(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path)
    store.append(
        "x",
        [
            esw.NewEvent("A", {}, occurred_at=day(5), recorded_at=day(5)),
            esw.NewEvent("B", {}, occurred_at=day(1), recorded_at=day(5)),  # known together
            esw.NewEvent("C", {}, occurred_at=day(4), recorded_at=day(5) + US),  # 1 µs later
        ],
        aggregate_type="Thing",
        expected_version=0,
    )
    late = esw.late_events(store, "Thing")
    assert late["event_type"].tolist() == ["C"]
    assert late["late_by"].tolist() == [timedelta(days=1)]


def test_scope_is_checked(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    with pytest.raises(esw.EsWorkbenchError, match="scope='world'") as info:
        esw.late_events(store, scope="world")  # type: ignore[arg-type]
    assert "Hint:" in str(info.value)


def test_restatement_hand_checked(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    restated = esw.restatement(store, ACCOUNT, "acc-1")
    assert restated["version"].tolist() == [3, 4]
    assert restated["valid_at"].tolist() == [day(3), day(4)]
    # Valid on day 3, as known on day 6 - 1 µs: only the day-1 deposit; once the fee and the
    # refund were recorded (same instant), the fee counts, the day-4 refund not yet.
    assert restated["changes"].tolist()[0] == {"fees": (0, 7), "events": (1, 2)}
    assert restated["changes"].tolist()[1] == {"fees": (0, 7), "refunds": (0, 2), "events": (1, 3)}
    assert restated["recorded_at"].tolist() == [day(6), day(6)]


def test_restatement_is_bitemporal_replay(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    restated = esw.restatement(store, ACCOUNT, "acc-1")
    for row in restated.itertuples():
        known = row.recorded_at.to_pydatetime()
        valid = row.valid_at.to_pydatetime()
        assert row.before == esw.replay(
            store, ACCOUNT, "acc-1", valid_at=valid, known_at=known - US
        )
        assert row.after == esw.replay(store, ACCOUNT, "acc-1", valid_at=valid, known_at=known)
    late = esw.late_events(store, "Account")
    assert (
        restated["event_id"].tolist() == late[late["aggregate_id"] == "acc-1"]["event_id"].tolist()
    )


def test_restatement_of_one_valid_instant(tmp_path: Path) -> None:
    store = ledger(tmp_path)
    # The state valid on day 4.5 was restated by the fee and by the refund (both recorded later).
    restated = esw.restatement(store, ACCOUNT, "acc-1", at=day(4.5))
    assert restated["event_type"].tolist() == ["FeeCharged", "FeeRefunded"]
    assert restated["valid_at"].tolist() == [day(4.5), day(4.5)]
    assert restated["after"].tolist()[-1] == esw.replay(
        store, ACCOUNT, "acc-1", valid_at=day(4.5), known_at=day(6)
    )
    # Valid 1 µs before day 1, nothing had taken effect yet: nothing to restate.
    assert esw.restatement(store, ACCOUNT, "acc-1", at=day(1) - US).empty
    none = esw.restatement(store, ACCOUNT, "acc-2")
    assert none.empty
    assert none.columns.tolist()[:3] == ["version", "event_type", "event_id"]


# -- properties: the SQL query and the restatements against their definitions -----------------

moments = st.integers(0, 6).map(lambda n: T0 + timedelta(hours=n))
histories = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 9), moments, moments),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=int(os.environ.get("ESW_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories)
def test_late_events_and_restatements_follow_their_definitions(
    tmp_path_factory: pytest.TempPathFactory,
    history: list[tuple[str, int, datetime, datetime]],
) -> None:
    store = esw.open_store(tmp_path_factory.mktemp("store"))
    store.append_batch(
        [
            {
                "aggregate_id": stream,
                "aggregate_type": "Account",
                "event_type": "MoneyDeposited",
                "data": {"amount": amount},
                "occurred_at": occurred,
                "recorded_at": recorded,
            }
            for stream, amount, occurred, recorded in history
        ]
    )
    rows = store.sql(
        "select aggregate_id, version, occurred_at, recorded_at from events order by position"
    ).fetchall()

    def late(same_stream: bool) -> set[tuple[str, int]]:
        return {
            (s, v)
            for s, v, o, r in rows
            if any(r2 < r and o2 > o and (s2 == s or not same_stream) for s2, _, o2, r2 in rows)
        }

    found = esw.late_events(store)
    assert set(zip(found["aggregate_id"], found["version"], strict=True)) == late(True)
    wide = esw.late_events(store, scope="store")
    assert set(zip(wide["aggregate_id"], wide["version"], strict=True)) == late(False)

    fold = esw.Aggregate("Account", fields={"total": esw.sum("amount"), "n": esw.count()})
    for stream in sorted({h[0] for h in history}):
        restated = esw.restatement(store, fold, stream)
        assert set(restated["version"]) == {v for s, v in late(True) if s == stream}
        for row in restated.itertuples():
            known = row.recorded_at.to_pydatetime()
            valid = row.valid_at.to_pydatetime()
            before = esw.replay(store, fold, stream, valid_at=valid, known_at=known - US)
            after = esw.replay(store, fold, stream, valid_at=valid, known_at=known)
            assert (row.before, row.after) == (before, after)
            assert row.changes == {
                k: (before[k], after[k]) for k in before if before[k] != after[k]
            }
