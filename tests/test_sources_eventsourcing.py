"""Reading what the eventsourcing library itself recorded, in SQLite and in PostgreSQL."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from psycopg import sql

from esworkbench.errors import EsWorkbenchError, QueryError
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources.eventsourcing import (
    EVENT_ID_NAMESPACE,
    eventsourcing_event_at,
    read_eventsourcing,
    read_eventsourcing_snapshots,
)
from esworkbench.sources.postgres import SNAPSHOT_SOURCE_SCHEMA

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BIG = Decimal("12345678901234567890.000000001")
OPENED_AT = datetime(
    2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))
)
REF = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")


class Account(Aggregate):
    """An aggregate whose events carry the library's wrapped types."""

    @event("Opened")
    def __init__(self, owner: str, ref: uuid.UUID, opened_at: datetime, limit: Decimal) -> None:
        self.owner = owner
        self.balance = Decimal(0)

    @event("Deposited")
    def deposit(self, amount: Decimal, note: str, refs: list[Any]) -> None:
        self.balance += amount

    class Renamed(Aggregate.Event):
        class_version = 2
        owner: str

        def apply(self, aggregate: Aggregate) -> None:
            aggregate.owner = self.owner  # type: ignore[attr-defined]

    def rename(self, owner: str) -> None:
        self.trigger_event(self.Renamed, owner=owner)


class Bank(Application[uuid.UUID]):
    snapshotting_intervals = {Account: 2}  # noqa: RUF012 - the library reads a class attribute


# The library's PostgreSQL recorder inserts in psycopg's pipeline mode, which can stall on large
# statements (psycopg issue 685): there, large events are written outside the pipeline.
LARGE = 1_000_000


def history(app: Bank, note: int = LARGE) -> tuple[Account, Account]:
    """Two interleaved accounts: unicode, exact decimals, wrapped values nested, a long note."""
    ann = Account("Zoë 😀", REF, OPENED_AT, Decimal("-0.00"))
    ben = Account("Ben", uuid.UUID(int=7), datetime(2024, 1, 1, tzinfo=UTC), Decimal("1E+3"))
    ann.deposit(BIG, "a, b: c", [REF, {"at": OPENED_AT, "d": Decimal("0.1")}, 1.5])
    app.save(ann, ben)
    ben.deposit(Decimal("2.50"), "x" * note, [])
    ann.rename("Anna")
    app.save(ben, ann)
    return ann, ben


def rows_of(source: str | Path, **options: Any) -> list[dict[str, Any]]:
    batches = list(read_eventsourcing(source, **options))
    assert all(b.schema == SOURCE_SCHEMA for b in batches)
    return [r for b in batches for r in b.to_pylist()]


def check_history(
    app: Bank, rows: list[dict[str, Any]], ann: Account, ben: Account, note: int = LARGE
) -> None:
    """Every column of every row against the domain events the library gives back."""
    assert [r["source_position"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    by_id = {str(a.id): list(app.events.get(a.id)) for a in (ann, ben)}
    for row in rows:
        domain = by_id[row["aggregate_id"]][row["version"] - 1]
        # The documented derivation: uuid5 over "<aggregate_id>/<version>".
        name = f"{row['aggregate_id']}/{row['version']}"
        assert row["event_id"] == str(uuid.uuid5(EVENT_ID_NAMESPACE, name))
        assert row["event_type"] == type(domain).__name__
        assert row["aggregate_type"] == "Account"
        assert row["recorded_at"] == row["occurred_at"] == domain.timestamp
        assert (row["correlation_id"], row["causation_id"], row["user_id"]) == (None, None, None)
        metadata = json.loads(row["metadata"])
        assert metadata["topic"] == f"{Account.__module__}:{type(domain).__qualname__}"
    at = {(r["aggregate_id"], r["version"]): r for r in rows}
    opened, deposit, renamed = (at[str(ann.id), v] for v in (1, 2, 3))
    assert [(r["aggregate_id"], r["version"]) for r in rows] == [
        (str(ann.id), 1), (str(ann.id), 2), (str(ben.id), 1), (str(ben.id), 2), (str(ann.id), 3),
    ]  # fmt: skip
    assert json.loads(opened["data"], parse_float=Decimal) == {
        "owner": "Zoë 😀",
        "ref": str(REF),
        "opened_at": OPENED_AT.isoformat(),
        "limit": Decimal("-0.00"),
    }
    assert '"limit":-0.00' in opened["data"]
    assert json.loads(opened["metadata"]) == {
        "topic": f"{Account.__module__}:Account.Opened",
        "originator_topic": f"{Account.__module__}:Account",
        "transcoded": {"/ref": "uuid_hex", "/opened_at": "datetime_iso", "/limit": "decimal_str"},
    }
    assert at[str(ben.id), 1]["data"] == (
        '{"owner":"Ben","ref":"00000000-0000-0000-0000-000000000007",'
        '"opened_at":"2024-01-01T00:00:00+00:00","limit":1E+3}'
    )
    assert deposit["data"] == (
        '{"amount":12345678901234567890.000000001,"note":"a, b: c","refs":['
        f'"{REF}",{{"at":"{OPENED_AT.isoformat()}","d":0.1}},1.5]}}'
    )
    assert json.loads(deposit["metadata"])["transcoded"] == {
        "/amount": "decimal_str",
        "/refs/0": "uuid_hex",
        "/refs/1/at": "datetime_iso",
        "/refs/1/d": "decimal_str",
    }
    assert len(at[str(ben.id), 2]["data"]) > note
    assert (renamed["event_type"], renamed["schema_version"]) == ("Renamed", 2)
    assert renamed["data"] == '{"owner":"Anna"}'


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Iterator[tuple[Bank, Path]]:
    path = tmp_path / "bank.db"
    app = Bank(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)})
    yield app, path
    app.close()


