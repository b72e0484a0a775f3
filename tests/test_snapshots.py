"""Snapshots: exact states, taken on demand or every N events, loaded before a tail, imported."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

import esworkbench as esw
from esworkbench._snapshot_table import files, table_path
from esworkbench._statejson import StateError, dumps_state, loads_state

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def deposit(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    return {**state, "balance": state["balance"] + event.data["amount"], "seen": event.version}


ACCOUNT = esw.Aggregate(
    "Account",
    initial={"balance": Decimal(0), "seen": 0},
    on={"MoneyDeposited": deposit},
    decimals=True,
)


def deposits(store: esw.Store, stream: str, amounts: list[str], start: datetime = T0) -> None:
    store.append(
        stream,
        [
            esw.NewEvent(
                "MoneyDeposited", {"amount": Decimal(a)}, recorded_at=start + i * timedelta(hours=1)
            )
            for i, a in enumerate(amounts)
        ],
        aggregate_type="Account",
    )


def rows(store: esw.Store) -> list[tuple[Any, ...]]:
    return store.sql(
        "SELECT aggregate_id, version, fold_key FROM snapshots ORDER BY aggregate_id, version"
    ).fetchall()


# -- the state encoding -------------------------------------------------------------------------

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False),
    st.datetimes(timezones=st.sampled_from([None, UTC, ZoneInfo("Europe/Berlin")])),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    st.binary(max_size=8),
)
_hashables = st.one_of(st.integers(), st.text(max_size=3), st.tuples(st.integers()))
_states = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(_hashables, inner, max_size=3),
        st.sets(_hashables, max_size=3),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True is not enough here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, datetime | time):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(_states, st.booleans())
def test_states_round_trip_exactly(state: Any, decimals: bool) -> None:
    text = dumps_state(state, decimals=decimals)
    pa.array([text])  # storable as UTF-8
    assert same(loads_state(text, decimals=decimals), state)


def test_plain_states_stay_plain_json() -> None:
    state = {"balance": Decimal("10.10"), "owner": "Zoë", "n": 3, "ok": None}
    text = dumps_state(state, decimals=True)
    assert text == '{"balance":10.10,"owner":"Zoë","n":3,"ok":null}'
    assert json.loads(text, parse_float=Decimal) == state
    assert dumps_state({"x": 0.1}, decimals=False) == '{"x":0.1}'


def test_a_state_that_cannot_round_trip_is_refused_clearly(tmp_path: Path) -> None:
    class Money:
        pass

    with pytest.raises(StateError, match=r"a Money at \.wallet\[1\].*Hint:"):
        dumps_state({"wallet": [1, Money()]}, decimals=False)
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1", "2"])
    odd = esw.Aggregate("Account", initial=None, on={"MoneyDeposited": lambda s, e: Money()})
    with pytest.raises(
        StateError, match=r"a Money at the top .*, in stream 'acc-1', version 2\. Hint"
    ):
        esw.snapshot(store, odd, "acc-1")
    assert not list(table_path(store).glob("*.parquet"))  # the uncommitted file is gone


# -- taking and using snapshots -----------------------------------------------------------------


def test_on_demand_at_the_head_or_a_version(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1.10", "2.20", "3.30", "4.40"])
    assert not table_path(store).exists()  # created on the first write
    assert store.sql("SELECT count(*) FROM snapshots").fetchall() == [(0,)]
    assert esw.snapshot(store, ACCOUNT, "acc-1", version=2) == 1
    assert esw.snapshot(store, ACCOUNT, "acc-1") == 1
    assert esw.snapshot(store, ACCOUNT, "acc-1") == 0  # already there
    key = ACCOUNT.identity
    assert rows(store) == [("acc-1", 2, key), ("acc-1", 4, key)]
    [(state, taken_at)] = store.sql(
        "SELECT state, taken_at FROM snapshots WHERE version = 2"
    ).fetchall()
    assert state == '{"balance":3.30,"seen":2}'
    assert taken_at.tzinfo is not None
    for version in (None, 1, 2, 3, 4):
        full = esw.replay(store, ACCOUNT, "acc-1", version=version)
        assert esw.replay(store, ACCOUNT, "acc-1", version=version, snapshots=True) == full
    assert esw.replay(store, ACCOUNT, "acc-1", snapshots=True) == {
        "balance": Decimal("11.00"),
        "seen": 4,
    }


def test_a_snapshot_is_really_used_and_keyed_by_the_fold(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1", "2", "3"])
    # An explicit key that stays while the code changes shows the snapshot is what replay reads.
    pinned = esw.Aggregate("Account", initial={"balance": 0, "seen": 0},
                           on={"MoneyDeposited": deposit}, key="pinned")  # fmt: skip
    esw.snapshot(store, pinned, "acc-1", version=2)
    doubled = esw.Aggregate(
        "Account",
        initial={"balance": 0, "seen": 0},
        on={"MoneyDeposited": lambda s, e: {**s, "balance": s["balance"] + 2 * e.data["amount"]}},
        key="pinned",
    )
    assert esw.replay(store, doubled, "acc-1", snapshots=True)["balance"] == 3 + 6
    # Derived keys change with the code, so a changed fold never meets the old snapshot.
    first = esw.Aggregate("Account", initial={"balance": 0, "seen": 0},
                          on={"MoneyDeposited": deposit})  # fmt: skip
    changed = esw.Aggregate(
        "Account",
        initial={"balance": 0, "seen": 0},
        on={"MoneyDeposited": lambda s, e: {**s, "balance": s["balance"] + 2 * e.data["amount"]}},
    )
    assert first.identity != changed.identity
    esw.snapshot(store, first, "acc-1", version=2)
    assert esw.replay(store, changed, "acc-1", snapshots=True)["balance"] == 12
    up = esw.Upcasters()
    up.add("MoneyDeposited", 1, lambda d: {"amount": d["amount"] * 10})
    upcast = esw.Aggregate("Account", initial={"balance": 0, "seen": 0},
                           on={"MoneyDeposited": deposit}, upcasters=up)  # fmt: skip
    assert upcast.identity != first.identity
    assert esw.replay(store, upcast, "acc-1", snapshots=True)["balance"] == 60


def test_every_n_for_every_stream_in_small_batches(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    for i, n in enumerate([7, 3, 12, 1]):
        deposits(store, f"acc-{i}", [str(v) for v in range(1, n + 1)])
    store.append("ord-1", [esw.NewEvent("OrderPlaced", {})] * 5, aggregate_type="Order")
    assert esw.snapshot(store, ACCOUNT, every=3, batch_size=4) == 2 + 1 + 4
    assert [(a, v) for a, v, _ in rows(store)] == [
        ("acc-0", 3), ("acc-0", 6), ("acc-1", 3),
        ("acc-2", 3), ("acc-2", 6), ("acc-2", 9), ("acc-2", 12),
    ]  # fmt: skip
    assert esw.snapshot(store, ACCOUNT, every=3) == 0
    # each stream at min(5, head); acc-1 at 3 is there already
    assert esw.snapshot(store, ACCOUNT, version=5) == 3
    for stream, state in zip(["acc-0", "acc-2"], [{"balance": 15}, {"balance": 15}], strict=True):
        stored = store.sql(
            "SELECT state FROM snapshots WHERE aggregate_id = ? AND version = 5", [stream]
        ).fetchall()
        assert json.loads(stored[0][0])["balance"] == state["balance"]
    for i in range(4):
        for version in range(0, store.stream_version(f"acc-{i}") + 1):
            full = esw.replay(store, ACCOUNT, f"acc-{i}", version=version)
            assert esw.replay(store, ACCOUNT, f"acc-{i}", version=version, snapshots=True) == full
    assert len(files(store)) == 2  # one file per commit; a call with nothing new commits nothing
    with pytest.raises(esw.EsWorkbenchError, match="every=0 must be a positive integer"):
        esw.snapshot(store, ACCOUNT, every=0)


def test_at_uses_only_snapshots_within_what_was_recorded(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    # recorded_at goes back in this stream (an import of a messy source): v3 was recorded first
    at = [T0, T0 + timedelta(hours=2), T0 - timedelta(hours=1), T0 + timedelta(hours=3)]
    store.append(
        "acc-1",
        [esw.NewEvent("MoneyDeposited", {"amount": 10**i}, recorded_at=t)
         for i, t in enumerate(at)],
        aggregate_type="Account",
    )  # fmt: skip
    esw.snapshot(store, ACCOUNT, every=1)
    instants = [*at, *(t - US for t in at), *(t + US for t in at), T0 + timedelta(hours=1)]
    for instant in instants:
        full = esw.replay(store, ACCOUNT, "acc-1", at=instant)
        assert esw.replay(store, ACCOUNT, "acc-1", at=instant, snapshots=True) == full, instant
    # exactly at v2's instant: v1, v2 and v3 are recorded; 1 µs before it v2 is not
    assert esw.replay(store, ACCOUNT, "acc-1", at=at[1], snapshots=True)["balance"] == 111
    assert esw.replay(store, ACCOUNT, "acc-1", at=at[1] - US, snapshots=True)["balance"] == 101


def test_bitemporal_questions_do_not_use_snapshots(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append(
        "acc-1",
        [
            esw.NewEvent("MoneyDeposited", {"amount": 1}, recorded_at=T0, occurred_at=T0),
            esw.NewEvent("MoneyDeposited", {"amount": 2}, recorded_at=T0 + US,
                         occurred_at=T0 + timedelta(days=1)),
            esw.NewEvent("MoneyDeposited", {"amount": 4}, recorded_at=T0 + 2 * US,
                         occurred_at=T0),
        ],
        aggregate_type="Account",
    )  # fmt: skip
    esw.snapshot(store, ACCOUNT, "acc-1", version=2)
    question = {"valid_at": T0, "known_at": T0 + timedelta(days=2)}
    full = esw.replay(store, ACCOUNT, "acc-1", **question)
    assert full["balance"] == 5
    assert esw.replay(store, ACCOUNT, "acc-1", snapshots=True, **question) == full


def test_declared_fields_resume_exactly(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    amounts = ["0.1", "0.2", "12345678901234.57", "-3.5", "0.3"]
    store.append(
        "acc-1",
        [esw.NewEvent("MoneyDeposited", {"amount": Decimal(a), "at": T0.isoformat()})
         for a in amounts],
        aggregate_type="Account",
    )  # fmt: skip
    for decimals in (False, True):
        declared = esw.Aggregate(
            "Account",
            fields={
                "total": esw.sum("amount"),
                "low": esw.min("amount"),
                "high": esw.max("amount"),
                "n": esw.count(),
                "first": esw.first_at(),
                "last_at": esw.last("at"),
            },
            decimals=decimals,
        )
        esw.snapshot(store, declared, "acc-1", every=2)
        for version in range(1, 6):
            full = esw.replay(store, declared, "acc-1", version=version)
            resumed = esw.replay(store, declared, "acc-1", version=version, snapshots=True)
            assert resumed == full
            assert {k: type(v) for k, v in resumed.items()} == {k: type(v) for k, v in full.items()}


def test_snapshots_of_an_attached_lake_are_refused(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1"])
    lake = esw.attach(str(store.table_path))
    with pytest.raises(esw.ReadOnlyError, match="cannot snapshot"):
        esw.snapshot(lake, ACCOUNT, "acc-1")  # type: ignore[arg-type]
    assert esw.replay(lake, ACCOUNT, "acc-1", snapshots=True) == esw.replay(store, ACCOUNT, "acc-1")


def test_another_process_sees_committed_snapshots(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1", "2", "3"])
    other = esw.open_store(tmp_path / "s")
    assert other.sql("SELECT count(*) FROM snapshots").fetchall() == [(0,)]
    esw.snapshot(store, ACCOUNT, "acc-1", every=1)
    assert esw.replay(other, ACCOUNT, "acc-1", version=2, snapshots=True)["seen"] == 2
    assert other.sql("SELECT count(*) FROM snapshots").fetchall() == [(3,)]
    esw.snapshot(store, ACCOUNT, "acc-1", every=1, version=3)
    deposits(store, "acc-1", ["4"])
    esw.snapshot(store, ACCOUNT, "acc-1")
    assert other.sql("SELECT max(version) FROM snapshots").fetchall() == [(4,)]


# -- the law: snapshot + tail == full replay ----------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, Any, int]], list[int], int, int]:
    n = draw(st.integers(1, 12))
    events = []
    for _ in range(n):
        kind = draw(st.sampled_from(["MoneyDeposited", "MoneyDeposited", "Renamed", "Tagged"]))
        value: Any = {
            "MoneyDeposited": st.decimals(-1000, 1000, places=2, allow_nan=False),
            "Renamed": st.text(max_size=4),
            "Tagged": st.lists(st.sampled_from("abc"), max_size=3),
        }[kind]
        gap = draw(st.integers(-2, 3))  # recorded_at may go back
        events.append((kind, draw(value), gap))
    snapshot_versions = draw(st.lists(st.integers(1, n), max_size=4, unique=True))
    target = draw(st.integers(0, n + 1))
    moment = draw(st.integers(-3, 3 * n + 3))
    return events, snapshot_versions, target, moment


def _rename(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    return {**state, "owner": event.data["name"], "names": (*state["names"], event.data["name"])}


def _tag(state: dict[str, Any], event: esw.Event) -> dict[str, Any]:
    return {**state, "tags": state["tags"] | set(event.data["tags"]), "at": event.recorded_at}


RICH = esw.Aggregate(
    "Account",
    initial={"balance": Decimal(0), "seen": 0, "owner": None, "names": (), "tags": set(),
             "at": None},
    on={"MoneyDeposited": deposit, "Renamed": _rename, "Tagged": _tag},
    fields={"deposits": esw.count(types="MoneyDeposited"), "low": esw.min("amount")},
    decimals=True,
)  # fmt: skip


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(histories())
def test_snapshot_plus_tail_is_the_full_replay(
    tmp_path: Path, history: tuple[list[tuple[str, Any, int]], list[int], int, int]
) -> None:
    events, versions, target, moment = history
    store = esw.open_store(tmp_path / uuid.uuid4().hex)
    recorded, new = T0, []
    for kind, value, gap in events:
        recorded += gap * timedelta(minutes=1)
        data = {"MoneyDeposited": {"amount": value}, "Renamed": {"name": value},
                "Tagged": {"tags": value}}[kind]  # fmt: skip
        new.append(esw.NewEvent(kind, data, recorded_at=recorded))
    store.append("acc-1", new, aggregate_type="Account")
    for version in versions:
        esw.snapshot(store, RICH, "acc-1", version=version)
    bound = T0 + moment * timedelta(minutes=1)
    questions = ({"version": min(target, len(events))}, {"at": bound}, {"at": bound - US}, {})
    for question in questions:
        full = esw.replay(store, RICH, "acc-1", **question)
        assert esw.replay(store, RICH, "acc-1", snapshots=True, **question) == full
    store.close()


# -- advice --------------------------------------------------------------------------------------


def test_advice_per_aggregate_type(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1"] * 3000)
    deposits(store, "acc-2", ["1"] * 10)
    store.append("ord-1", [esw.NewEvent("OrderPlaced", {})] * 2, aggregate_type="Order")
    advice = esw.snapshot_advice(store, target_ms=1.0)
    assert list(advice.columns) == [
        "aggregate_type", "streams", "events", "mean_events", "p99_events", "max_events",
        "events_per_second", "read_ms", "p99_replay_ms", "max_replay_ms", "suggested_interval",
    ]  # fmt: skip
    account, order = advice.to_dict("records")
    assert (account["aggregate_type"], account["streams"], account["events"]) == (
        "Account",
        2,
        3010,
    )
    assert (account["mean_events"], account["max_events"]) == (1505.0, 3000)
    assert account["events_per_second"] > 0
    assert account["max_replay_ms"] > account["read_ms"]
    interval = account["suggested_interval"]
    assert isinstance(interval, int)
    assert 1 <= interval < 3000
    assert str(interval)[0] in "125"
    assert set(str(interval)[1:]) <= {"0"}
    assert order["suggested_interval"] is None  # two events fold in microseconds
    only = esw.snapshot_advice(store, "Order", aggregate=esw.generic("Order"))
    assert only["aggregate_type"].tolist() == ["Order"]
    assert esw.snapshot_advice(store, "Nothing").empty


# -- imports ------------------------------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[tuple[psycopg.Connection[Any], str]]:
    name = f"esw_snap_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as connection:
        yield connection, name
        connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.postgres
def test_import_common_snapshots_and_adopt_them(
    tmp_path: Path, pg_table: tuple[psycopg.Connection[Any], str]
) -> None:
    pg, name = pg_table
    t = sql.Identifier(name)
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (aggregate_id TEXT, version BIGINT, data JSONB, timestamp TIMESTAMPTZ)"
        ).format(t)
    )
    # Deliberately not what our fold gives, to show which state a replay started from.
    rows = [("acc-1", 2, {"balance": 1000, "seen": 2}), ("acc-2", 1, {"balance": 7, "seen": 1}),
            ("ghost", 1, {"balance": 0, "seen": 1})]  # fmt: skip
    with pg.cursor() as cursor:
        cursor.executemany(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(t),
            [(a, v, Jsonb(s), T0) for a, v, s in rows],
        )
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1", "2", "3"])
    deposits(store, "acc-2", ["5"])
    with pytest.raises(esw.EsWorkbenchError, match=r"'ghost' version 1: field 'aggregate_type'"):
        esw.import_snapshots(store, DSN, table=name)
    assert not files(store)
    result = esw.import_snapshots(store, DSN, table=name, on_error="skip")
    assert (result.imported, result.skipped) == (2, 1)
    assert result.fold_key == f"import:common:{DSN}#{name}"
    stored = store.sql(
        "SELECT aggregate_type, aggregate_id, version, state, taken_at, fold_key FROM snapshots "
        "ORDER BY aggregate_id"
    ).fetchall()
    # jsonb orders keys by length: the state is kept as PostgreSQL gives it
    assert stored[0] == ("Account", "acc-1", 2, '{"seen":2,"balance":1000}', T0, result.fold_key)
    full = esw.replay(store, ACCOUNT, "acc-1")
    assert esw.replay(store, ACCOUNT, "acc-1", snapshots=True) == full  # not ours: unused
    adopted = esw.import_snapshots(
        store, DSN, table=name, fold_key=ACCOUNT.identity, aggregate_type="Account"
    )
    assert adopted.imported == 3
    assert esw.replay(store, ACCOUNT, "acc-1", snapshots=True) == {"balance": 1003, "seen": 3}
    again = esw.import_snapshots(store, DSN, table=name, fold_key=ACCOUNT.identity,
                                 aggregate_type="Account")  # fmt: skip
    assert again.imported == 0


@pytest.mark.postgres
def test_import_keeps_passwords_out_of_the_fold_key() -> None:
    from esworkbench.snapshots import _origin

    key = _origin("postgresql://bob:secret@db.example:5433/bank", "common", "snapshots")
    assert key == "import:common:postgresql://bob@db.example:5433/bank#snapshots"


def test_import_eventsourcing_snapshots_from_sqlite(tmp_path: Path) -> None:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):
        @event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.balance = Decimal(0)

        @event("Deposited")
        def deposit(self, amount: Decimal) -> None:
            self.balance += amount

    class Bank(Application[uuid.UUID]):
        snapshotting_intervals = {Account: 2}  # noqa: RUF012 - the library reads it

    path = tmp_path / "bank.db"
    app = Bank(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)})
    ann = Account("Ann")
    ann.deposit(Decimal("10.10"))
    ann.deposit(Decimal("0.05"))
    app.save(ann)
    app.close()
    store = esw.open_store(tmp_path / "s")
    esw.import_events(store, f"sqlite:///{path}", format="eventsourcing")
    result = esw.import_snapshots(store, f"sqlite:///{path}", format="eventsourcing")
    assert (result.imported, result.skipped) == (1, 0)
    assert result.fold_key == f"import:eventsourcing:sqlite:///{path}"
    [(kind, version, state)] = store.sql(
        "SELECT aggregate_type, version, state FROM snapshots"
    ).fetchall()
    assert (kind, version) == ("Account", 2)
    assert json.loads(state, parse_float=Decimal)["balance"] == Decimal("10.10")
    # Adopting them: a fold keyed by the imported fold_key starts from the library's state.
    library = esw.Aggregate(
        "Account",
        initial={},
        on={"Deposited": lambda s, e: {**s, "balance": s["balance"] + e.data["amount"]}},
        decimals=True,
        key=result.fold_key,
    )
    state = esw.replay(store, library, str(ann.id), snapshots=True)
    assert state["balance"] == Decimal("10.15")
    assert state["owner"] == "Ann"
    # A declared fold adopts them too: its running values are read back from the state.
    declared = esw.Aggregate(
        "Account",
        fields={"balance": esw.sum("amount", types="Deposited"), "top": esw.max("amount")},
        decimals=True,
        key=result.fold_key,
    )
    resumed = esw.replay(store, declared, str(ann.id), snapshots=True)
    assert (resumed["balance"], resumed["top"]) == (Decimal("10.15"), Decimal("0.05"))
    assert esw.replay(store, declared, str(ann.id))["top"] == Decimal("10.10")  # no snapshot


def test_snapshot_dates_and_times_survive_a_replay(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "s")
    deposits(store, "acc-1", ["1", "2"])
    timed = esw.Aggregate(
        "Account",
        initial={"days": (), "when": None},
        on={"MoneyDeposited": lambda s, e: {
            "days": (*s["days"], e.recorded_at.date()),
            "when": e.recorded_at.timetz(),
            "span": e.recorded_at - T0,
        }},
    )  # fmt: skip
    esw.snapshot(store, timed, "acc-1", version=1)
    full = esw.replay(store, timed, "acc-1")
    assert esw.replay(store, timed, "acc-1", snapshots=True) == full
    assert full["days"] == (date(2024, 3, 1), date(2024, 3, 1))
    zoned = time(13, tzinfo=ZoneInfo("Europe/Berlin"))  # its offset depends on a date it lacks
    with pytest.raises(StateError, match="a time with a zone other than a fixed offset"):
        dumps_state({"when": zoned}, decimals=False)


@pytest.mark.postgres
def test_import_eventsourcing_snapshots_from_postgres(tmp_path: Path) -> None:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):
        @event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.balance = Decimal(0)

        @event("Deposited")
        def deposit(self, amount: Decimal) -> None:
            self.balance += amount

    name = f"Bank{uuid.uuid4().hex[:10]}"
    bank = type(name, (Application,), {"snapshotting_intervals": {Account: 2}})
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "test",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": "5432",
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "",
    }
    app = bank(env=env)
    try:
        ann, ben = Account("Ann"), Account("Ben")
        for account in (ann, ben):
            account.deposit(Decimal("10.10"))
        ann.deposit(Decimal("1"))
        ann.deposit(Decimal("2"))
        app.save(ann, ben)
        store = esw.open_store(tmp_path / "s")
        esw.import_events(store, DSN, format="eventsourcing", table=name)
        result = esw.import_snapshots(store, DSN, format="eventsourcing", table=name)
        assert (result.imported, result.skipped) == (3, 0)  # ann at 2 and 4, ben at 2
        assert result.fold_key == f"import:eventsourcing:{DSN}#{name}"
        versions = store.sql(
            "SELECT aggregate_id, version FROM snapshots ORDER BY aggregate_id, version"
        ).fetchall()
        assert sorted(versions) == sorted([(str(ann.id), 2), (str(ann.id), 4), (str(ben.id), 2)])
        library = esw.Aggregate(
            "Account",
            initial={},
            on={"Deposited": lambda s, e: {**s, "balance": s["balance"] + e.data["amount"]}},
            decimals=True,
            key=result.fold_key,
        )
        resumed = esw.replay(store, library, str(ann.id), snapshots=True)
        assert resumed["balance"] == Decimal("13.10")
    finally:
        app.close()
        with psycopg.connect(DSN, autocommit=True) as connection:
            for suffix in ("events", "snapshots"):
                table = sql.Identifier(f"{name.lower()}_{suffix}")
                connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))


def test_compaction_keeps_what_replays_use_and_drops_stale_folds(tmp_path: Path) -> None:
    from esworkbench.snapshots import compact_snapshots

    store = esw.open_store(tmp_path / "s")
    for i in range(3):
        deposits(store, f"acc-{i}", [str(v) for v in range(1, 7)])
    reader = esw.open_store(tmp_path / "s")  # another handle that listed the old files
    esw.snapshot(store, ACCOUNT, every=2)
    assert esw.snapshot(store, ACCOUNT, "acc-1") == 0  # its head, 6, is there already
    stale = esw.Aggregate("Account", initial={"balance": 0, "seen": 0},
                          on={"MoneyDeposited": deposit})  # fmt: skip
    esw.snapshot(store, stale, every=3)
    assert esw.replay(reader, ACCOUNT, "acc-1", version=5, snapshots=True)["seen"] == 5
    assert len(files(store)) == 2
    assert compact_snapshots(store) == (9 + 6, 0)
    assert len(files(store)) == 1
    assert compact_snapshots(store, keep=[ACCOUNT]) == (9, 6)
    assert {key for *_, key in rows(store)} == {ACCOUNT.identity}
    for i in range(3):
        for version in (None, 3, 5):
            full = esw.replay(store, ACCOUNT, f"acc-{i}", version=version)
            assert esw.replay(store, ACCOUNT, f"acc-{i}", version=version, snapshots=True) == full
            assert esw.replay(reader, ACCOUNT, f"acc-{i}", version=version, snapshots=True) == full
    assert compact_snapshots(store, keep=["nothing"]) == (0, 9)
    assert files(store) == []
    assert esw.snapshot(store, ACCOUNT, "acc-0") == 1
    assert rows(store) == [("acc-0", 6, ACCOUNT.identity)]


def test_a_fresh_handle_sees_the_snapshots_view(tmp_path: Path) -> None:
    writer = esw.open_store(tmp_path / "s")
    writer.append("acc-1", [{"event_type": "Opened", "data": {"n": 1}}],
                  aggregate_type="Account", expected_version=0)  # fmt: skip
    assert esw.snapshot(writer, esw.generic("Account"), "acc-1") == 1
    reader = esw.open_store(tmp_path / "s")  # no snapshot function ran on this handle
    assert reader.sql("select aggregate_id, version from snapshots").fetchall() == [("acc-1", 1)]
