"""Laws of replay over random histories: SQL engine == Python engine; as_of(last) == replay."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

import esworkbench as esw

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TYPES = ["Opened", "Moved", "Closed"]
FIELDS = ["x", "y", "név"]

numbers = st.one_of(
    st.integers(-(2**53), 2**53),
    st.decimals(min_value=-(10**9), max_value=10**9, places=4, allow_nan=False),
)
values = st.one_of(
    numbers,
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-5, 5), max_size=2),
)
datas = st.dictionaries(st.sampled_from(FIELDS), values, max_size=3)
type_filters = st.one_of(st.none(), st.lists(st.sampled_from(TYPES), min_size=1, max_size=2))


@st.composite
def pieces(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["last", "count", "sum", "min", "max", "status", "first", "end"]))
    field = draw(st.sampled_from(FIELDS))
    types = draw(type_filters)
    if kind == "last":
        return esw.last(field, types=types)
    if kind == "count":
        return esw.count(draw(st.none() | st.just(field)), types=types)
    if kind == "sum":
        return esw.sum(field, types=types)
    if kind == "min":
        return esw.min(field, types=types)
    if kind == "max":
        return esw.max(field, types=types)
    if kind == "status":
        chosen = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True))
        return esw.status({t: f"s-{t}" for t in chosen}, default="none")
    if kind == "first":
        return esw.first_at(types=types)
    return esw.last_at(types=types, instant="occurred_at")


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    streams = draw(st.integers(1, 4))
    events = []
    clock = 0
    for _ in range(draw(st.integers(1, 14))):
        clock += draw(st.integers(0, 3))  # equal instants happen too
        recorded = T0 + timedelta(seconds=clock)
        late = draw(st.integers(0, 2))
        events.append(
            {
                "aggregate_id": f"s{draw(st.integers(0, streams - 1))}",
                "aggregate_type": "Thing",
                "event_type": draw(st.sampled_from(TYPES)),
                "data": draw(datas),
                "timestamp": recorded,
                "occurred_at": recorded - timedelta(seconds=late),
            }
        )
    return events


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    history=histories(),
    fields=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), pieces(), min_size=1),
    decimals=st.booleans(),
    at_second=st.one_of(st.none(), st.integers(-1, 45)),
    nudge=st.sampled_from([0, -1]),
)
def test_sql_engine_equals_python_engine(
    history: list[dict[str, Any]],
    fields: dict[str, Any],
    decimals: bool,
    at_second: int | None,
    nudge: int,
) -> None:
    store = esw.open_store(tempfile.mkdtemp(prefix="esw-prop-"))
    store.append_batch(history)
    fold = esw.Aggregate("Thing", initial={}, fields=fields, decimals=decimals)
    at = None
    if at_second is not None:
        at = T0 + timedelta(seconds=at_second, microseconds=nudge)
    by_sql = esw.as_of(store, fold, at=at, engine="sql")
    by_python = esw.as_of(store, fold, at=at, engine="python", workers=1)
    assert_frame_equal(by_sql, by_python, check_exact=True)
    store.close()


@settings(max_examples=40, deadline=None)
@given(history=histories())
def test_as_of_the_last_version_equals_replay(history: list[dict[str, Any]]) -> None:
    store = esw.open_store(tempfile.mkdtemp(prefix="esw-prop-"))
    store.append_batch(history)

    def move(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
        return {**state, "moves": state.get("moves", 0) + 1, "last": event.data.get("x")}

    fold = esw.Aggregate("Thing", initial={}, on={"Moved": move}, decimals=True)
    frame = esw.as_of(store, fold, engine="python", workers=1)
    for row in frame.to_dict("records"):
        state = esw.replay(store, fold, row["aggregate_id"])
        assert {k: v for k, v in row.items() if k in state} == state
        assert esw.replay(store, fold, row["aggregate_id"], version=row["version"]) == state
    store.close()


def test_sums_are_exact() -> None:
    store = esw.open_store(tempfile.mkdtemp(prefix="esw-prop-"))
    amounts = [Decimal("0.10")] * 10 + [Decimal("1234567890.12"), Decimal("-0.02")]
    store.append_batch(
        [
            {
                "aggregate_id": "a",
                "aggregate_type": "Thing",
                "event_type": "Moved",
                "data": {"x": amount},
            }
            for amount in amounts
        ]
    )
    for decimals in (True, False):
        fold = esw.Aggregate("Thing", fields={"total": esw.sum("x")}, decimals=decimals)
        for engine in ("sql", "python"):
            [total] = esw.as_of(store, fold, engine=engine, workers=1)["total"]
            expected = Decimal("1234567891.10")
            assert total == (expected if decimals else float(expected)), (engine, decimals)