def test_sqlite_history_round_trips(sqlite_app: tuple[Bank, Path]) -> None:
    app, path = sqlite_app
    ann, ben = history(app)
    rows = rows_of(f"sqlite:///{path}")
    check_history(app, rows, ann, ben)
    # The aggregate type is found across batches: the opening events are in the first one.
    assert rows_of(path, batch_size=1) == rows
    assert rows_of(str(path)) == rows  # a plain path is a SQLite file too
    assert rows_of(path, after=3) == rows[3:]
    assert eventsourcing_event_at(path, 3) == rows[2]["event_id"]
    assert eventsourcing_event_at(path, 99) is None


def test_sqlite_snapshots(sqlite_app: tuple[Bank, Path]) -> None:
    app, path = sqlite_app
    ann, _ = history(app)
    snapshots = [r for b in read_eventsourcing_snapshots(path) for r in b.to_pylist()]
    assert snapshots
    ours = [s for s in snapshots if s["aggregate_id"] == str(ann.id)]
    assert [s["version"] for s in ours] == [2]
    [snap] = ours
    assert snap["error"] is None
    assert snap["aggregate_type"] == "Account"
    state = json.loads(snap["state"], parse_float=Decimal)
    assert state["owner"] == "Zoë 😀"
    stored = app.snapshots.get(ann.id) if app.snapshots else []
    assert snap["taken_at"] == next(iter(stored)).timestamp
    assert json.loads(snap["metadata"])["topic"] == "eventsourcing.domain:Snapshot"


def test_sqlite_bad_rows(sqlite_app: tuple[Bank, Path]) -> None:
    app, path = sqlite_app
    ann, _ = history(app)
    orphan = uuid.UUID(int=99).hex
    stamp = {"_type_": "datetime_iso", "_data_": "2024-01-01T00:00:00+00:00"}
    bad = [
        (ann.id.hex, 4, "m:Account.Deposited", b"\x78\x9c\xcb\x48\xcd\xc9\xc9\x07\x00"),
        (ann.id.hex, 5, "m:Account.Deposited", json.dumps({"timestamp": stamp, "amount": {
            "_type_": "decimal_str", "_data_": "NaN"}}).encode()),
        (ann.id.hex, 6, "m:Account.Deposited", json.dumps({"amount": 1}).encode()),
        (orphan, 1, "m:Account.Deposited", json.dumps({"timestamp": stamp}).encode()),
        (ann.id.hex, 7, "m:Account.Deposited", b"[1, 2]"),
    ]  # fmt: skip
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT INTO stored_events VALUES (?, ?, ?, ?)", bad)
    db.close()
    rows = rows_of(path, after=5)
    assert [r["source_position"] for r in rows] == [6, 7, 8, 9, 10]
    errors = [r["error"] for r in rows]
    assert errors[0].startswith("field 'data': the state is not UTF-8 JSON")
    assert errors[1].startswith("field 'data': /amount holds decimal_str 'NaN'")
    assert errors[2] == "field 'recorded_at': the state has no timestamp (datetime_iso)"
    assert errors[3] == (
        "field 'aggregate_type': the aggregate's first event has no readable originator_topic"
    )
    assert errors[4] == "field 'data': the state must be a JSON object, got list"
    assert rows[0]["aggregate_type"] == "Account"
    assert rows[0]["version"] == 4
    assert rows[3]["aggregate_id"] == str(uuid.UUID(int=99))
    assert rows[3]["recorded_at"]


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(EsWorkbenchError, match="no SQLite file"):
        list(read_eventsourcing(f"sqlite:///{tmp_path}/missing.db"))
    sqlite3.connect(tmp_path / "empty.db").close()
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(EsWorkbenchError, match="refused"):
        list(read_eventsourcing(tmp_path / "empty.db"))
    with pytest.raises(EsWorkbenchError, match="batch_size"):
        list(read_eventsourcing(tmp_path / "empty.db", batch_size=0))


