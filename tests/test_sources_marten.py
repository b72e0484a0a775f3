"""Reading Marten's mt_events and mt_streams, created here as Marten's schema documents them."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import esworkbench as esw
from esworkbench.errors import EsWorkbenchError, QueryError
from esworkbench.sources import _settled
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources.marten import marten_event_at, read_marten, read_marten_snapshots
from esworkbench.sources.postgres import SNAPSHOT_SOURCE_SCHEMA

pytestmark = pytest.mark.postgres

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2024, 5, 1, 8, 30, 0, 654321, tzinfo=UTC)
BIG = "12345678901234567890.000000001"

# Marten 7's tables (EventsTable.cs, StreamsTable.cs) with its metadata columns switched on:
# Events.MetadataConfig.CorrelationIdEnabled, CausationIdEnabled and HeadersEnabled.
MARTEN_DDL = """
CREATE TABLE {s}.mt_streams (
    id {id_type} NOT NULL,
    type varchar NULL,
    version bigint NULL,
    timestamp timestamptz NOT NULL DEFAULT (now()),
    snapshot jsonb NULL,
    snapshot_version integer NULL,
    created timestamptz NOT NULL DEFAULT (now()),
    tenant_id varchar NULL DEFAULT '*DEFAULT*',
    is_archived bool NULL DEFAULT FALSE,
    CONSTRAINT pkey_mt_streams_id PRIMARY KEY (id)
);
CREATE TABLE {s}.mt_events (
    seq_id bigint NOT NULL,
    id uuid NOT NULL,
    stream_id {id_type} NULL,
    version bigint NOT NULL,
    data jsonb NOT NULL,
    type varchar(500) NOT NULL,
    timestamp timestamptz NOT NULL DEFAULT (now()),
    tenant_id varchar NULL DEFAULT '*DEFAULT*',
    mt_dotnet_type varchar NULL,
    correlation_id varchar NULL,
    causation_id varchar NULL,
    headers jsonb NULL,
    is_archived bool NULL DEFAULT FALSE,
    CONSTRAINT pkey_mt_events_seq_id PRIMARY KEY (seq_id),
    CONSTRAINT fkey_mt_events_stream_id FOREIGN KEY (stream_id)
        REFERENCES {s}.mt_streams (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX pk_mt_events_stream_and_version ON {s}.mt_events (stream_id, version);
CREATE UNIQUE INDEX pk_mt_events_id_unique ON {s}.mt_events (id);
"""
# The metadata columns are off by default in Marten: then mt_events has none of them.
WITHOUT_METADATA = (
    "ALTER TABLE {s}.mt_events DROP COLUMN correlation_id, DROP COLUMN causation_id, "
    "DROP COLUMN headers, DROP COLUMN is_archived"
)
STREAM = (
    "INSERT INTO {s}.mt_streams (id, type, version, timestamp, tenant_id) VALUES (%s,%s,%s,%s,%s)"
)
EVENT = (
    "INSERT INTO {s}.mt_events (seq_id, id, stream_id, version, data, type, timestamp, tenant_id, "
    "mt_dotnet_type, correlation_id, causation_id, headers, is_archived) "
    "VALUES (%s,%s,%s,%s,%s::jsonb,%s,%s,%s,%s,%s,%s,%s::jsonb,%s)"
)

ACC = uuid.UUID("11111111-2222-4333-8444-555555555555")
ORD = uuid.UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
LOOSE = uuid.UUID(int=3)
EID = [uuid.UUID(int=1000 + i) for i in range(8)]


@pytest.fixture
def pg() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(DSN, autocommit=True) as connection:
        yield connection


@pytest.fixture
def schema(pg: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh schema in database test, standing for Marten's DatabaseSchemaName."""
    name = f"esw_marten_{uuid.uuid4().hex[:10]}"
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    pg.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def run(
    pg: psycopg.Connection[Any],
    schema: str,
    statement: str,
    rows: list[tuple[Any, ...]] | None = None,
    *,
    id_type: str = "uuid",
) -> None:
    """Runs a statement in ``schema``, once or per row; ``id_type`` is Marten's stream id type."""
    query = sql.SQL(statement).format(s=sql.Identifier(schema), id_type=sql.SQL(id_type))
    if rows is None:
        pg.execute(query)
    else:
        for row in rows:  # not executemany: its pipeline can stall on large rows (psycopg #685)
            pg.execute(query, row)


def bank(pg: psycopg.Connection[Any], schema: str) -> None:
    run(pg, schema, MARTEN_DDL)
    run(pg, schema, STREAM, [
        (ACC, "Bank.Domain.BankAccount, Bank", 3, T0, "*DEFAULT*"),
        (ORD, "Shop.Orders+Order, Shop", 1, T0, "tenant-b"),
        (LOOSE, None, 2, T0, "*DEFAULT*"),
    ])  # fmt: skip
    dotnet = "Bank.Domain.MoneyDeposited, Bank"
    headers = '{"userId": "u-1", "note": null, "rate": 1.50}'
    run(pg, schema, EVENT, [
        (1, EID[0], ACC, 1, '{"owner": "Zoë 😀", "limit": 0.00}', "account_opened", T0,
         "*DEFAULT*", "Bank.Domain.AccountOpened, Bank", "corr-1", None, headers, False),
        (2, EID[1], ORD, 1, '{"items": [{"sku": "a, b: c", "price": ' + BIG + "}]}",
         "order_placed", T0 + timedelta(seconds=1), "tenant-b", None, None, None,
         '{"CorrelationId": "corr-h", "UserId": "u-2"}', False),
        (4, EID[2], ACC, 2, '{"amount": ' + BIG + "}", "money_deposited",
         T0 - timedelta(days=2), "*DEFAULT*", dotnet, "corr-1", "cause-1", None, True),
        (5, EID[3], LOOSE, 1, "{}", "noted", T0, "*DEFAULT*", None, None, None, None, False),
        (6, EID[4], ACC, 3, "[1, 2]", "money_deposited", T0, "*DEFAULT*", dotnet, None, None,
         None, False),
        (7, EID[5], LOOSE, 2, '"text"', "noted", T0, "*DEFAULT*", None, None, None, None, False),
    ])  # fmt: skip


def read(schema: str, **options: Any) -> list[dict[str, Any]]:
    batches = list(read_marten(DSN, schema=schema, **options))
    assert all(b.schema == SOURCE_SCHEMA for b in batches)
    return [r for b in batches for r in b.to_pylist()]


def test_every_column(pg: psycopg.Connection[Any], schema: str) -> None:
    bank(pg, schema)
    rows = read(schema)
    assert [r["source_position"] for r in rows] == [1, 2, 4, 5, 6, 7]
    assert rows[0] == {
        "source_position": 1,
        "event_id": str(EID[0]),
        "event_type": "account_opened",
        "aggregate_type": "BankAccount",
        "aggregate_id": str(ACC),
        "version": 1,
        "recorded_at": T0,
        "occurred_at": T0,
        "schema_version": 1,
        "data": '{"limit":0.00,"owner":"Zoë 😀"}',
        "metadata": '{"tenant_id":"*DEFAULT*","mt_dotnet_type":"Bank.Domain.AccountOpened, Bank",'
        '"headers":{"note":null,"rate":1.50,"userId":"u-1"},'
        '"stream_type":"Bank.Domain.BankAccount, Bank"}',
        "correlation_id": "corr-1",
        "causation_id": None,
        "user_id": "u-1",
        "error": None,
    }
    order = rows[1]
    assert order["aggregate_type"] == "Order"  # nested class Shop.Orders+Order
    assert json.loads(order["data"], parse_float=Decimal)["items"][0] == {
        "sku": "a, b: c",
        "price": Decimal(BIG),
    }
    assert f'"price":{BIG}' in order["data"]
    assert (order["correlation_id"], order["user_id"]) == ("corr-h", "u-2")
    assert json.loads(order["metadata"])["tenant_id"] == "tenant-b"
    deposit = rows[2]
    assert deposit["recorded_at"] == T0 - timedelta(days=2)  # back-dated: seq order kept
    assert deposit["data"] == '{"amount":' + BIG + "}"
    assert (deposit["correlation_id"], deposit["causation_id"]) == ("corr-1", "cause-1")
    assert json.loads(deposit["metadata"])["is_archived"] is True
    assert "is_archived" not in json.loads(rows[0]["metadata"])


def test_bad_rows_and_streams_without_type(pg: psycopg.Connection[Any], schema: str) -> None:
    bank(pg, schema)
    rows = {r["source_position"]: r for r in read(schema)}
    assert rows[5]["error"] == (
        "field 'aggregate_type': is missing or empty (mt_streams has no type for the stream; "
        "pass default_aggregate_type= to name one)"
    )
    assert rows[6]["error"] == "field 'data': must be a JSON object, got an array"
    assert rows[6]["data"] == "[1,2]"
    assert rows[6]["aggregate_type"] == "BankAccount"
    assert rows[7]["error"].endswith("field 'data': must be a JSON object, got a string")
    fixed = {r["source_position"]: r for r in read(schema, default_aggregate_type="Note")}
    assert (fixed[5]["aggregate_type"], fixed[5]["error"]) == ("Note", None)
    assert fixed[1]["aggregate_type"] == "BankAccount"


def test_after_batches_and_event_at(pg: psycopg.Connection[Any], schema: str) -> None:
    bank(pg, schema)
    batches = list(read_marten(DSN, schema=schema, after=1, batch_size=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    assert [r["source_position"] for b in batches for r in b.to_pylist()] == [2, 4, 5, 6, 7]
    assert marten_event_at(DSN, 4, schema=schema) == str(EID[2])
    assert marten_event_at(DSN, 3, schema=schema) is None


def test_marten_without_metadata_columns(pg: psycopg.Connection[Any], schema: str) -> None:
    bank(pg, schema)
    run(pg, schema, WITHOUT_METADATA)
    rows = read(schema)
    assert [r["correlation_id"] for r in rows] == [None] * 6
    assert rows[0]["metadata"] == (
        '{"tenant_id":"*DEFAULT*","mt_dotnet_type":"Bank.Domain.AccountOpened, Bank",'
        '"stream_type":"Bank.Domain.BankAccount, Bank"}'
    )


def test_string_stream_keys(pg: psycopg.Connection[Any], schema: str) -> None:
    run(pg, schema, MARTEN_DDL, id_type="varchar")  # StreamIdentity.AsString
    run(pg, schema, STREAM, [("order/42", "Order", 1, T0, "*DEFAULT*")])
    run(pg, schema, EVENT, [
        (1, EID[6], "order/42", 1, "{}", "order_placed", T0, "*DEFAULT*", None, None, None, None,
         False),
    ])  # fmt: skip
    [row] = read(schema)
    assert (row["aggregate_id"], row["aggregate_type"], row["error"]) == ("order/42", "Order", None)


# Marten's conjoined tenancy: streams are keyed by tenant and id, so tenants may share stream ids.
CONJOINED = (
    MARTEN_DDL.replace("PRIMARY KEY (id)", "PRIMARY KEY (tenant_id, id)")
    .replace("FOREIGN KEY (stream_id)", "FOREIGN KEY (tenant_id, stream_id)")
    .replace("REFERENCES {s}.mt_streams (id)", "REFERENCES {s}.mt_streams (tenant_id, id)")
    .replace("(stream_id, version)", "(tenant_id, stream_id, version)")
)


def test_conjoined_tenancy_keeps_the_tenants_streams_apart(
    pg: psycopg.Connection[Any], schema: str, tmp_path: Path
) -> None:
    assert CONJOINED.count("tenant_id, ") == 4
    run(pg, schema, CONJOINED, id_type="varchar")
    run(pg, schema, STREAM, [("acc-1", "Account", 1, T0, t) for t in ("t-a", "t-b")])
    run(pg, schema, EVENT, [
        (k + 1, EID[k], "acc-1", 1, json.dumps({"owner": t}), "opened", T0, t, None, None, None,
         None, False)
        for k, t in enumerate(("t-a", "t-b"))
    ])  # fmt: skip
    pg.execute(
        sql.SQL("UPDATE {}.mt_streams SET snapshot = '{{}}', snapshot_version = 1").format(
            sql.Identifier(schema)
        )
    )
    store = esw.open_store(tmp_path / "store")
    assert esw.import_events(store, DSN, format="marten", table=schema).imported == 2
    rows = store.sql("SELECT aggregate_id, data FROM events ORDER BY position").fetchall()
    assert rows == [("t-a/acc-1", '{"owner":"t-a"}'), ("t-b/acc-1", '{"owner":"t-b"}')]
    snapshots = [r["aggregate_id"] for b in read_marten_snapshots(DSN, schema=schema) for r in
                 b.to_pylist()]  # fmt: skip
    assert sorted(snapshots) == ["t-a/acc-1", "t-b/acc-1"]


def test_snapshots(pg: psycopg.Connection[Any], schema: str) -> None:
    bank(pg, schema)
    pg.execute(
        sql.SQL(
            "UPDATE {}.mt_streams SET snapshot = %s::jsonb, snapshot_version = 2 WHERE id = %s"
        ).format(sql.Identifier(schema)),
        ('{"balance": ' + BIG + ', "owner": "Zoë"}', ACC),
    )
    batches = list(read_marten_snapshots(DSN, schema=schema))
    assert all(b.schema == SNAPSHOT_SOURCE_SCHEMA for b in batches)
    [snap] = [r for b in batches for r in b.to_pylist()]
    assert snap == {
        "aggregate_type": "BankAccount",
        "aggregate_id": str(ACC),
        "version": 2,
        "state": '{"owner":"Zoë","balance":' + BIG + "}",
        "taken_at": T0,
        "metadata": '{"tenant_id":"*DEFAULT*","stream_type":"Bank.Domain.BankAccount, Bank"}',
        "error": None,
    }


def test_refusals(pg: psycopg.Connection[Any], schema: str) -> None:
    with pytest.raises(QueryError, match="PostgreSQL refused"):
        list(read_marten(DSN, schema=schema))
    pg.execute(sql.SQL("CREATE TABLE {}.mt_events (x int)").format(sql.Identifier(schema)))
    with pytest.raises(EsWorkbenchError, match="not Marten's events table"):
        list(read_marten(DSN, schema=schema))


def test_lookups_while_the_stream_is_open(pg: psycopg.Connection[Any], schema: str) -> None:
    """More than one COPY chunk (16 MB) of events, read in small batches: the stream types are
    looked up between batches, while the events' COPY is still open."""
    run(pg, schema, MARTEN_DDL)
    run(pg, schema, STREAM, [(ACC, "Bank.Account, Bank", 20, T0, "*DEFAULT*")])
    blob = json.dumps({"blob": "é" * 600_000})  # 1.2 MB of UTF-8
    run(pg, schema, EVENT, [
        (i + 1, uuid.UUID(int=5000 + i), ACC, i + 1, blob, "big", T0, "*DEFAULT*", None, None,
         None, None, False)
        for i in range(20)
    ])  # fmt: skip
    batches = list(read_marten(DSN, schema=schema, batch_size=3))
    assert [b.num_rows for b in batches] == [3] * 6 + [2]
    rows = [r for b in batches for r in b.to_pylist()]
    assert [r["version"] for r in rows] == list(range(1, 21))
    assert {(r["aggregate_type"], r["error"]) for r in rows} == {("Account", None)}


def draw(connection: psycopg.Connection[Any], schema: str) -> int:
    """Draws a seq_id from mt_events_sequence, as Marten's rich append does before inserting."""
    sequence = f"{schema}.mt_events_sequence"
    drawn = connection.execute("SELECT nextval(%s::regclass)", (sequence,)).fetchone()
    assert drawn is not None
    return int(drawn[0])


def insert(
    connection: psycopg.Connection[Any], schema: str, seq_id: int, stream: uuid.UUID
) -> None:
    """Inserts version 1 of a stream at seq_id (commits only in autocommit mode)."""
    row = (seq_id, uuid.uuid4(), stream, 1, "{}", "noted", T0, "*DEFAULT*", None, None, None,
           None, False)  # fmt: skip
    run(connection, schema, EVENT, [row])


def append(connection: psycopg.Connection[Any], schema: str, stream: uuid.UUID) -> int:
    seq_id = draw(connection, schema)
    insert(connection, schema, seq_id, stream)
    return seq_id


def with_sequence(pg: psycopg.Connection[Any], schema: str, count: int) -> list[uuid.UUID]:
    """Marten's tables with mt_events_sequence, and ``count`` streams of type Note."""
    run(pg, schema, MARTEN_DDL + "CREATE SEQUENCE {s}.mt_events_sequence;")
    streams = [uuid.UUID(int=7000 + i) for i in range(count)]
    run(pg, schema, STREAM, [(s, "Notes.Note, Notes", 1, T0, "*DEFAULT*") for s in streams])
    return streams


def imported_streams(store: esw.Store) -> list[str]:
    query = "SELECT aggregate_id FROM events ORDER BY position"
    return [r[0] for r in store.sql(query).fetchall()]


def test_a_late_event_is_imported_by_the_next_run(
    pg: psycopg.Connection[Any], schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settled, "SETTLE_SECONDS", 0.2)
    late, early = with_sequence(pg, schema, 2)
    store = esw.open_store(tmp_path / "store")
    with psycopg.connect(DSN) as slow:
        assert draw(slow, schema) == 1  # drawn, its event not inserted yet
        assert append(pg, schema, early) == 2
        first = esw.import_events(store, DSN, format="marten", table=schema)
        assert (first.imported, first.last_position, first.unsettled_after) == (0, None, 0)
        insert(slow, schema, 1, late)
        slow.commit()
    second = esw.import_events(store, DSN, format="marten", table=schema)
    assert (second.imported, second.last_position, second.unsettled_after) == (2, 2, None)
    assert esw.import_events(store, DSN, format="marten", table=schema).imported == 0
    assert imported_streams(store) == [str(late), str(early)]


def test_a_rolled_back_append_leaves_a_gap_that_does_not_block(
    pg: psycopg.Connection[Any], schema: str, tmp_path: Path
) -> None:
    first, undone, last = with_sequence(pg, schema, 3)
    assert append(pg, schema, first) == 1
    with psycopg.connect(DSN) as writer:
        assert append(writer, schema, undone) == 2
        writer.rollback()
    assert append(pg, schema, last) == 3
    store = esw.open_store(tmp_path / "store")
    result = esw.import_events(store, DSN, format="marten", table=schema)
    assert (result.imported, result.last_position, result.unsettled_after) == (2, 3, None)
    assert imported_streams(store) == [str(first), str(last)]
