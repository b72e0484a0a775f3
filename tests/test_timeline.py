"""The timeline: one row per (aggregate_id, version), from the Python engine and from SQL."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esworkbench as esw
from esworkbench.history import Rows, _python_rows, _sql_rows
from esworkbench.temporal import compiles

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def bank(path: Path) -> esw.Store:
    """acc-1: opened, two deposits, a withdrawal; acc-2: opened, closed. Hand-checked below."""
    store = esw.open_store(path)
    store.append(
        "acc-1",
        [
            esw.NewEvent("AccountOpened", {"owner": "Ann"}, recorded_at=at(0), user_id="u-1"),
            esw.NewEvent(
                "MoneyDeposited", {"amount": 100}, recorded_at=at(10), correlation_id="c-1"
            ),
            esw.NewEvent("MoneyDeposited", {"amount": 50}, recorded_at=at(20), user_id="u-2"),
            esw.NewEvent("MoneyWithdrawn", {"amount": 30}, recorded_at=at(30)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "acc-2",
        [
            esw.NewEvent("AccountOpened", {"owner": "Bo"}, recorded_at=at(5)),
            esw.NewEvent("AccountClosed", {}, recorded_at=at(15)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    return store


DECLARED = esw.Aggregate(
    "Account",
    fields={
        "owner": esw.last("owner"),
        "deposited": esw.sum("amount", types="MoneyDeposited"),
        "events": esw.count(),
        "status": esw.status({"AccountOpened": "open", "AccountClosed": "closed"}),
    },
)


def _balance(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    sign = -1 if event.event_type == "MoneyWithdrawn" else 1
    return {**state, "balance": state["balance"] + sign * event.data["amount"]}


HANDLERS = esw.Aggregate(
    "Account",
    initial={"balance": 0},
    on={"MoneyDeposited": _balance, "MoneyWithdrawn": _balance},
)


def test_one_stream_hand_checked(tmp_path: Path) -> None:
    store = bank(tmp_path)
    rows = esw.timeline(store, HANDLERS, "acc-1")
    assert isinstance(rows, pd.DataFrame)
    assert rows.columns.tolist() == [
        "aggregate_id",
        "version",
        "balance",
        "valid_from",
        "valid_to",
        "event_type",
        "event_id",
        "user_id",
        "correlation_id",
    ]
    assert rows["version"].tolist() == [1, 2, 3, 4]
    assert rows["balance"].tolist() == [0, 100, 150, 120]
    assert rows["valid_from"].tolist() == [at(0), at(10), at(20), at(30)]
    assert rows["valid_to"].tolist()[:3] == [at(10), at(20), at(30)]
    assert pd.isna(rows["valid_to"].iloc[3])
    assert rows["event_type"].tolist() == [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyDeposited",
        "MoneyWithdrawn",
    ]
    assert rows["user_id"].tolist() == ["u-1", None, "u-2", None]
    assert rows["correlation_id"].tolist() == [None, "c-1", None, None]
    assert rows["event_id"].tolist() == store.read_stream("acc-1")["event_id"].to_pylist()


def test_every_stream_in_sql_hand_checked(tmp_path: Path) -> None:
    store = bank(tmp_path)
    rows = esw.timeline(store, DECLARED)
    records = rows[["aggregate_id", "version", "owner", "deposited", "events", "status"]]
    assert records.to_dict("records") == [
        {"aggregate_id": "acc-1", "version": 1, "owner": "Ann", "deposited": 0, "events": 1,
         "status": "open"},
        {"aggregate_id": "acc-1", "version": 2, "owner": "Ann", "deposited": 100, "events": 2,
         "status": "open"},
        {"aggregate_id": "acc-1", "version": 3, "owner": "Ann", "deposited": 150, "events": 3,
         "status": "open"},
        {"aggregate_id": "acc-1", "version": 4, "owner": "Ann", "deposited": 150, "events": 4,
         "status": "open"},
        {"aggregate_id": "acc-2", "version": 1, "owner": "Bo", "deposited": 0, "events": 1,
         "status": "open"},
        {"aggregate_id": "acc-2", "version": 2, "owner": "Bo", "deposited": 0, "events": 2,
         "status": "closed"},
    ]  # fmt: skip
    assert pd.isna(rows["valid_to"].iloc[3])  # acc-1's last event
    assert rows["valid_to"].iloc[4] == at(15)  # acc-2 v1 lasted until v2 was recorded
    assert rows["user_id"].tolist() == ["u-1", None, "u-2", None, None, None]


def test_until_is_inclusive_to_the_microsecond(tmp_path: Path) -> None:
    store = bank(tmp_path)
    exactly = esw.timeline(store, HANDLERS, "acc-1", until=at(20))
    assert exactly["version"].tolist() == [1, 2, 3]
    assert pd.isna(exactly["valid_to"].iloc[-1])  # what the store knew then: no next event yet
    before = esw.timeline(store, HANDLERS, "acc-1", until=at(20) - US)
    assert before["version"].tolist() == [1, 2]
    for engine_rows in (esw.timeline(store, DECLARED, until=at(20) - US),
                        esw.timeline(store, HANDLERS, until=at(20) - US)):  # fmt: skip
        assert list(zip(engine_rows["aggregate_id"], engine_rows["version"], strict=True)) == [
            ("acc-1", 1),
            ("acc-1", 2),
            ("acc-2", 1),
            ("acc-2", 2),
        ]
    early = esw.timeline(store, HANDLERS, "acc-1", until=at(0) - US)
    assert len(early) == 0
    assert early.columns.tolist()[:3] == ["aggregate_id", "version", "balance"]


def test_until_in_another_zone_and_as_text(tmp_path: Path) -> None:
    store = bank(tmp_path)
    text = esw.timeline(store, DECLARED, until="2024-03-01T07:20:00-05:00")  # = at(20)
    assert text["version"].tolist() == [1, 2, 3, 1, 2]
    with pytest.raises(esw.EsWorkbenchError, match="naive") as info:
        esw.timeline(store, DECLARED, until=datetime(2024, 3, 1, 12, 20))
    assert "Hint:" in str(info.value)


def test_local_zone_does_not_matter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = bank(tmp_path)
    expected = esw.timeline(store, DECLARED)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        again = esw.timeline(bank(tmp_path / "again"), DECLARED)
        assert again["valid_from"].tolist() == expected["valid_from"].tolist()
        assert again["valid_from"].iloc[0].isoformat() == "2024-03-01T12:00:00+00:00"
        one = esw.timeline(store, HANDLERS, "acc-1", until="2024-03-01T07:10:00-05:00")
        assert one["balance"].tolist() == [0, 100]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert os.environ.get("TZ") != "America/New_York"


def test_last_row_is_as_of_and_replay(tmp_path: Path) -> None:
    store = bank(tmp_path)
    for aggregate in (DECLARED, HANDLERS):
        rows = esw.timeline(store, aggregate)
        last = rows.groupby("aggregate_id").tail(1).reset_index(drop=True)
        state = esw.as_of(store, aggregate)
        fields = [c for c in state.columns if c not in ("aggregate_id", "version", "last_event_at")]
        assert last[["aggregate_id", "version", *fields]].to_dict("records") == state[
            ["aggregate_id", "version", *fields]
        ].to_dict("records")
        assert last["valid_from"].tolist() == state["last_event_at"].tolist()
        for aggregate_id, group in rows.groupby("aggregate_id"):
            replayed = esw.replay(store, aggregate, str(aggregate_id))
            assert {f: group[f].iloc[-1] for f in fields} == replayed


def test_decimals_stay_exact(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path)
    amounts = ["0.10", "0.20", "12345678901234.56789"]
    store.append(
        "acc-1",
        [esw.NewEvent("MoneyDeposited", {"amount": Decimal(a)}) for a in amounts],
        aggregate_type="Account",
        expected_version=0,
    )
    account = esw.Aggregate(
        "Account",
        fields={"total": esw.sum("amount"), "last": esw.last("amount")},
        decimals=True,
    )
    one = esw.timeline(store, account, "acc-1")  # Python engine: exact to any precision
    assert one["total"].tolist() == [
        Decimal("0.10"),
        Decimal("0.30"),
        Decimal("12345678901234.86789"),
    ]
    assert one["last"].tolist()[-1] == Decimal("12345678901234.56789")
    every = esw.timeline(store, account)  # SQL: exact up to 15 significant digits
    assert every["total"].tolist()[:2] == [Decimal("0.1"), Decimal("0.3")]
    assert all(isinstance(v, Decimal) for v in every["total"])
    floats = esw.Aggregate("Account", fields={"total": esw.sum("amount")})
    # 0.1 + 0.2 is 0.3 here, not 0.30000000000000004: sums add exact decimals
    assert esw.timeline(store, floats)["total"].tolist()[:2] == [0.1, 0.3]
    assert esw.timeline(store, floats, "acc-1")["total"].tolist()[:2] == [0.1, 0.3]


def test_polars_and_non_dict_states(tmp_path: Path) -> None:
    store = bank(tmp_path)
    counter = esw.Aggregate("Account", initial=0, on={"MoneyDeposited": lambda n, e: n + 1})
    rows = esw.timeline(store, counter, output="polars")
    assert isinstance(rows, pl.DataFrame)
    assert rows.columns[:3] == ["aggregate_id", "version", "state"]
    assert rows["state"].to_list() == [0, 1, 2, 2, 0, 0]
    assert rows["valid_from"].dtype == pl.Datetime("us", "UTC")
    declared = esw.timeline(store, DECLARED, "acc-2", output="polars")
    assert declared["status"].to_list() == ["open", "closed"]


def test_errors_say_where(tmp_path: Path) -> None:
    store = bank(tmp_path)
    with pytest.raises(esw.UnknownStreamError, match="'nobody'"):
        esw.timeline(store, DECLARED, "nobody")
    clash = esw.Aggregate("Account", fields={"valid_to": esw.last("owner")})
    named = esw.timeline(store, clash)  # a state field named like a column keeps both
    assert {"valid_to", "state.valid_to"} <= set(named.columns)
    broken = esw.Aggregate("Account", on={"MoneyWithdrawn": lambda s, e: 1 / 0})
    with pytest.raises(esw.FoldError, match="version 4"):
        esw.timeline(store, broken)
    with pytest.raises(esw.EsWorkbenchError, match="output"):
        esw.timeline(store, DECLARED, output="csv")  # type: ignore[arg-type]


def test_python_engine_for_every_stream_matches_one_stream(tmp_path: Path) -> None:
    store = bank(tmp_path)
    rows = esw.timeline(store, HANDLERS)
    for aggregate_id in ("acc-1", "acc-2"):
        one = esw.timeline(store, HANDLERS, aggregate_id)
        part = rows[rows["aggregate_id"] == aggregate_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, one, check_dtype=False)


def test_demo_data_both_engines_agree(tmp_path: Path) -> None:
    from esworkbench import demo

    store = esw.open_store(tmp_path)
    for table in demo.generate(3_000, seed=7):
        store.append_batch(table)
    types = [r[0] for r in store.sql("select distinct aggregate_type from events").fetchall()]
    assert types
    for aggregate_type in types:
        declared = esw.Aggregate(
            aggregate_type,
            fields={"n": esw.count(), "first": esw.first_at(), "last": esw.last_at()},
        )
        where, params = "true", []
        _same_rows(
            _sql_rows(store, declared, where, params), _python_rows(store, declared, where, params)
        )


# -- SQL == Python, on random declared folds and random histories ------------------------------

TYPES = ["T1", "T2", "T3"]
FIELDS = ["a", "b"]
types_option = st.none() | st.lists(st.sampled_from(TYPES), min_size=1, max_size=2, unique=True)
pieces = st.one_of(
    st.builds(lambda f, t: esw.last(f, types=t), st.sampled_from(FIELDS), types_option),
    st.builds(lambda f, t: esw.count(f, types=t), st.sampled_from([None, *FIELDS]), types_option),
    st.builds(lambda f, t: esw.sum(f, types=t), st.sampled_from(FIELDS), types_option),
    st.builds(lambda f, t: esw.min(f, types=t), st.sampled_from(FIELDS), types_option),
    st.builds(lambda f, t: esw.max(f, types=t), st.sampled_from(FIELDS), types_option),
    st.builds(
        lambda m: esw.status(m),
        st.dictionaries(
            st.sampled_from(TYPES), st.none() | st.integers(0, 3) | st.text(max_size=3), min_size=1
        ),
    ),
    st.builds(
        lambda t, i: esw.first_at(types=t, instant=i),
        types_option,
        st.sampled_from(["recorded_at", "occurred_at"]),
    ),
    st.builds(
        lambda t, i: esw.last_at(types=t, instant=i),
        types_option,
        st.sampled_from(["recorded_at", "occurred_at"]),
    ),
)
folds = st.builds(
    lambda fields, decimals: esw.Aggregate("Thing", fields=fields, decimals=decimals),
    st.dictionaries(st.sampled_from(["p", "q", "r", "s"]), pieces, min_size=1, max_size=4),
    st.booleans(),
)
numbers = st.integers(-1000, 1000) | st.decimals(-10_000, 10_000, places=2).map(float)
values = (
    numbers
    | st.decimals(-10_000, 10_000, places=3)
    | st.none()
    | st.booleans()
    | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=4)
    | st.lists(st.integers(0, 9), max_size=2)
)
events = st.tuples(
    st.sampled_from(["s-1", "s-2", "s-3"]),
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from([*FIELDS, "c"]), values, max_size=3),
    st.integers(0, 5),  # recorded_at, minutes: repeats and going back happen
    st.integers(0, 5),  # occurred_at, minutes
)


@settings(
    max_examples=int(os.environ.get("ESW_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fold=folds, history=st.lists(events, min_size=1, max_size=12))
def test_sql_timeline_equals_python_timeline(
    tmp_path_factory: pytest.TempPathFactory,
    fold: esw.Aggregate,
    history: list[tuple[str, str, dict[str, Any], int, int]],
) -> None:
    store = esw.open_store(tmp_path_factory.mktemp("store"))
    store.append_batch(
        [
            {
                "aggregate_id": stream,
                "aggregate_type": "Thing",
                "event_type": event_type,
                "data": data,
                "recorded_at": at(recorded),
                "occurred_at": at(occurred),
            }
            for stream, event_type, data, recorded, occurred in history
        ]
    )
    assert fold.declared
    for where, params in (("true", []), ("recorded_at <= ?", [at(2)])):
        sql = _sql_rows(store, fold, where, params)
        python = _python_rows(store, fold, where, params)
        _same_rows(sql, python)
    # The public surface: every stream (SQL) == each stream through the Python engine.
    every = esw.timeline(store, fold)
    for stream in sorted({h[0] for h in history}):
        one = esw.timeline(store, fold, stream)
        part = every[every["aggregate_id"] == stream]
        for name in fold.fields:
            _same_values(part[name].tolist(), one[name].tolist())


def _same_values(left: list[Any], right: list[Any]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        if isinstance(a, datetime | pd.Timestamp) or isinstance(b, datetime | pd.Timestamp):
            assert a == b
            continue
        if a is None or b is None or (isinstance(a, float) and pd.isna(a)):
            assert a is b or (pd.isna(a) and pd.isna(b))
            continue
        assert (a, type(a)) == (b, type(b))


def _same_rows(sql: Rows, python: Rows) -> None:
    assert sql.aggregate_id == python.aggregate_id
    assert sql.version == python.version
    assert sql.valid_from == python.valid_from
    assert sql.valid_to == python.valid_to
    assert sql.events == python.events
    assert len(sql.states()) == len(python.states())
    for left, right in zip(sql.states(), python.states(), strict=True):
        assert left.keys() == right.keys()
        for name in left:
            _same_values([left[name]], [right[name]])


def test_python_engine_in_small_chunks(tmp_path: Path) -> None:
    store = bank(tmp_path)
    whole = _python_rows(store, HANDLERS, "true", [])
    chunked = _python_rows(store, HANDLERS, "true", [], chunk_events=1)
    assert chunked == whole
    assert whole.aggregate_id == ["acc-1"] * 4 + ["acc-2"] * 2


def test_declared_fields_beside_other_initial_keys(tmp_path: Path) -> None:
    store = bank(tmp_path)
    fold = esw.Aggregate("Account", initial={"kind": "bank"}, fields={"n": esw.count()})
    every = esw.timeline(store, fold)
    assert every.columns.tolist()[:4] == ["aggregate_id", "version", "kind", "n"]
    assert every["kind"].tolist() == ["bank"] * 6
    assert every["n"].tolist() == [1, 2, 3, 4, 1, 2]
    one = esw.timeline(store, fold, "acc-2")
    assert one[["kind", "n"]].to_dict("records") == [
        {"kind": "bank", "n": 1},
        {"kind": "bank", "n": 2},
    ]
    nothing = esw.timeline(store, fold, until=at(0) - US)
    assert len(nothing) == 0
    assert nothing.columns.tolist()[:4] == ["aggregate_id", "version", "kind", "n"]


def test_sql_upcasters_keep_the_timeline_in_sql(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path)
    store.append(
        "acc-1",
        [
            esw.NewEvent("MoneyDeposited", {"amt": 5}, schema_version=1),
            esw.NewEvent("MoneyDeposited", {"amount": 7}, schema_version=2),
            esw.NewEvent("Renamed", {"name": "Ann"}, schema_version=1),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    upcasters = esw.Upcasters()
    upcasters.add_sql("MoneyDeposited", 1, "json_object('amount', json_extract(data, '$.amt'))")
    upcasters.add_sql(
        "Renamed", 1, "json_object('owner', json_extract(data, '$.name'))", "'OwnerChanged'"
    )
    fold = esw.Aggregate(
        "Account",
        fields={"total": esw.sum("amount"), "owner": esw.last("owner", types="OwnerChanged")},
        upcasters=upcasters,
    )
    assert compiles(fold)
    every = esw.timeline(store, fold)  # one SQL query over the upcast events
    one = esw.timeline(store, fold, "acc-1")  # the Python engine, upcasting on read
    assert every["total"].tolist() == one["total"].tolist() == [5, 12, 12]
    assert every["owner"].tolist() == one["owner"].tolist() == [None, None, "Ann"]
    assert every["event_type"].tolist() == one["event_type"].tolist()
    assert one["event_type"].tolist()[-1] == "OwnerChanged"  # as the fold saw it
