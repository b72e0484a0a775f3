"""Upcasting: Python and SQL steps, one version at a time, for folds, SQL, exports and dry runs."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import esworkbench as esw
from esworkbench.demo import write_demo
from esworkbench.temporal import compiles

AMOUNT_SQL = "json_object('amount', json_extract(data, '$.amt'))"


def deposits_v1(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount": data["amt"]}


def demo_upcasters(*, python: bool = True, sql: bool = True) -> esw.Upcasters:
    up = esw.Upcasters()
    if python:
        up.add("MoneyDeposited", 1, deposits_v1)
    if sql:
        up.add_sql("MoneyDeposited", 1, AMOUNT_SQL)
    return up


def bank(upcasters: esw.Upcasters, *, decimals: bool = True) -> esw.Aggregate:
    return esw.Aggregate(
        "Account",
        fields={
            "deposited": esw.sum("amount", types="MoneyDeposited"),
            "deposits": esw.count("amount", types="MoneyDeposited"),
            "largest": esw.max("amount", types="MoneyDeposited"),
            "last_amount": esw.last("amount", types="MoneyDeposited"),
        },
        decimals=decimals,
        upcasters=upcasters,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> esw.Store:
    store = esw.open_store(tmp_path_factory.mktemp("demo") / "store")
    write_demo(store, 6000, seed=3, batch_size=3000)
    return store


def test_the_demo_has_both_shapes_of_money_deposited(demo: esw.Store) -> None:
    shapes = demo.sql(
        "SELECT schema_version, json_keys(data) AS keys, count(*) FROM events "
        "WHERE event_type = 'MoneyDeposited' GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert [(v, k) for v, k, _ in shapes] == [(1, ["amt"]), (2, ["amount", "balanceAfter"])]


def test_sql_and_python_steps_agree_on_every_demo_event(demo: esw.Store) -> None:
    python, sql = demo_upcasters(sql=False), demo_upcasters(python=False)
    rows = demo.sql(
        "SELECT event_type, schema_version, data FROM events WHERE schema_version = 1 "
        "AND event_type = 'MoneyDeposited'"
    ).to_arrow_table()
    assert rows.num_rows > 100
    by_python = python.apply(rows)
    by_sql = sql.apply(rows)  # the SQL form, run through DuckDB one event at a time
    assert by_python["schema_version"].to_pylist() == [2] * rows.num_rows
    assert by_python["event_type"] == by_sql["event_type"]
    assert by_python["schema_version"] == by_sql["schema_version"]
    decode = [json.loads(t, parse_float=Decimal) for t in by_python["data"].to_pylist()]
    assert decode == [json.loads(t, parse_float=Decimal) for t in by_sql["data"].to_pylist()]
    # and the whole-table SQL form gives the same rows as the Python steps
    relation = demo.sql(
        "SELECT data FROM ("
        + sql.events_sql()
        + ") WHERE event_type = 'MoneyDeposited' AND position IN (SELECT position FROM events "
        "WHERE schema_version = 1) ORDER BY position"
    ).fetchall()
    ordered = demo.sql(
        "SELECT event_type, schema_version, data FROM events WHERE schema_version = 1 "
        "AND event_type = 'MoneyDeposited' ORDER BY position"
    ).to_arrow_table()
    expected = [
        json.loads(t, parse_float=Decimal) for t in python.apply(ordered)["data"].to_pylist()
    ]
    assert [json.loads(r[0], parse_float=Decimal) for r in relation] == expected


def test_declared_folds_stay_in_sql_with_sql_upcasters(demo: esw.Store) -> None:
    both = bank(demo_upcasters())
    assert compiles(both)
    assert not compiles(bank(demo_upcasters(sql=False)))
    by_sql = esw.as_of(demo, both, engine="sql")
    by_python = esw.as_of(demo, both, engine="python", workers=1)
    assert by_sql.to_dict("records") == by_python.to_dict("records")
    # without upcasters the old deposits are invisible to the fold
    plain = esw.as_of(demo, bank(esw.Upcasters()), engine="sql")
    assert plain["deposits"].sum() < by_sql["deposits"].sum()
    total = demo.sql("SELECT count(*) FROM events WHERE event_type = 'MoneyDeposited'").fetchall()[
        0
    ][0]
    assert by_sql["deposits"].sum() == total


def test_a_python_engine_runs_sql_only_steps(demo: esw.Store) -> None:
    sql_only = bank(demo_upcasters(python=False), decimals=False)
    stream = demo.sql(
        "SELECT aggregate_id FROM events WHERE schema_version = 1 LIMIT 1"
    ).fetchall()[0][0]
    state = esw.replay(demo, sql_only, stream)
    with_python = esw.replay(demo, bank(demo_upcasters(sql=False), decimals=False), stream)
    assert state == with_python
    assert state["deposits"] >= 1


def test_esw_sql_upcast_view_keeps_columns_and_where(demo: esw.Store) -> None:
    up = demo_upcasters()
    columns = demo.sql(f"SELECT * FROM ({up.events_sql()}) LIMIT 0").columns
    assert columns == demo.sql("SELECT * FROM events LIMIT 0").columns
    left = demo.sql(
        f"SELECT count(*) FROM ({up.events_sql()}) WHERE schema_version = 1 "
        "AND event_type = 'MoneyDeposited'"
    ).fetchall()
    assert left == [(0,)]


def test_chains_and_renames_in_sql_and_python(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append(
        "a",
        [
            esw.NewEvent("Renamed", {"name": "Ann"}),
            esw.NewEvent("Renamed", {"name": "Bo"}, schema_version=2),
            esw.NewEvent("OwnerChanged", {"owner": "Cy"}, schema_version=3),
            esw.NewEvent("Other", {"x": 1}),
        ],
        aggregate_type="Person",
    )
    up = esw.Upcasters()
    up.add("Renamed", 1, lambda d: {"first": d["name"]})
    up.add_sql("Renamed", 1, "json_object('first', json_extract_string(data, '$.name'))")
    up.add("Renamed", 2, lambda d: ("OwnerChanged", {"owner": d.get("first", d.get("name"))}))
    up.add_sql(
        "Renamed",
        2,
        "json_object('owner', coalesce(json_extract_string(data, '$.first'), "
        "json_extract_string(data, '$.name')))",
        "'OwnerChanged'",
    )
    events = store.read_stream("a")
    by_python = up.apply(events).select(["event_type", "schema_version", "data"]).to_pylist()
    by_sql = (
        store.sql(
            f"SELECT event_type, schema_version, data FROM ({up.events_sql()}) ORDER BY version"
        )
        .to_arrow_table()
        .to_pylist()
    )
    assert (
        by_python
        == by_sql
        == [
            {"event_type": "OwnerChanged", "schema_version": 3, "data": '{"owner":"Ann"}'},
            {"event_type": "OwnerChanged", "schema_version": 3, "data": '{"owner":"Bo"}'},
            {"event_type": "OwnerChanged", "schema_version": 3, "data": '{"owner":"Cy"}'},
            {"event_type": "Other", "schema_version": 1, "data": '{"x":1}'},
        ]
    )
    person = esw.Aggregate("Person", fields={"owner": esw.last("owner")}, upcasters=up)
    assert esw.replay(store, person, "a") == {"owner": "Cy"}
    assert esw.as_of(store, person, engine="sql")["owner"].tolist() == ["Cy"]


def test_apply_keeps_exact_digits_and_names_the_failing_event(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append(
        "acc-1",
        [
            esw.NewEvent("MoneyDeposited", {"amt": Decimal("12345678901234567890.10")}),
            esw.NewEvent("MoneyDeposited", {"oops": 1}),
        ],
        aggregate_type="Account",
    )
    up = demo_upcasters(sql=False)
    first = up.apply(store.read_stream("acc-1", to_version=1))
    assert first["data"].to_pylist() == ['{"amount":12345678901234567890.10}']
    with pytest.raises(esw.UpcastError, match=r"KeyError: 'amt'.*stream 'acc-1' version 2"):
        up.apply(store.read_stream("acc-1"))
    untouched = pa.table({"event_type": ["X"], "schema_version": pa.array([1], pa.int32()),
                          "data": ["{}"]})  # fmt: skip
    assert up.apply(untouched) is untouched


def test_dry_run_counts_and_shows_the_first_failures(demo: esw.Store) -> None:
    up = esw.Upcasters()
    up.add("MoneyDeposited", 1, deposits_v1)
    report = demo_upcasters(sql=False).dry_run(demo, batch_size=97)
    rows = {r["schema_version"]: r for r in report.to_dict("records")}
    stored = dict(
        demo.sql(
            "SELECT schema_version, count(*) FROM events WHERE event_type = 'MoneyDeposited' "
            "GROUP BY 1"
        ).fetchall()
    )
    assert rows[1]["events"] == rows[1]["upcast"] == stored[1]
    assert (rows[1]["failed"], rows[1]["to_version"], rows[1]["first_failures"]) == (0, 2, [])
    assert (rows[2]["events"], rows[2]["upcast"], rows[2]["to_version"]) == (stored[2], 0, 2)

    def picky(data: dict[str, Any]) -> dict[str, Any]:
        if Decimal(str(data["amt"])) > 50:
            raise ValueError("too large to be a v1 deposit")
        return {"amount": data["amt"]}

    strict = esw.Upcasters()
    strict.add("MoneyDeposited", 1, picky)
    [row] = [r for r in strict.dry_run(demo).to_dict("records") if r["schema_version"] == 1]
    assert row["failed"] > 0
    assert row["upcast"] + row["failed"] == row["events"]
    assert len(row["first_failures"]) == 5
    failure = row["first_failures"][0]
    assert set(failure) == {"event_id", "aggregate_id", "version", "reason"}
    assert "too large to be a v1 deposit" in failure["reason"]


def test_identity_and_pickling(demo: esw.Store) -> None:
    up = demo_upcasters(python=False)
    assert up.upcast("MoneyDeposited", 1, {"amt": 5}) == ("MoneyDeposited", 2, {"amount": 5})
    copy = cloudpickle.loads(cloudpickle.dumps(up))  # the fold travels to worker processes
    assert copy.identity == up.identity
    assert copy.upcast("MoneyDeposited", 1, {"amt": 5}) == ("MoneyDeposited", 2, {"amount": 5})
    other = esw.Upcasters()
    other.add_sql("MoneyDeposited", 1, "json_object('amount', 1)")
    assert other.identity != up.identity
    assert bank(up).identity != bank(other).identity


def test_refusals() -> None:
    up = esw.Upcasters()
    with pytest.raises(esw.EsWorkbenchError, match="Hint"):
        up.add_sql("A", 0, "data")
    with pytest.raises(esw.EsWorkbenchError, match="SQL expression"):
        up.add_sql("A", 1, " ")
    up.add_sql("A", 1, "data")
    with pytest.raises(esw.EsWorkbenchError, match="already registered"):
        up.add_sql("A", 1, "data")
    up.add("B", 1, dict)
    with pytest.raises(esw.EsWorkbenchError, match="B v1 have no SQL form"):
        up.events_sql()
    broken = esw.Upcasters()
    broken.add_sql("A", 1, "json_extract(nope, '$.x')")
    with pytest.raises(esw.UpcastError, match="DuckDB refused the SQL step"):
        broken.upcast("A", 1, {})


# -- the law: an upcast chain is the composition of its steps ---------------------------------

_keys = st.sampled_from(["a", "b", "c"])


@st.composite
def chains(draw: st.DrawFn) -> tuple[int, list[tuple[str, str]], dict[str, int]]:
    start = draw(st.integers(1, 3))
    steps = draw(st.lists(st.tuples(st.sampled_from(["add", "rename", "double"]), _keys),
                          max_size=5))  # fmt: skip
    data = draw(st.dictionaries(_keys, st.integers(-100, 100)))
    return start, steps, data


def _step(kind: str, key: str) -> Any:
    if kind == "add":
        return lambda d: {**d, key: d.get(key, 0) + 1}
    if kind == "rename":
        return lambda d: {(f"{k}_" if k == key else k): v for k, v in d.items()}
    return lambda d: {k: 2 * v for k, v in d.items()}


@settings(max_examples=60, deadline=None)
@given(chains())
def test_upcast_chain_is_the_composed_steps(chain: tuple[int, list[Any], dict[str, int]]) -> None:
    start, kinds, data = chain
    up = esw.Upcasters()
    functions = [_step(kind, key) for kind, key in kinds]
    for offset, function in enumerate(functions):
        up.add("E", start + offset, function)
    composed: Any = data
    for function in functions:
        composed = function(composed)
    assert up.upcast("E", start, data) == ("E", start + len(functions), composed)
    # entering the chain midway runs only the rest of it
    if functions:
        rest: Any = data
        for function in functions[1:]:
            rest = function(rest)
        assert up.upcast("E", start + 1, data) == ("E", start + len(functions), rest)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["amt", "note", "x"]),
        st.one_of(st.decimals(-(10**9), 10**9, places=2), st.text(max_size=5), st.integers()),
    )
)
def test_a_sql_step_and_its_python_step_agree(data: dict[str, Any]) -> None:
    python, sql = demo_upcasters(sql=False), demo_upcasters(python=False)
    try:
        expected = python.upcast("MoneyDeposited", 1, data)
    except esw.UpcastError:
        # the Python step needs "amt"; the SQL one gives null where it is missing
        assert "amt" not in data
        assert sql.upcast("MoneyDeposited", 1, data)[2] == {"amount": None}
        return
    assert sql.upcast("MoneyDeposited", 1, data) == expected


def test_exports_upcast_on_the_way_out(tmp_path: Path) -> None:
    from esworkbench.sources.files import read_csv, read_jsonl, read_table

    store = esw.open_store(tmp_path / "s")
    store.append(
        "acc-1",
        [
            esw.NewEvent("MoneyDeposited", {"amt": Decimal("10.10")}),
            esw.NewEvent(
                "MoneyDeposited", {"amount": Decimal("0.05"), "balanceAfter": 1}, schema_version=2
            ),
            esw.NewEvent("AccountClosed", {}),
        ],
        aggregate_type="Account",
    )
    up = demo_upcasters(sql=False)
    expected = [
        ("MoneyDeposited", 2, '{"amount":10.10}'),
        ("MoneyDeposited", 2, '{"amount":0.05,"balanceAfter":1}'),
        ("AccountClosed", 1, "{}"),
    ]
    for name, export, read in [
        ("out.jsonl", esw.export_jsonl, read_jsonl),
        ("out.csv", esw.export_csv, read_csv),
        ("out.parquet", esw.export_parquet, read_table),
    ]:
        assert export(store, tmp_path / name, upcasters=up, batch_size=2) == 3
        rows = [r for t in read(tmp_path / name) for r in t.to_pylist()]
        assert [(r["event_type"], r["schema_version"], r["data"]) for r in rows] == expected, name
        plain = tmp_path / f"plain-{name}"
        export(store, plain)
        assert next(r["data"] for t in read(plain) for r in t.to_pylist()) == '{"amt":10.10}'
