"""Step traces: each event with the state before and after, going on past failing events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest

import esworkbench as esw

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def history(path: Path) -> esw.Store:
    store = esw.open_store(path)
    store.append(
        "acc-1",
        [
            esw.NewEvent("AccountOpened", {"owner": "Ann"}, recorded_at=at(0)),
            esw.NewEvent("MoneyDeposited", {"amount": Decimal("10.10")}, recorded_at=at(1)),
            esw.NewEvent("MoneyDeposited", {"amount": "ten"}, recorded_at=at(2)),  # a bad payload
            esw.NewEvent("MoneyDeposited", {"amount": Decimal("0.20")}, recorded_at=at(3)),
            esw.NewEvent("AccountFrozen", {}, recorded_at=at(4)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    return store


def _deposit(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    return {**state, "balance": state["balance"] + event.data["amount"]}


ACCOUNT = esw.Aggregate(
    "Account",
    initial={"balance": 0},
    fields={"deposits": esw.count(types="MoneyDeposited"), "owner": esw.last("owner")},
    on={"MoneyDeposited": _deposit},
    decimals=True,
)


def test_goes_on_past_a_failing_handler(tmp_path: Path) -> None:
    store = history(tmp_path)
    trace = esw.steps(store, ACCOUNT, "acc-1")
    assert isinstance(trace, esw.Steps)
    assert len(trace) == 5
    assert [s.version for s in trace] == [1, 2, 3, 4, 5]
    assert [s.error for s in trace] == [
        None,
        None,
        "TypeError: unsupported operand type(s) for +: 'decimal.Decimal' and 'str'",
        None,
        None,
    ]
    failed = trace[2]
    assert trace.failed == [failed]
    assert isinstance(failed.exception, esw.FoldError)
    assert failed.exception.version == 3
    # The state stays as it was before the failing event: the declared count did not move either.
    assert failed.before == failed.after == {"balance": Decimal("10.10"), "deposits": 1,
                                             "owner": "Ann"}  # fmt: skip
    assert failed.changes == {}
    assert trace[3].before == failed.before
    assert trace[3].changes == {
        "balance": (Decimal("10.10"), Decimal("10.30")),
        "deposits": (1, 2),
    }
    assert trace[3].changed == ("balance", "deposits")
    assert trace.state == {"balance": Decimal("10.30"), "deposits": 2, "owner": "Ann"}
    assert trace[0].changes == {"owner": (None, "Ann")}
    assert trace[4].changes == {}  # AccountFrozen: nothing takes it
    assert all(s.seconds >= 0 for s in trace)
    assert trace[1].event.event_id == store.read_stream("acc-1")["event_id"][1].as_py()
    assert trace[1].event.recorded_at == at(1)


def test_replay_raises_where_steps_go_on(tmp_path: Path) -> None:
    store = history(tmp_path)
    with pytest.raises(esw.FoldError, match="version 3") as info:
        esw.replay(store, ACCOUNT, "acc-1")
    assert "esw.steps" in str(info.value)


def test_strict_folds_record_unknown_events(tmp_path: Path) -> None:
    store = history(tmp_path)
    strict = esw.Aggregate(
        "Account",
        initial={"balance": 0},
        on={"MoneyDeposited": lambda s, e: {**s, "n": s.get("n", 0) + 1}},
        unknown="error",
    )
    trace = esw.steps(store, strict, "acc-1")
    assert [s.version for s in trace.failed] == [1, 5]
    assert "no handler for event type 'AccountOpened'" in str(trace[0].error)
    assert trace.state == {"balance": 0, "n": 3}


def test_bounds_version_and_instant(tmp_path: Path) -> None:
    store = history(tmp_path)
    assert len(esw.steps(store, ACCOUNT, "acc-1", version=2)) == 2
    assert len(esw.steps(store, ACCOUNT, "acc-1", at=at(2))) == 3  # inclusive
    assert len(esw.steps(store, ACCOUNT, "acc-1", at=at(2) - US)) == 2
    assert len(esw.steps(store, ACCOUNT, "acc-1", at="2024-03-01T07:02:00-05:00")) == 3
    with pytest.raises(esw.UnknownStreamError):
        esw.steps(store, ACCOUNT, "nobody")


def test_a_handler_changing_the_state_in_place_shows(tmp_path: Path) -> None:
    store = history(tmp_path)

    def sloppy(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
        state["seen"] = state.get("seen", 0) + 1  # mutates what it was given
        return state

    fold = esw.Aggregate("Account", initial={}, on={"MoneyDeposited": sloppy})
    trace = esw.steps(store, fold, "acc-1")
    assert trace[1].before == {}
    assert trace[1].after == {"seen": 1}
    assert trace[2].changes == {"seen": (1, 2)}


def test_frame_and_display(tmp_path: Path) -> None:
    store = history(tmp_path)
    trace = esw.steps(store, ACCOUNT, "acc-1")
    frame = trace.frame()
    assert isinstance(frame, pd.DataFrame)
    assert frame.columns.tolist() == [
        "version",
        "event_type",
        "event_id",
        "recorded_at",
        "changed",
        "before",
        "after",
        "seconds",
        "error",
    ]
    assert frame["version"].tolist() == [1, 2, 3, 4, 5]
    assert frame["changed"].tolist()[:2] == [["owner"], ["balance", "deposits"]]
    assert frame["recorded_at"].tolist()[0] == at(0)
    assert frame["error"].notna().tolist() == [False, False, True, False, False]
    assert trace.df.shape == frame.shape
    polars = trace.frame("polars")
    assert isinstance(polars, pl.DataFrame)
    assert polars["version"].to_list() == [1, 2, 3, 4, 5]
    text = str(trace)
    assert text.splitlines()[0] == "acc-1: 5 steps, 1 failed"
    assert "v3 MoneyDeposited  ERROR TypeError" in text
    assert "v2 MoneyDeposited  balance: 0 → 10.10; deposits: 0 → 1" in text
    assert repr(trace) == "<Steps 'acc-1': 5 steps, 1 failed>"
    html = trace._repr_html_()
    assert html.count("<tr>") == 6
    assert "TypeError" in html


def test_goes_on_past_a_failing_upcaster(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path)
    store.append(
        "acc-1",
        [
            esw.NewEvent("Deposited", {"amt": 1}),
            esw.NewEvent("Deposited", {"wrong": 2}),  # the upcaster raises on this one
            esw.NewEvent("Deposited", {"amt": 3}),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    upcasters = esw.Upcasters()
    upcasters.add("Deposited", 1, lambda data: ("MoneyDeposited", {"amount": data["amt"]}))
    fold = esw.Aggregate(
        "Account",
        initial={"balance": 0},
        on={"MoneyDeposited": lambda s, e: {"balance": s["balance"] + e.data["amount"]}},
        upcasters=upcasters,
    )
    trace = esw.steps(store, fold, "acc-1")
    assert [s.version for s in trace] == [1, 2, 3]
    failed = trace[1]
    assert trace.failed == [failed]
    assert failed.error == "UpcastError: KeyError: 'amt'"
    assert isinstance(failed.exception, esw.UpcastError)
    assert "version=2" in str(failed.exception)
    # Like a raising handler: the state stays as it was, and the event is shown as stored.
    assert failed.before == failed.after == {"balance": 1}
    assert failed.changes == {}
    assert (failed.event_type, failed.event.schema_version) == ("Deposited", 1)
    assert (trace[2].event_type, trace[2].event.schema_version) == ("MoneyDeposited", 2)
    assert trace[2].changes == {"balance": (1, 4)}
    assert trace.state == {"balance": 4}
    assert "v2 Deposited  ERROR UpcastError: KeyError" in str(trace)
    with pytest.raises(esw.UpcastError):  # replay itself still stops there
        esw.replay(store, fold, "acc-1")


def test_takes_a_numpy_integer_version(tmp_path: Path) -> None:
    store = history(tmp_path)
    trace = esw.steps(store, ACCOUNT, "acc-1", version=np.int64(2))  # type: ignore[arg-type]
    assert [s.version for s in trace] == [1, 2]