@pytest.fixture
def postgres_app() -> Iterator[tuple[Bank, str]]:
    """An application with its own table prefix in database test; its tables are dropped after."""
    name = f"Bank{uuid.uuid4().hex[:10]}"
    cls = type(name, (Bank,), {})
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "test",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": "5432",
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "",
    }
    app = cls(env=env)
    yield app, name
    app.close()
    with psycopg.connect(DSN, autocommit=True) as connection:
        for suffix in ("events", "snapshots"):
            table = sql.Identifier(f"{name.lower()}_{suffix}")
            connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))


@pytest.mark.postgres
def test_postgres_history_round_trips(postgres_app: tuple[Bank, str]) -> None:
    app, name = postgres_app
    ann, ben = history(app, note=1000)
    rows = rows_of(DSN, app=name)
    check_history(app, rows, ann, ben, note=1000)
    assert rows_of(DSN, app=name, batch_size=2, after=1) == rows[1:]
    assert eventsourcing_event_at(DSN, 2, app=name) == rows[1]["event_id"]
    assert eventsourcing_event_at(DSN, 0, app=name) is None
    snapshots = [r for b in read_eventsourcing_snapshots(DSN, app=name) for r in b.to_pylist()]
    assert [(s["aggregate_id"], s["version"]) for s in snapshots] == sorted(
        [(str(ann.id), 2), (str(ben.id), 2)]
    )
    assert all(s["error"] is None for s in snapshots)
    batches = list(read_eventsourcing_snapshots(DSN, app=name, batch_size=1))
    assert [b.num_rows for b in batches] == [1, 1]
    assert all(b.schema == SNAPSHOT_SOURCE_SCHEMA for b in batches)


@pytest.mark.postgres
def test_postgres_bad_state(postgres_app: tuple[Bank, str]) -> None:
    app, name = postgres_app
    ann, _ = history(app, note=1000)
    table = sql.Identifier(f"{name.lower()}_events")
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(
            sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state) "
                "VALUES (%s, 9, 'm:Account.Deposited', %s)"
            ).format(table),
            (ann.id, b"\xff\xfe not json"),
        )
    rows = rows_of(DSN, app=name, after=5)
    assert [r["source_position"] for r in rows] == [6]
    assert rows[0]["error"].startswith("field 'data': the state is not UTF-8 JSON")
    assert (rows[0]["aggregate_id"], rows[0]["version"]) == (str(ann.id), 9)


@pytest.mark.postgres
def test_postgres_lookups_while_the_stream_is_open(postgres_app: tuple[Bank, str]) -> None:
    """More than one COPY chunk (16 MB) of events, read in small batches: each batch's first
    events are looked up while the events' COPY is still open. The library encodes the large
    events; they are inserted one statement each, outside the pipeline."""
    app, name = postgres_app
    account = Account("Big", REF, OPENED_AT, Decimal(1))
    app.save(account)
    for _ in range(20):
        account.deposit(Decimal("0.01"), "é" * 600_000, [])
    stored = [app.mapper.to_stored_event(e) for e in account.collect_events()]
    table = sql.Identifier(f"{name.lower()}_events")
    insert = sql.SQL(
        "INSERT INTO {} (originator_id, originator_version, topic, state) VALUES (%s, %s, %s, %s)"
    ).format(table)
    with psycopg.connect(DSN, autocommit=True) as connection:
        for s in stored:
            connection.execute(insert, (s.originator_id, s.originator_version, s.topic, s.state))
    batches = list(read_eventsourcing(DSN, app=name, batch_size=3))
    assert [b.num_rows for b in batches] == [3] * 7
    rows = [r for b in batches for r in b.to_pylist()]
    assert [r["version"] for r in rows] == list(range(1, 22))
    assert {(r["aggregate_type"], r["error"]) for r in rows} == {("Account", None)}
    assert len(rows[-1]["data"]) > 600_000


@pytest.mark.postgres
def test_postgres_application_without_tables() -> None:
    with pytest.raises(QueryError, match="PostgreSQL refused"):
        list(read_eventsourcing(DSN, app=f"Nothing{uuid.uuid4().hex[:8]}"))
