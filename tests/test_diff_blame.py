"""Diffs between two points of a stream or of a population, and blame per field."""

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


def bank(path: Path) -> esw.Store:
    """acc-1 from minute 0 to 30; acc-2 opened at 5, closed at 15; acc-3 opened at 40."""
    store = esw.open_store(path)
    store.append(
        "acc-1",
        [
            esw.NewEvent(
                "AccountOpened", {"owner": "Ann", "limit": 100}, recorded_at=at(0), user_id="u-1"
            ),
            esw.NewEvent(
                "MoneyDeposited",
                {"amount": Decimal("100.10")},
                recorded_at=at(10),
                user_id="u-2",
                correlation_id="c-1",
            ),
            esw.NewEvent("LimitChanged", {"limit": 100}, recorded_at=at(20), user_id="u-3"),
            esw.NewEvent(
                "MoneyWithdrawn", {"amount": Decimal("0.10")}, recorded_at=at(30), user_id="u-4"
            ),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "acc-2",
        [
            esw.NewEvent("AccountOpened", {"owner": "Bo", "limit": 5}, recorded_at=at(5)),
            esw.NewEvent("AccountClosed", {}, recorded_at=at(15)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "acc-3",
        [esw.NewEvent("AccountOpened", {"owner": "Cy", "limit": 1}, recorded_at=at(40))],
        aggregate_type="Account",
        expected_version=0,
    )
    return store


def _move(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    sign = -1 if event.event_type == "MoneyWithdrawn" else 1
    return {**state, "balance": state["balance"] + sign * event.data["amount"]}


ACCOUNT = esw.Aggregate(
    "Account",
    initial={"balance": 0},
    fields={
        "owner": esw.last("owner"),
        "limit": esw.last("limit"),
        "status": esw.status({"AccountOpened": "open", "AccountClosed": "closed"}),
    },
    on={"MoneyDeposited": _move, "MoneyWithdrawn": _move},
    decimals=True,
)
DECLARED = esw.Aggregate(
    "Account",
    fields={
        "owner": esw.last("owner"),
        "limit": esw.last("limit"),
        "status": esw.status({"AccountOpened": "open", "AccountClosed": "closed"}),
        "events": esw.count(),
    },
)


# -- one stream ------------------------------------------------------------------------------


def test_diff_between_versions(tmp_path: Path) -> None:
    store = bank(tmp_path)
    change = esw.diff(store, ACCOUNT, "acc-1", before=1, after=4)
    assert change.changes == {"balance": (0, Decimal("100.00"))}
    assert (change.before, change.after, change.before_version, change.after_version) == (
        1,
        4,
        1,
        4,
    )
    assert str(change) == "acc-1: version 1 → version 4\n  balance: 0 → 100.00"
    frame = change.frame()
    assert isinstance(frame, pd.DataFrame)
    assert frame.to_dict("records") == [
        {"field": "balance", "before": 0, "after": Decimal("100.00")}
    ]
    assert change.df.equals(frame)
    assert isinstance(change.frame("polars"), pl.DataFrame)
    nothing = esw.diff(store, ACCOUNT, "acc-1", before=2, after=3)  # limit 100 → 100
    assert nothing.changes == {}
    assert str(nothing).endswith("no field changed")


def test_diff_from_nothing(tmp_path: Path) -> None:
    store = bank(tmp_path)
    change = esw.diff(store, ACCOUNT, "acc-1", before=0, after=1)
    assert change.before_version == 0
    assert change.changes == {
        "owner": (None, "Ann"),
        "limit": (None, 100),
        "status": (None, "open"),
    }


def test_diff_between_instants_is_inclusive(tmp_path: Path) -> None:
    store = bank(tmp_path)
    exactly = esw.diff(store, ACCOUNT, "acc-1", before=at(10) - US, after=at(10))
    assert (exactly.before_version, exactly.after_version) == (1, 2)
    assert exactly.changes == {"balance": (0, Decimal("100.10"))}
    assert exactly.before == at(10) - US
    text = esw.diff(store, ACCOUNT, "acc-1", before="2024-03-01T07:10:00-05:00", after=4)
    assert text.before == at(10)  # ISO text with an offset, kept in UTC
    assert text.changes == {"balance": (Decimal("100.10"), Decimal("100.00"))}
    assert "2024-03-01T12:10:00+00:00 (version 2) → version 4" in str(text)


def test_diff_of_whole_states(tmp_path: Path) -> None:
    store = bank(tmp_path)
    counter = esw.Aggregate("Account", initial=0, on={"MoneyDeposited": lambda n, e: n + 1})
    change = esw.diff(store, counter, "acc-1", before=1, after=4)
    assert change.changes == {"state": (0, 1)}


def test_diff_html_escapes(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path)
    store.append(
        "x",
        [esw.NewEvent("Named", {"name": "a"}), esw.NewEvent("Named", {"name": "<b>&"})],
        aggregate_type="Thing",
        expected_version=0,
    )
    html = esw.diff(store, esw.generic("Thing"), "x", before=1, after=2)._repr_html_()
    assert "&lt;b&gt;&amp;" in html
    assert "<b>" not in html
    assert "<th>field</th>" in html


def test_versions_may_be_numpy_integers(tmp_path: Path) -> None:
    # Versions often come out of a frame (timeline, as_of) as numpy integers.
    store = bank(tmp_path)
    change = esw.diff(store, ACCOUNT, "acc-1", before=np.int64(1), after=np.int32(4))  # type: ignore[arg-type]
    assert change == esw.diff(store, ACCOUNT, "acc-1", before=1, after=4)
    assert type(change.before) is int
    version = esw.timeline(store, ACCOUNT, "acc-1")["version"].iloc[1]
    assert isinstance(version, np.integer)
    assert esw.diff(store, ACCOUNT, "acc-1", before=0, after=version).after == 2
    blamed = esw.blame(store, ACCOUNT, "acc-1", version=version)
    assert blamed.equals(esw.blame(store, ACCOUNT, "acc-1", version=2))
    assert esw.replay(store, ACCOUNT, "acc-1", version=version) == esw.replay(
        store, ACCOUNT, "acc-1", version=2
    )
    with pytest.raises(esw.EsWorkbenchError, match="non-negative integer"):
        esw.replay(store, ACCOUNT, "acc-1", version=np.int64(-1))  # type: ignore[arg-type]


@pytest.mark.parametrize("point", [True, np.bool_(True), 1.5, np.float64(1.0), None, [1]])
def test_diff_refuses_odd_points(tmp_path: Path, point: object) -> None:
    store = bank(tmp_path)
    with pytest.raises(esw.EsWorkbenchError, match="neither a version nor an instant") as info:
        esw.diff(store, ACCOUNT, "acc-1", before=point, after=2)  # type: ignore[arg-type]
    assert "Hint:" in str(info.value)
    with pytest.raises(esw.EsWorkbenchError, match="naive"):
        esw.diff(store, ACCOUNT, "acc-1", before=1, after=datetime(2024, 3, 1))
    with pytest.raises(esw.UnknownStreamError):
        esw.diff(store, ACCOUNT, "nobody", before=1, after=2)


# -- a population ----------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [ACCOUNT, DECLARED], ids=["python", "sql"])
def test_population_diff_hand_checked(tmp_path: Path, fold: esw.Aggregate) -> None:
    store = bank(tmp_path)
    # Between minute 5 and 30: acc-1 changes (balance, limit unchanged), acc-2 closes.
    result = esw.population_diff(store, fold, before=at(5), after=at(30))
    assert (result.appeared, result.changed, result.unchanged) == (0, 2, 0)
    if fold is ACCOUNT:
        assert result.fields == {"balance": 1, "status": 1}
    else:
        assert result.fields == {"events": 2, "status": 1}
    # Exactly at and 1 µs before an event.
    assert esw.population_diff(store, fold, before=at(5) - US, after=at(5)).appeared == 1
    assert esw.population_diff(store, fold, before=at(5), after=at(10) - US).changed == 0
    later = esw.population_diff(store, fold, before=at(15), after=at(40))
    assert (later.appeared, later.changed, later.unchanged) == (1, 1, 1)
    assert later.streams == (
        ("acc-1", "changed", ("balance",) if fold is ACCOUNT else ("events",)),
        ("acc-3", "appeared", ()),
    )
    frame = later.frame()
    assert frame["aggregate_id"].tolist() == ["acc-1", "acc-3"]
    assert frame["change"].tolist() == ["changed", "appeared"]
    assert "1 appeared, 1 changed, 1 unchanged" in str(later)
    assert "<caption>" in later._repr_html_()


def test_population_diff_agrees_with_as_of(tmp_path: Path) -> None:
    store = bank(tmp_path)
    for before, after in [(at(0), at(40)), (at(12), at(17)), (at(30), at(30))]:
        result = esw.population_diff(store, DECLARED, before=before, after=after)
        old = esw.as_of(store, DECLARED, at=before).set_index("aggregate_id")
        new = esw.as_of(store, DECLARED, at=after).set_index("aggregate_id")
        fields = ["owner", "limit", "status", "events"]
        appeared = [i for i in new.index if i not in old.index]
        changed = [
            i for i in old.index if new.loc[i, fields].tolist() != old.loc[i, fields].tolist()
        ]
        assert result.appeared == len(appeared)
        assert result.changed == len(changed)
        assert result.unchanged == len(old) - len(changed)


def test_population_diff_needs_ordered_instants(tmp_path: Path) -> None:
    store = bank(tmp_path)
    with pytest.raises(esw.EsWorkbenchError, match="before <= after") as info:
        esw.population_diff(store, DECLARED, before=at(10), after=at(5))
    assert "Hint:" in str(info.value)


# -- blame -----------------------------------------------------------------------------------


def test_blame_hand_checked(tmp_path: Path) -> None:
    store = bank(tmp_path)
    blamed = esw.blame(store, ACCOUNT, "acc-1")
    assert blamed.columns.tolist() == [
        "field",
        "value",
        "version",
        "event_type",
        "event_id",
        "recorded_at",
        "user_id",
        "correlation_id",
    ]
    rows = blamed.set_index("field")
    assert rows.loc["balance", "value"] == Decimal("100.00")
    assert rows.loc["balance", "version"] == 4
    assert rows.loc["balance", "user_id"] == "u-4"
    # LimitChanged at version 3 set the limit to the value it had: the blame stays on version 1.
    assert rows.loc["limit", "version"] == 1
    assert rows.loc["limit", "user_id"] == "u-1"
    assert rows.loc["owner", "recorded_at"] == at(0)
    ids = store.read_stream("acc-1")["event_id"].to_pylist()
    assert rows.loc["balance", "event_id"] == ids[3]


def test_blame_at_version_and_instant(tmp_path: Path) -> None:
    store = bank(tmp_path)
    at_two = esw.blame(store, ACCOUNT, "acc-1", version=2).set_index("field")
    assert at_two.loc["balance", "version"] == 2
    assert at_two.loc["balance", "correlation_id"] == "c-1"
    before = esw.blame(store, ACCOUNT, "acc-1", at=at(10) - US).set_index("field")
    assert before.loc["balance", "value"] == 0
    assert pd.isna(before.loc["balance", "version"])  # never changed: still the initial value
    assert pd.isna(before.loc["balance", "event_type"])
    exactly = esw.blame(store, ACCOUNT, "acc-1", at=at(10)).set_index("field")
    assert exactly.loc["balance", "version"] == 2


def test_blame_of_a_whole_state(tmp_path: Path) -> None:
    store = bank(tmp_path)
    counter = esw.Aggregate("Account", initial=0, on={"MoneyDeposited": lambda n, e: n + 1})
    blamed = esw.blame(store, counter, "acc-1")
    assert blamed[["field", "value", "version", "event_type"]].to_dict("records") == [
        {"field": "state", "value": 1, "version": 2, "event_type": "MoneyDeposited"}
    ]


def test_blame_names_the_event_type_the_fold_saw(tmp_path: Path) -> None:
    """An upcaster that renames an event type renames it for blame too, as for the timeline."""
    store = esw.open_store(tmp_path / "s")
    store.append("a", [esw.NewEvent("Dep", {"amt": 5})], aggregate_type="Account")
    upcasters = esw.Upcasters()
    upcasters.add("Dep", 1, lambda data: ("Deposited", {"amount": data["amt"]}))
    fold = esw.Aggregate(
        "Account",
        initial={"balance": 0},
        on={"Deposited": lambda s, e: {"balance": s["balance"] + e.data["amount"]}},
        upcasters=upcasters,
    )
    blamed = esw.blame(store, fold, "a").set_index("field")
    assert blamed.loc["balance", "event_type"] == "Deposited"
    assert esw.timeline(store, fold, "a")["event_type"].tolist() == ["Deposited"]
