"""Replay: folds, one stream at a version or instant (also bitemporal), every stream as of T."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest

import esworkbench as esw
from esworkbench.aggregates import Aggregate

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def ev(event_type: str, data: dict[str, Any], at: datetime, **extra: Any) -> dict[str, Any]:
    return {"event_type": event_type, "data": data, "timestamp": at, **extra}


def deposit(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    return {**state, "balance": state["balance"] + event.data["amount"]}


ACCOUNT = esw.Aggregate(
    "Account",
    initial={"balance": 0, "owner": None, "status": "new"},
    on={
        "AccountOpened": lambda s, e: {**s, "owner": e.data["owner"], "status": "open"},
        "MoneyDeposited": deposit,
        "MoneyWithdrawn": lambda s, e: {**s, "balance": s["balance"] - e.data["amount"]},
        "AccountClosed": lambda s, e: {**s, "status": "closed"},
    },
    decimals=True,
)


@pytest.fixture
def bank(tmp_path: Path) -> esw.Store:
    store = esw.open_store(tmp_path / "bank")
    store.append(
        "acc-1",
        [
            ev("AccountOpened", {"owner": "Ann"}, T0),
            ev("MoneyDeposited", {"amount": Decimal("100.10")}, T0 + timedelta(minutes=1)),
            ev("MoneyWithdrawn", {"amount": Decimal("0.20")}, T0 + timedelta(minutes=2)),
            ev("MoneyDeposited", {"amount": Decimal("5.05")}, T0 + timedelta(minutes=3)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "acc-2",
        [
            ev("AccountOpened", {"owner": "Bo"}, T0 + timedelta(seconds=30)),
            ev("AccountClosed", {}, T0 + timedelta(minutes=5)),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    store.append(
        "ord-1",
        [ev("OrderPlaced", {"amount": 3}, T0)],
        aggregate_type="Order",
        expected_version=0,
    )
    return store


# -- one stream --------------------------------------------------------------------------------


def test_replay_at_the_end_at_a_version_and_at_an_instant(bank: esw.Store) -> None:
    end = esw.replay(bank, ACCOUNT, "acc-1")
    assert end == {"balance": Decimal("104.95"), "owner": "Ann", "status": "open"}
    assert str(end["balance"]) == "104.95"  # exact, no float rounding anywhere
    assert esw.replay(bank, ACCOUNT, "acc-1", version=2)["balance"] == Decimal("100.10")
    assert esw.replay(bank, ACCOUNT, "acc-1", version=0) == ACCOUNT.start()
    # Exactly at an event's instant includes it; 1 µs before does not.
    at_third = T0 + timedelta(minutes=2)
    assert esw.replay(bank, ACCOUNT, "acc-1", at=at_third)["balance"] == Decimal("99.90")
    before = at_third - timedelta(microseconds=1)
    assert esw.replay(bank, ACCOUNT, "acc-1", at=before)["balance"] == Decimal("100.10")
    assert esw.replay(bank, ACCOUNT, "acc-1", at="2024-03-01T12:02:00Z")["balance"] == Decimal(
        "99.90"
    )


def test_bitemporal_replay_keeps_late_events_out_of_the_past(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append(
        "acc-1",
        [
            ev("AccountOpened", {"owner": "Ann"}, T0),
            ev("MoneyDeposited", {"amount": 10}, T0 + timedelta(hours=2)),
            # Recorded at 3h, but it took effect at 1h: a back-dated correction.
            ev(
                "MoneyDeposited",
                {"amount": 1},
                T0 + timedelta(hours=3),
                occurred_at=T0 + timedelta(hours=1),
            ),
        ],
        aggregate_type="Account",
        expected_version=0,
    )
    account = esw.Aggregate(ACCOUNT.name, initial=ACCOUNT.initial, on=ACCOUNT.on)
    v, r = T0 + timedelta(hours=1, minutes=30), T0 + timedelta(hours=2, minutes=30)
    assert esw.replay(store, account, "acc-1", valid_at=v, known_at=r)["balance"] == 0
    assert (
        esw.replay(store, account, "acc-1", valid_at=v, known_at=T0 + timedelta(hours=4))["balance"]
        == 1
    )
    assert esw.replay(store, account, "acc-1", at=T0 + timedelta(hours=4))["balance"] == 11


def test_bad_questions_get_clear_errors(bank: esw.Store) -> None:
    with pytest.raises(esw.UnknownStreamError, match="acc-9"):
        esw.replay(bank, ACCOUNT, "acc-9")
    with pytest.raises(esw.EsWorkbenchError, match=r"is a 'Order'.*'Account'"):
        esw.replay(bank, ACCOUNT, "ord-1")
    with pytest.raises(esw.EsWorkbenchError, match="naive"):
        esw.replay(bank, ACCOUNT, "acc-1", at=datetime(2024, 3, 1))
    with pytest.raises(esw.EsWorkbenchError, match="version"):
        esw.replay(bank, ACCOUNT, "acc-1", version=-1)
    head = bank.stream_version("acc-1")
    with pytest.raises(esw.EsWorkbenchError, match=rf"has {head} versions; version={head + 1} is"):
        esw.replay(bank, ACCOUNT, "acc-1", version=head + 1)
    with pytest.raises(esw.EsWorkbenchError, match="past its head"):
        esw.steps(bank, ACCOUNT, "acc-1", version=head + 1)
    assert esw.replay(bank, ACCOUNT, "acc-1", version=head) == esw.replay(bank, ACCOUNT, "acc-1")
    with pytest.raises(esw.EsWorkbenchError, match="not an ISO instant"):
        esw.replay(bank, ACCOUNT, "acc-1", at="yesterday")


def test_a_failing_handler_names_the_stream_and_version(bank: esw.Store) -> None:
    broken = esw.Aggregate("Account", initial={}, on={"MoneyWithdrawn": lambda s, e: s["missing"]})
    with pytest.raises(esw.FoldError, match=r"'acc-1' version 3") as caught:
        esw.replay(bank, broken, "acc-1")
    assert (caught.value.aggregate_id, caught.value.version) == ("acc-1", 3)
    assert isinstance(caught.value.__cause__, KeyError)


def test_unknown_event_types_are_ignored_or_refused(bank: esw.Store) -> None:
    only_opened = {"AccountOpened": lambda s, e: {**s, "owner": e.data["owner"]}}
    lenient = esw.Aggregate("Account", initial={}, on=only_opened)
    assert esw.replay(bank, lenient, "acc-1") == {"owner": "Ann"}
    strict = esw.Aggregate("Account", initial={}, on=only_opened, unknown="error")
    with pytest.raises(esw.FoldError, match="no handler for event type 'MoneyDeposited'"):
        esw.replay(bank, strict, "acc-1")


def test_the_event_a_fold_sees(bank: esw.Store) -> None:
    seen: list[esw.Event] = []

    def keep(state: Any, event: esw.Event) -> Any:
        seen.append(event)
        return state

    esw.replay(bank, esw.Aggregate("Account", on={"MoneyWithdrawn": keep}), "acc-1")
    [event] = seen
    stored = bank.read_stream("acc-1").to_pylist()[2]
    assert event.event_type == "MoneyWithdrawn"
    assert event.version == 3
    assert event.data == {"amount": 0.2}  # without decimals=True numbers are floats
    assert event.event_id == stored["event_id"]
    assert event.position == stored["position"]
    assert event.recorded_at == T0 + timedelta(minutes=2) == event.occurred_at
    assert event.aggregate_id == "acc-1"
    assert event.aggregate_type == "Account"
    assert event.metadata == {}
    assert event.schema_version == 1
    assert (event.user_id, event.correlation_id, event.causation_id) == (None, None, None)


def test_class_form_and_generic_fold(bank: esw.Store) -> None:
    @esw.aggregate
    class Account:
        initial: ClassVar = {"balance": 0}
        decimals = True

        def MoneyDeposited(self, state: Any, event: esw.Event) -> Any:  # noqa: N802
            return {**state, "balance": state["balance"] + event.data["amount"]}

        def on_MoneyWithdrawn(self, state: Any, event: esw.Event) -> Any:  # noqa: N802
            return {**state, "balance": state["balance"] - event.data["amount"]}

    assert isinstance(Account, Aggregate)
    assert esw.replay(bank, Account, "acc-1") == {"balance": Decimal("104.95")}
    merged = esw.replay(bank, esw.generic("Account", decimals=True), "acc-1")
    assert merged == {"owner": "Ann", "amount": Decimal("5.05")}


# -- every stream ------------------------------------------------------------------------------


DECLARED = esw.Aggregate(
    "Account",
    initial={"kind": "bank"},
    fields={
        "owner": esw.last("owner"),
        "deposits": esw.count(types="MoneyDeposited"),
        "deposited": esw.sum("amount", types="MoneyDeposited"),
        "largest": esw.max("amount"),
        "smallest": esw.min("amount"),
        "status": esw.status({"AccountOpened": "open", "AccountClosed": "closed"}),
        "opened_at": esw.first_at(),
        "changed_at": esw.last_at(),
    },
    decimals=True,
)


def test_as_of_every_stream_with_a_declared_fold(bank: esw.Store) -> None:
    frame = esw.as_of(bank, DECLARED, at=T0 + timedelta(minutes=2))
    assert frame.columns.tolist()[:3] == ["aggregate_id", "version", "last_event_at"]
    rows = frame.set_index("aggregate_id").to_dict("index")
    assert rows["acc-1"]["version"] == 3
    assert rows["acc-1"]["deposited"] == Decimal("100.10")
    assert rows["acc-1"]["largest"] == Decimal("100.10")
    assert rows["acc-1"]["smallest"] == Decimal("0.20")
    assert rows["acc-1"]["deposits"] == 1
    assert rows["acc-1"]["status"] == "open"
    assert rows["acc-1"]["kind"] == "bank"
    assert rows["acc-2"]["status"] == "open"  # closed only at 12:05
    assert rows["acc-2"]["deposited"] == 0
    assert rows["acc-2"]["largest"] is None
    assert rows["acc-1"]["opened_at"] == T0
    # A stream whose first event comes after T is not in the frame.
    assert len(esw.as_of(bank, DECLARED, at=T0 + timedelta(seconds=10))) == 1


@pytest.mark.parametrize("at", [None, T0 + timedelta(minutes=2), T0 - timedelta(days=1)])
def test_sql_and_python_engines_agree(bank: esw.Store, at: datetime | None) -> None:
    by_sql = esw.as_of(bank, DECLARED, at=at, engine="sql")
    by_python = esw.as_of(bank, DECLARED, at=at, engine="python", workers=1)
    assert by_sql.equals(by_python)
    assert by_sql.dtypes.tolist() == by_python.dtypes.tolist()


def test_last_values_where_the_name_only_appears_or_is_spelled_with_escapes(
    tmp_path: Path,
) -> None:
    """A field's last value is the newest event's that holds it at the top level: not one that
    only names it in a string or a nested object, and also one that spells the key with escapes
    (the SQL engine reads JSON as the Python engine does)."""
    newest = {
        "decoy-string": '{"note": "balanceAfter"}',
        "decoy-nested": '{"nested": {"balanceAfter": 9}}',
        "escaped-key": '{"balance\\u0041fter": 7}',
        "escaped-value": '{"x": "\\u00e9"}',
        "json-null": '{"balanceAfter": null}',
        "quoted-name": '{"a\\"b": 2, "note": "a\\"b"}',
    }
    lines = []
    for i, (stream, text) in enumerate(newest.items()):
        for version, data in enumerate(['{"balanceAfter": 5, "a\\"b": 1}', text], start=1):
            kind = "MoneyWithdrawn" if version == 1 else "Noted"
            lines.append(
                f'{{"eventId": "00000000-0000-0000-0000-{i:06d}{version:06d}", '
                f'"eventType": "{kind}", "aggregateId": "{stream}", "aggregateType": "Account", '
                f'"version": {version}, "timestamp": "2024-03-01T12:00:0{version}Z", '
                f'"data": {data}}}'
            )
    lines.append(
        '{"eventId": "00000000-0000-0000-0000-999999000001", "eventType": "Noted", '
        '"aggregateId": "never", "aggregateType": "Account", "version": 1, '
        '"timestamp": "2024-03-01T12:00:01Z", "data": {"other": 1}}'
    )
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = esw.open_store(tmp_path / "store")
    esw.import_events(store, tmp_path / "events.jsonl")
    balances = {
        "balance": esw.last("balanceAfter"),
        "withdrawn_balance": esw.last("balanceAfter", types="MoneyWithdrawn"),
        "n": esw.count(),
    }
    # Each fold on its own too: a stream one piece folds again must not hide another's answer.
    for fields in ({**balances, "quoted": esw.last('a"b')}, balances, {"quoted": esw.last('a"b')}):
        fold = esw.Aggregate("Account", fields=fields)
        by_sql = esw.as_of(store, fold, engine="sql").set_index("aggregate_id")
        by_python = esw.as_of(store, fold, engine="python", workers=1).set_index("aggregate_id")
        assert by_sql.equals(by_python)
    assert by_sql["quoted"].to_dict()["quoted-name"] == 2
    fold = esw.Aggregate("Account", fields=balances)
    by_sql = esw.as_of(store, fold, engine="sql").set_index("aggregate_id")
    assert by_sql["balance"].to_dict() == {
        "decoy-nested": 5,
        "decoy-string": 5,
        "escaped-key": 7,
        "escaped-value": 5,
        "json-null": None,
        "never": None,
        "quoted-name": 5,
    }
    assert set(by_sql["withdrawn_balance"]) == {5, None}


def test_min_and_max_ties_go_to_the_earliest_event_in_both_engines(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "store")
    for stream, amounts in {"a": ["5.0", "5", "4.50"], "b": ["5", "5.0", "4.5"]}.items():
        store.append_batch(
            [
                {"aggregate_id": stream, "aggregate_type": "Account", "event_type": "Moved",
                 "data": {"amount": Decimal(amount)}, "version": version}
                for version, amount in enumerate(amounts, start=1)
            ]
        )  # fmt: skip
    fold = esw.Aggregate(
        "Account",
        fields={"low": esw.min("amount"), "high": esw.max("amount")},
        decimals=True,
    )
    by_sql = esw.as_of(store, fold, engine="sql")
    by_python = esw.as_of(store, fold, engine="python", workers=1)
    assert by_sql.equals(by_python)
    assert [str(v) for v in by_sql["high"]] == ["5.0", "5"]
    assert by_sql["low"].tolist() == [Decimal("4.5")] * 2


@pytest.mark.parametrize("at", [None, T0 - timedelta(days=1)])
def test_sql_and_python_engines_agree_in_polars_even_with_no_stream(
    bank: esw.Store, at: datetime | None
) -> None:
    by_sql = esw.as_of(bank, DECLARED, at=at, engine="sql", output="polars")
    by_python = esw.as_of(bank, DECLARED, at=at, engine="python", workers=1, output="polars")
    assert isinstance(by_sql, pl.DataFrame)
    assert by_sql.equals(by_python)
    assert by_sql.schema["aggregate_id"] == by_python.schema["aggregate_id"] == pl.String
    assert by_sql.schema["version"] == by_python.schema["version"] == pl.Int64


def test_as_of_the_last_instant_equals_replay_of_each_stream(bank: esw.Store) -> None:
    frame = esw.as_of(bank, ACCOUNT, workers=1)
    for row in frame.to_dict("records"):
        state = esw.replay(bank, ACCOUNT, row["aggregate_id"])
        assert {k: row[k] for k in state} == state
        assert row["version"] == bank.stream_version(row["aggregate_id"])


def test_folds_from_a_notebook_cell_run_in_worker_processes(bank: esw.Store) -> None:
    bonus = Decimal("1.00")  # a closure: the fold travels to the workers with cloudpickle

    def with_bonus(state: Any, event: esw.Event) -> Any:
        return {**state, "balance": state["balance"] + event.data["amount"] + bonus}

    account = esw.Aggregate(
        "Account", initial={"balance": 0}, on={"MoneyDeposited": with_bonus}, decimals=True
    )
    parallel = esw.as_of(bank, account, workers=2, progress=False)
    assert parallel.equals(esw.as_of(bank, account, workers=1))
    assert parallel.set_index("aggregate_id").loc["acc-1", "balance"] == Decimal("107.15")


def test_a_non_dict_state_sits_in_one_column_and_polars_on_request(bank: esw.Store) -> None:
    counter = esw.Aggregate("Account", initial=0, on={"MoneyDeposited": lambda s, e: s + 1})
    frame = esw.as_of(bank, counter)
    assert frame[["aggregate_id", "state"]].values.tolist() == [["acc-1", 2], ["acc-2", 0]]
    polars = esw.as_of(bank, DECLARED, output="polars")
    assert isinstance(polars, pl.DataFrame)
    assert polars["aggregate_id"].to_list() == ["acc-1", "acc-2"]


def test_engine_sql_refuses_a_fold_with_handlers(bank: esw.Store) -> None:
    with pytest.raises(esw.EsWorkbenchError, match="not fully declared"):
        esw.as_of(bank, ACCOUNT, engine="sql")


def test_results_do_not_depend_on_file_layout_or_compaction(tmp_path: Path) -> None:
    one = esw.open_store(tmp_path / "one")
    many = esw.open_store(tmp_path / "many")
    events = [
        ev("MoneyDeposited", {"amount": Decimal(i) / 4}, T0 + timedelta(seconds=i))
        for i in range(1, 40)
    ]
    one.append("acc-1", events, aggregate_type="Account", expected_version=0)
    for i, event in enumerate(events):
        many.append("acc-1", [event], aggregate_type="Account", expected_version=i)
    before = esw.as_of(many, DECLARED, engine="python")
    assert before.drop(columns="last_event_at").equals(
        esw.as_of(one, DECLARED, engine="python").drop(columns="last_event_at")
    )
    many.compact()
    assert esw.as_of(many, DECLARED).equals(before)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_column_reaches_a_fold_of_every_stream(tmp_path: Path, workers: int) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append_batch(
        [
            {
                "aggregate_id": f"acc-{i % 7}",
                "aggregate_type": "Account",
                "event_type": "Touched",
                "data": {"n": i},
                "metadata": {"userId": f"user-{i}", "correlationId": f"c-{i}", "note": i},
                "timestamp": T0 + timedelta(seconds=i),
            }
            for i in range(60)
        ]
    )

    def touch(state: list[Any], event: esw.Event) -> list[Any]:
        seen = (event.user_id, event.correlation_id, event.causation_id, event.metadata["note"])
        return [*state, (event.event_id, event.aggregate_type, event.position, *seen)]

    fold = esw.Aggregate("Account", initial=[], on={"Touched": touch})
    frame = esw.as_of(store, fold, workers=workers, progress=False)
    for aggregate_id, state in zip(frame["aggregate_id"], frame["state"], strict=True):
        assert state == esw.replay(store, fold, aggregate_id)
        assert state[0][3] is not None


def test_engines_agree_on_the_demo_history(tmp_path: Path) -> None:
    from esworkbench.demo import write_demo
    from esworkbench.demo_folds import ACCOUNT as BANK
    from esworkbench.demo_folds import ACCOUNT_SUMMARY

    store = esw.open_store(tmp_path / "demo")
    write_demo(store, 30_000, seed=3, batch_size=7_000)
    first, last = store.sql("select min(recorded_at), max(recorded_at) from events").fetchall()[0]
    for at in (None, first + (last - first) / 3):
        by_sql = esw.as_of(store, ACCOUNT_SUMMARY, at=at, engine="sql")
        by_python = esw.as_of(store, ACCOUNT_SUMMARY, at=at, engine="python", workers=2)
        assert by_sql.equals(by_python)
        # The Python fold's exact balance agrees with the balanceAfter the generator wrote.
        # Where an account's last event carries balanceAfter (schema_version 1 deposits do not),
        # the Python fold's exact balance equals the one the generator wrote.
        balances = esw.as_of(store, BANK, at=at, workers=2).set_index("aggregate_id")["balance"]
        declared = by_sql.set_index("aggregate_id")["balance"]
        carried = store.sql(
            "select aggregate_id from events where aggregate_type = 'Account' "
            "and recorded_at <= coalesce(?, recorded_at) group by aggregate_id "
            "having arg_max(json_exists(data, '$.balanceAfter'), version)",
            [at],
        ).fetchall()
        ids = [row[0] for row in carried]
        assert len(ids) > 100
        assert (balances[ids] == declared[ids]).all()


IDENTITY_MODULE = """
import esworkbench as esw

