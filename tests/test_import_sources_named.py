"""How an import names its source: the eventsourcing application found on its own, a schema in
``table=``, a password that never reaches the store, and ``esw import`` into a new store."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent
from psycopg import sql

import esworkbench as esw
from esworkbench.cli import main
from esworkbench.errors import EsWorkbenchError

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class Wallet(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = Decimal(0)

    @event("Credited")
    def credit(self, amount: Decimal) -> None:
        self.balance += amount


def _in_schema(schema: str) -> str:
    """DSN whose search path is ``schema`` only (as an application's own database would be)."""
    return f"{DSN}?options=-csearch_path%3D{schema}"


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh PostgreSQL schema in database test, dropped with all it holds afterwards."""
    name = f"esw_named_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def _postgres_env(schema: str) -> dict[str, str]:
    """The library's settings for its PostgreSQL recorder in database test, in ``schema``."""
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "test",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": "5432",
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "",
        "POSTGRES_SCHEMA": schema,
    }


def _application(name: str, schema: str) -> Application[uuid.UUID]:
    app: Application[uuid.UUID] = type(name, (Application,), {})(env=_postgres_env(schema))
    return app


def _wallets(app: Application[uuid.UUID], count: int) -> list[Wallet]:
    wallets = []
    for k in range(count):
        wallet = Wallet(f"owner-{k}")
        wallet.credit(Decimal("10.10"))
        app.save(wallet)
        wallets.append(wallet)
    return wallets


@pytest.mark.postgres
def test_eventsourcing_application_is_found_on_its_own(tmp_path: Path, schema: str) -> None:
    """The library names its tables after the application; with one application in the
    database, an import needs no table=, and naming it (any case, with its schema) is the same
    source: the re-import brings only what is new."""
    app = _application("WalletsApp", schema)
    try:
        _wallets(app, 2)
        store = esw.open_store(tmp_path / "store")
        first = esw.import_events(store, _in_schema(schema), format="eventsourcing")
        assert (first.imported, first.last_position) == (4, 4)
        _wallets(app, 1)
        again = esw.import_events(
            store, _in_schema(schema), format="eventsourcing", table=f"{schema}.WALLETSAPP"
        )
        assert (again.imported, again.last_position) == (2, 6)
        rows = store.sql("SELECT DISTINCT aggregate_type FROM events").fetchall()
        assert rows == [("Wallet",)]
        credits = store.sql("SELECT data FROM events WHERE event_type = 'Credited'").fetchall()
        assert credits == [('{"amount":10.10}',)] * 3
    finally:
        app.close()


@pytest.mark.postgres
def test_eventsourcing_applications_named_when_ambiguous(tmp_path: Path, schema: str) -> None:
    apps = [_application(name, schema) for name in ("Alpha", "Beta")]
    try:
        for app in apps:
            _wallets(app, 1)
        store = esw.open_store(tmp_path / "store")
        with pytest.raises(
            EsWorkbenchError, match=rf"2 applications: {schema}\.alpha, {schema}\.beta\. Hint"
        ):
            esw.import_events(store, _in_schema(schema), format="eventsourcing")
        beta = esw.import_events(store, DSN, format="eventsourcing", table=f"{schema}.Beta")
        assert beta.imported == 2
        empty = f"esw_none_{uuid.uuid4().hex[:8]}"
        with pytest.raises(EsWorkbenchError, match=rf"no table of .* in schema '{empty}'"):
            esw.import_events(store, DSN, format="eventsourcing", table=f"{empty}.")
    finally:
        for app in apps:
            app.close()


@pytest.mark.postgres
def test_common_table_in_a_schema(tmp_path: Path, schema: str) -> None:
    events = sql.Identifier(schema, "events")
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(
            sql.SQL(
                "CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, event_id UUID, event_type TEXT, "
                "aggregate_id TEXT, aggregate_type TEXT, version BIGINT, data JSONB, "
                "metadata JSONB, timestamp TIMESTAMPTZ DEFAULT now())"
            ).format(events)
        )
        connection.execute(
            sql.SQL(
                "INSERT INTO {} (event_type, aggregate_id, aggregate_type, version, data) "
                "VALUES ('Opened', 'w-1', 'Wallet', 1, '{{\"limit\": 10.10}}')"
            ).format(events)
        )
    store = esw.open_store(tmp_path / "store")
    result = esw.import_events(store, DSN, table=f"{schema}.events")
    assert (result.imported, result.last_position) == (1, 1)
    assert store.sql("SELECT data FROM events").fetchall() == [('{"limit":10.10}',)]