RATE = 2

def scale(amount):
    return amount * {factor}

def deposit(state, event):
    return {{**state, "balance": state["balance"] + scale(event.data["amount"])}}

fold = esw.Aggregate("Account", initial={{"balance": 0}}, on={{"MoneyDeposited": deposit}})
"""


def _identity_in_a_new_process(path: Path) -> str:
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('folds', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.fold.identity)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_folds_identity_is_stable_and_follows_the_helpers_it_calls(tmp_path: Path) -> None:
    path = tmp_path / "folds.py"
    path.write_text(IDENTITY_MODULE.format(factor=1))
    first = _identity_in_a_new_process(path)
    assert first == _identity_in_a_new_process(path)  # the same in every process
    path.write_text(IDENTITY_MODULE.format(factor=100))  # only the helper changes
    assert _identity_in_a_new_process(path) != first


def _fold_reading(rate: object, fee: object) -> Aggregate:
    """A fold whose handler reads a global value and a module attribute, as a notebook's does."""
    import types

    fees = types.ModuleType("fees")
    fees.fee = fee  # type: ignore[attr-defined]
    scope: dict[str, Any] = {"rate": rate, "fees": fees}
    exec(
        "def deposit(state, event):\n    return state + event.data['amount'] * rate - fees.fee\n",
        scope,
    )
    return esw.Aggregate("Account", initial=0, on={"MoneyDeposited": scope["deposit"]})