@pytest.mark.postgres
def test_a_password_never_reaches_the_store(tmp_path: Path, schema: str) -> None:
    """The server here trusts every connection, so any password connects: the store keeps the
    URL without it, and a changed password still names the same source."""
    events = sql.Identifier(schema, "events")
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(
            sql.SQL(
                "CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, event_id UUID, event_type TEXT, "
                "aggregate_id TEXT, aggregate_type TEXT, version BIGINT, data JSONB, "
                "metadata JSONB, timestamp TIMESTAMPTZ DEFAULT now())"
            ).format(events)
        )
        insert = sql.SQL(
            "INSERT INTO {} (event_type, aggregate_id, aggregate_type, version, data) "
            "VALUES ('Opened', %s, 'Wallet', 1, '{{}}')"
        ).format(events)
        connection.execute(insert, ("w-1",))
    with_password = DSN.replace("postgres@", "postgres:s3cret-one@")
    assert "s3cret-one" in with_password
    store = esw.open_store(tmp_path / "store")
    result = esw.import_events(store, with_password, table=f"{schema}.events")
    assert result.imported == 1
    assert "s3cret" not in result.source
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(insert, ("w-2",))
    rotated = DSN.replace("postgres@", "postgres:s3cret-two@") + "?password=s3cret-three"
    again = esw.import_events(store, rotated, table=f"{schema}.events")
    assert (again.imported, again.last_position) == (1, 2)
    written = [path.read_bytes() for path in (tmp_path / "store").rglob("*") if path.is_file()]
    assert not any(b"s3cret" in body for body in written)


def test_esw_import_creates_a_new_store(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    event = {"eventType": "Opened", "aggregateId": "w-1", "aggregateType": "Wallet", "data": {}}
    source.write_text(json.dumps(event) + "\n")
    runner = CliRunner()
    result = runner.invoke(main, ["import", str(tmp_path / "new" / "store"), str(source)])
    assert result.exit_code == 0, result.output
    assert "Initialised store at" in result.stderr
    assert result.stdout == "Imported 1 event (source positions up to 1)\n"
    assert esw.open_store(tmp_path / "new" / "store", create=False).stream_version("w-1") == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    refused = runner.invoke(main, ["import", str(tmp_path / "other"), str(source)])
    assert refused.exit_code != 0
    assert "is not an esworkbench store" in refused.output
    assert not (tmp_path / "other" / "store.json").exists()


def _kennel(env: dict[str, str]) -> Application[str]:
    """An application of text ids (ORIGINATOR_ID_TYPE=text), three of which look like UUIDs
    in different spellings: each is its own stream, and keeps its text."""
    app: Application[str] = type("Kennel", (Application,), {})(
        env={**env, "ORIGINATOR_ID_TYPE": "text"}
    )
    stamp = {"_type_": "datetime_iso", "_data_": "2024-01-01T00:00:00+00:00"}
    app.recorder.insert_events(
        [
            StoredEvent(
                originator_id=name,
                originator_version=1,
                topic="kennel:Dog.Registered",
                state=json.dumps(
                    {"timestamp": stamp, "originator_topic": "kennel:Dog", "name": name}
                ).encode(),
            )
            for name in TEXT_IDS
        ]
    )
    return app


TEXT_IDS = [
    "dog-1",
    "0F8FAD5BD9CB469FA16570867728950E",
    "0f8fad5b-d9cb-469f-a165-70867728950e",
]


def test_text_ids_stay_as_written_in_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "kennel.db"
    app = _kennel({"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(database)})
    app.close()
    store = esw.open_store(tmp_path / "store")
    assert esw.import_events(store, f"sqlite:///{database}", format="eventsourcing").imported == 3
    ids = store.sql("SELECT aggregate_id FROM events ORDER BY position").fetchall()
    assert [row[0] for row in ids] == TEXT_IDS


@pytest.mark.postgres
def test_text_ids_stay_as_written_in_postgres(tmp_path: Path, schema: str) -> None:
    app = _kennel(_postgres_env(schema))
    app.close()
    store = esw.open_store(tmp_path / "store")
    result = esw.import_events(store, DSN, format="eventsourcing", table=f"{schema}.")
    assert result.imported == 3
    ids = store.sql("SELECT aggregate_id FROM events ORDER BY position").fetchall()
    assert [row[0] for row in ids] == TEXT_IDS