def test_a_folds_identity_follows_the_globals_it_reads(tmp_path: Path) -> None:
    """A snapshot is keyed by the fold: a changed global value (a notebook's ``rate = 2``) or
    module attribute is a changed fold, so a replay never starts from the old fold's state."""
    assert _fold_reading(2, 1).identity == _fold_reading(2, 1).identity
    assert _fold_reading(3, 1).identity != _fold_reading(2, 1).identity
    assert _fold_reading(2, 5).identity != _fold_reading(2, 1).identity
    store = esw.open_store(tmp_path / "s")
    deposits = [esw.NewEvent("MoneyDeposited", {"amount": 1})] * 4
    store.append("a", deposits, aggregate_type="Account")
    esw.snapshot(store, _fold_reading(2, 0), "a")
    assert esw.replay(store, _fold_reading(3, 0), "a", snapshots=True) == 12


def test_a_handler_that_raises_in_a_worker_process_names_the_event(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append_batch(
        [
            {"aggregate_id": f"a{i % 5}", "aggregate_type": "A", "event_type": "E",
             "data": {"x": i}}
            for i in range(50)
        ]
    )  # fmt: skip

    def boom(state: Any, event: esw.Event) -> Any:
        if event.data["x"] == 33:
            raise ValueError("boom")
        return state

    with pytest.raises(esw.FoldError, match=r"ValueError: boom at stream 'a3' version 7") as err:
        esw.as_of(store, esw.Aggregate("A", initial={}, on={"E": boom}), workers=2)
    assert (err.value.aggregate_id, err.value.version) == ("a3", 7)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_stream_comes_out_whole_however_the_ids_are_cut(tmp_path: Path, workers: int) -> None:
    from esworkbench.parallel import _ranges, fold_columns

    store = esw.open_store(tmp_path / "s")
    for commit in range(6):  # several files, each sorted, their id ranges overlapping
        store.append_batch(
            [
                {"aggregate_id": f"s{(commit * 7 + i) % 23:02d}", "aggregate_type": "A",
                 "event_type": "E", "data": {"n": commit * 100 + i}}
                for i in range(17)
            ]
        )  # fmt: skip
    fold = esw.Aggregate("A", initial=[], on={"E": lambda s, e: [*s, e.data["n"]]})
    expected = {
        row[0]: esw.replay(store, fold, row[0])
        for row in store.sql("select aggregate_id from streams").fetchall()
    }
    for chunk_events in (1, 7, 1000):
        rows = fold_columns(
            store, fold, "true", [], workers=workers, chunk_events=chunk_events
        ).rows()
        assert [r[0] for r in rows] == sorted(expected)
        assert {r[0]: r[3] for r in rows} == expected
    cuts = _ranges(store, "true", ["A"], 7)  # the cut a foreign lake gets: by stream counts
    assert cuts[0][0] is None
    assert cuts[-1][1] is None
    assert sum(size for _, _, size in cuts) == 6 * 17


def test_numbers_beyond_sql_decimals_are_folded_exactly(tmp_path: Path) -> None:
    """SQL sums and compares DECIMAL(38, 18): past it (a 26-digit amount, 21 decimals) the
    declared fold is answered by the Python engine, never by a sum that skipped a value."""
    store = esw.open_store(tmp_path / "s")
    amounts = {
        "c": [10**25, 1],
        "n": [5, -(10**21)],
        "m": [Decimal("1E-21"), Decimal("2E-21")],
        "p": [5 * 10**20, 1],  # a double DuckDB writes without an exponent, past 20 digits
    }
    for stream, values in amounts.items():
        events = [esw.NewEvent("MoneyDeposited", {"amount": x}) for x in values]
        store.append(stream, events, aggregate_type="Account")
    fold = esw.Aggregate(
        "Account",
        fields={"s": esw.sum("amount"), "hi": esw.max("amount"), "lo": esw.min("amount")},
        decimals=True,
    )
    auto = esw.as_of(store, fold).set_index("aggregate_id")
    python = esw.as_of(store, fold, engine="python").set_index("aggregate_id")
    assert auto.to_dict() == python.to_dict()
    assert auto.loc["c", "s"] == 10**25 + 1
    assert (auto.loc["n", "hi"], auto.loc["n", "lo"]) == (5, -(10**21))
    assert auto.loc["m", "s"] == Decimal("3E-21")
    assert auto.loc["p", "s"] == 5 * 10**20 + 1
    with pytest.raises(esw.EsWorkbenchError, match=r"beyond DECIMAL\(38, 18\).*engine='python'"):
        esw.as_of(store, fold, engine="sql")
    timeline = esw.timeline(store, fold)
    assert timeline.groupby("aggregate_id")["s"].last().to_dict() == auto["s"].to_dict()
    changed = esw.population_diff(
        store, fold, before="2000-01-01T00:00:00Z", after=datetime.now(UTC)
    )
    assert changed.appeared == 4
    # Within DECIMAL(38, 18) SQL answers exactly: a UBIGINT and a fraction.
    within = [Decimal("12345678901234567890"), Decimal("0.125")]
    events = [esw.NewEvent("MoneyDeposited", {"amount": x}) for x in within]
    other = esw.open_store(tmp_path / "within")
    other.append("w", events, aggregate_type="Account")
    total = Decimal("12345678901234567890.125")  # 23 digits: within sum()'s 28 too
    assert esw.as_of(other, fold, engine="sql")["s"].tolist() == [total]


def test_a_strict_declared_fold_refuses_unknown_types_in_sql_too(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append("b", [esw.NewEvent("MoneyDeposited", {"amount": 1})], aggregate_type="Account")
    store.append("a", [esw.NewEvent("MoneyDeposited", {"amount": 1}),
                       esw.NewEvent("AccountClosed", {})], aggregate_type="Account")  # fmt: skip
    strict = esw.Aggregate(
        "Account", fields={"paid": esw.sum("amount", types="MoneyDeposited")}, unknown="error"
    )
    message = r"no handler for event type 'AccountClosed' \(stream 'a', version 2\)"
    for engine in ("auto", "sql", "python"):
        with pytest.raises(esw.FoldError, match=message):
            esw.as_of(store, strict, engine=engine)  # type: ignore[arg-type]
    with pytest.raises(esw.FoldError, match=message):
        esw.timeline(store, strict)
    before = datetime(2000, 1, 1, tzinfo=UTC)
    with pytest.raises(esw.FoldError, match=message):
        esw.population_diff(store, strict, before=before, after=datetime.now(UTC))
    lenient = esw.Aggregate("Account", fields={"paid": esw.sum("amount", types="MoneyDeposited")})
    assert esw.as_of(store, lenient)["paid"].tolist() == [1, 1]


def test_payload_fields_named_like_the_frames_columns(tmp_path: Path) -> None:
    """The generic fold merges payloads, and payloads carry ``version`` or ``user_id``: such a
    state field comes as ``state.<name>`` beside the frame's own column, in both outputs."""
    store = esw.open_store(tmp_path / "s")
    data = {"version": "v2-draft", "user_id": "u-9", "aggregate_id": "x", "title": "Hi"}
    store.append("doc-1", [esw.NewEvent("Drafted", data)], aggregate_type="Doc")
    fold = esw.generic("Doc")
    row = esw.as_of(store, fold).iloc[0]
    assert (row["version"], row["state.version"], row["state.aggregate_id"]) == (1, "v2-draft", "x")
    assert esw.as_of(store, fold, output="polars")["state.version"].to_list() == ["v2-draft"]
    line = esw.timeline(store, fold, "doc-1").iloc[0]
    assert (line["user_id"], line["state.user_id"], line["title"]) == (None, "u-9", "Hi")
    declared = esw.Aggregate("Doc", fields={"version": esw.last("version")})
    assert esw.as_of(store, declared)[["version", "state.version"]].values.tolist() == [
        [1, "v2-draft"]
    ]


def test_polars_columns_keep_values_of_mixed_types(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    values = [1, 2.5, "txt", {"nested": [1, 2]}]
    for i, value in enumerate(values):
        store.append(f"t-{i}", [esw.NewEvent("Set", {"x": value})], aggregate_type="T")
    store.append("t-9", [esw.NewEvent("Set", {"x": {"other": True}})], aggregate_type="T")
    frame = esw.as_of(store, esw.generic("T"), output="polars")
    assert frame["x"].dtype == pl.Object
    assert frame["x"].to_list() == [*values, {"other": True}]
    timeline = esw.timeline(store, esw.generic("T"), "t-3", output="polars")
    assert timeline["x"].to_list() == [{"nested": [1, 2]}]
    typed = esw.as_of(store, esw.Aggregate("T", fields={"n": esw.count()}), output="polars")
    assert typed["n"].dtype == pl.Int64


def test_a_frame_with_no_stream_has_the_states_columns(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append("a", [esw.NewEvent("Counted", {})], aggregate_type="Counter")
    counter = esw.Aggregate("Counter", initial=0, on={"Counted": lambda n, e: n + 1})
    assert esw.as_of(store, counter)["state"].tolist() == [1]
    empty = esw.as_of(store, counter, at=datetime(2000, 1, 1, tzinfo=UTC))
    assert list(empty.columns) == ["aggregate_id", "version", "last_event_at", "state"]
