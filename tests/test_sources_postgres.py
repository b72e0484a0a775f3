"""Reading the common PostgreSQL schema: every column exactly, errors per row, positions, bounds."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Generator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.types.json import Jsonb

import esworkbench as esw
from esworkbench.cli import main
from esworkbench.errors import EsWorkbenchError, QueryError
from esworkbench.sources import _settled
from esworkbench.sources._rows import SOURCE_SCHEMA
from esworkbench.sources._settled import Unsettled
from esworkbench.sources.postgres import (
    SNAPSHOT_SOURCE_SCHEMA,
    postgres_event_at,
    read_postgres,
    read_postgres_snapshots,
)

pytestmark = pytest.mark.postgres

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
BIG = "12345678901234567890.000000001"

EVENTS_DDL = """
CREATE TABLE {t} (
    id BIGSERIAL PRIMARY KEY, event_id UUID, event_type TEXT, aggregate_id TEXT,
    aggregate_type TEXT, version BIGINT, data JSONB, metadata JSONB, timestamp TIMESTAMPTZ,
    UNIQUE (aggregate_id, version))
"""
INSERT = (
    "INSERT INTO {t} (event_id, event_type, aggregate_id, aggregate_type, version, data, "
    "metadata, timestamp) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)"
)


@pytest.fixture
def pg() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(DSN, autocommit=True) as connection:
        yield connection


@pytest.fixture
def name(pg: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table name in database test; the table is dropped afterwards."""
    table = f"esw_test_{uuid.uuid4().hex[:12]}"
    yield table
    pg.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))


def create(pg: psycopg.Connection[Any], table: str, rows: list[tuple[Any, ...]]) -> None:
    t = sql.Identifier(table)
    pg.execute(sql.SQL(EVENTS_DDL).format(t=t))
    for row in rows:  # not executemany: its pipeline can stall on large rows (psycopg #685)
        pg.execute(sql.SQL(INSERT).format(t=t), row)


def read_all(table: str, **options: Any) -> list[dict[str, Any]]:
    batches = list(read_postgres(DSN, table=table, **options))
    for batch in batches:
        assert batch.schema == SOURCE_SCHEMA
    return [row for batch in batches for row in batch.to_pylist()]


def ids(n: int) -> list[str]:
    return [str(uuid.UUID(int=i + 1)) for i in range(n)]


def test_every_column_round_trips_exactly(pg: psycopg.Connection[Any], name: str) -> None:
    e = ids(3)
    data = (
        '{"amount": ' + BIG + ', "tiny": 1E-7, "huge": 123456789012345678901234567890, '
        '"owner": "Zoë 😀 \\u00e9", "note": "a, b: c\\n\\td", "list": [1.10, {"k": null}]}'
    )
    meta = '{"correlationId": "c-1", "causationId": "k-1", "userId": "u-1", "ip": "::1"}'
    snake = '{"correlation_id": "c-2", "user_id": 42}'
    create(
        pg,
        name,
        [
            (e[0], "MoneyDeposited", "acc-1", "Account", 1, data, meta, T0),
            (e[1], "MoneyDeposited", "acc-1", "Account", 2, '{"x": 1}', None, T0),
            (e[2], "Ünïcödé", "acc-ü", "Åccount", 1, "{}", snake, T0),
        ],
    )
    rows = read_all(name)
    assert [r["source_position"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first == {
        "source_position": 1,
        "event_id": e[0],
        "event_type": "MoneyDeposited",
        "aggregate_type": "Account",
        "aggregate_id": "acc-1",
        "version": 1,
        "recorded_at": T0,
        "occurred_at": T0,
        "schema_version": 1,
        "data": first["data"],
        "metadata": '{"ip":"::1","userId":"u-1","causationId":"k-1","correlationId":"c-1"}',
        "correlation_id": "c-1",
        "causation_id": "k-1",
        "user_id": "u-1",
        "error": None,
    }
    parsed = json.loads(first["data"], parse_float=Decimal)
    assert parsed["amount"] == Decimal(BIG)
    assert f'"amount":{BIG}' in first["data"]  # the exact digits, not a float's
    assert parsed["huge"] == 123456789012345678901234567890
    assert parsed["owner"] == "Zoë 😀 é"
    assert parsed["note"] == "a, b: c\n\td"  # separators inside strings stay
    assert " " not in first["data"].replace("a, b: c", "").replace("Zoë 😀 é", "")
    assert rows[1]["metadata"] is None
    assert rows[1]["correlation_id"] is None
    assert rows[1]["error"] is None
    third = rows[2]
    assert (third["event_type"], third["aggregate_type"], third["aggregate_id"]) == (
        "Ünïcödé",
        "Åccount",
        "acc-ü",
    )
    assert (third["correlation_id"], third["causation_id"], third["user_id"]) == ("c-2", None, "42")


def test_back_dated_rows_keep_both_orders(pg: psycopg.Connection[Any], name: str) -> None:
    e = ids(3)
    create(
        pg,
        name,
        [
            (e[0], "A", "s", "T", 1, "{}", None, T0),
            (e[1], "B", "s", "T", 2, "{}", None, T0 - timedelta(days=3)),
            (e[2], "C", "s", "T", 3, "{}", None, T0 + timedelta(microseconds=1)),
        ],
    )
    rows = read_all(name)
    assert [r["event_type"] for r in rows] == ["A", "B", "C"]
    assert [r["recorded_at"] for r in rows] == [
        T0,
        T0 - timedelta(days=3),
        T0 + timedelta(microseconds=1),
    ]
    assert all(r["occurred_at"] == r["recorded_at"] for r in rows)


def test_after_and_batch_size(pg: psycopg.Connection[Any], name: str) -> None:
    e = ids(7)
    create(pg, name, [(e[i], "E", "s", "T", i + 1, "{}", None, T0) for i in range(7)])
    batches = list(read_postgres(DSN, table=name, after=2, batch_size=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    rows = [r for b in batches for r in b.to_pylist()]
    assert [r["source_position"] for r in rows] == [3, 4, 5, 6, 7]
    assert [r["event_id"] for r in rows] == e[2:]
    assert list(read_postgres(DSN, table=name, after=7)) == []
    early = read_postgres(DSN, table=name, batch_size=1)
    assert next(early).num_rows == 1
    early.close()  # a reader left early closes its connection (no warning, no hang)
    assert postgres_event_at(DSN, 4, table=name) == e[3]
    assert postgres_event_at(DSN, 99, table=name) is None


def test_large_payload(pg: psycopg.Connection[Any], name: str) -> None:
    blob = "x, y: é" * 150_000  # about 1 MB, with separators inside the string
    data = json.dumps({"blob": blob, "n": Decimal("0.1")}, default=str)
    create(pg, name, [(ids(1)[0], "Big", "s", "T", 1, data, None, T0)])
    [row] = read_all(name)
    assert row["error"] is None
    assert json.loads(row["data"]) == {"blob": blob, "n": "0.1"}
    assert len(row["data"].encode()) > 1_000_000


def test_json_null_metadata_is_no_metadata(pg: psycopg.Connection[Any], name: str) -> None:
    """A jsonb 'null' is not SQL NULL, but it says what a file's "metadata": null says."""
    e = ids(2)
    create(
        pg,
        name,
        [(e[0], "E", "a", "T", 1, "{}", None, T0), (e[1], "E", "b", "T", 1, "{}", "null", T0)],
    )
    rows = read_all(name)
    assert [(r["metadata"], r["error"]) for r in rows] == [(None, None), (None, None)]


def test_bad_rows_become_error_rows(pg: psycopg.Connection[Any], name: str) -> None:
    e = ids(6)
    create(
        pg,
        name,
        [
            (e[0], "Good", "s", "T", 1, "{}", None, T0),
            (e[1], "Array", "s", "T", 2, "[1, 2]", None, T0),
            (e[2], "", "s", "T", 3, '"text"', None, T0),
            (e[3], "Zero", "s", "T", 0, "{}", "[]", T0),
            (e[4], "Later", None, None, 4, "{}", None, None),
            (e[5], "Infinite", "s", "T", 5, "{}", None, "infinity"),
        ],
    )
    rows = read_all(name)
    assert len(rows) == 6
    errors = {r["source_position"]: r["error"] for r in rows}
    assert errors[1] is None
    assert errors[2] == "field 'data': must be a JSON object, got an array"
    assert errors[3] == (
        "field 'event_type': is missing or empty; field 'data': must be a JSON object, got a string"
    )
    assert errors[4] == (
        "field 'version': must be >= 1, got 0; "
        "field 'metadata': must be a JSON object, got an array"
    )
    assert errors[5] == (
        "field 'aggregate_type': is missing or empty; field 'aggregate_id': is missing or empty; "
        "field 'recorded_at': is missing or infinite"
    )
    assert errors[6] == "field 'recorded_at': is missing or infinite"
    assert rows[1]["event_type"] == "Array"
    assert rows[1]["data"] == "[1,2]"


def test_mapped_columns_and_text_json(pg: psycopg.Connection[Any], name: str) -> None:
    t = sql.Identifier(name)
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (seq BIGINT, eid TEXT, kind TEXT, stream TEXT, stream_type TEXT, "
            "v INT, body TEXT, recorded TIMESTAMPTZ, happened TIMESTAMPTZ, sv BIGINT, corr TEXT)"
        ).format(t)
    )
    rows = [
        (10, "0F8FAD5B-D9CB-469F-A165-70867728950E", "A", "s", "T", 1,
         '{ "b" :\t2.50 ,"a": [ ] }', T0, T0 - timedelta(hours=1), 3, "c-9"),
        (20, "not-a-uuid", "B", "s", "T", 2, "{broken", T0, None, None, None),
        (30, None, "C", "s", "T", 3, "{}", T0, None, None, None),
        (40, None, "D", "s", "T", 4, "{}", T0, None, 2**40, None),
    ]  # fmt: skip
    with pg.cursor() as cursor:
        cursor.executemany(
            sql.SQL("INSERT INTO {} VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)").format(t), rows
        )
    columns = {
        "source_position": "seq", "event_id": "eid", "event_type": "kind",
        "aggregate_id": "stream", "aggregate_type": "stream_type", "version": "v",
        "data": "body", "metadata": None, "recorded_at": "recorded", "occurred_at": "happened",
        "schema_version": "sv", "correlation_id": "corr",
    }  # fmt: skip
    got = read_all(name, columns=columns, after=5)
    assert got[0]["event_id"] == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert got[0]["data"] == '{"b":2.50,"a":[]}'  # key order and digits as stored
    assert got[0]["occurred_at"] == T0 - timedelta(hours=1)
    assert (got[0]["schema_version"], got[0]["correlation_id"]) == (3, "c-9")
    assert got[0]["metadata"] is None
    assert got[0]["error"] is None
    assert got[1]["error"] == (
        "field 'event_id': is not a UUID: not-a-uuid; field 'data': is not JSON"
    )
    assert got[1]["occurred_at"] == T0
    assert got[2]["event_id"] is None
    assert got[2]["error"] is None
    assert got[3]["error"] == (
        "field 'schema_version': must be from 1 to 2147483647, got 1099511627776"
    )
    assert postgres_event_at(DSN, 10, table=name, columns=columns) == got[0]["event_id"]


def test_json_column_keeps_its_text(pg: psycopg.Connection[Any], name: str) -> None:
    t = sql.Identifier(name)
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (id BIGINT, event_id UUID, event_type TEXT, aggregate_id TEXT, "
            "aggregate_type TEXT, version BIGINT, data JSON, metadata JSON, timestamp TIMESTAMPTZ)"
        ).format(t)
    )
    pg.execute(
        sql.SQL("INSERT INTO {} VALUES (1, %s, 'E', 's', 'T', 1, %s, %s, %s)").format(t),
        (ids(1)[0], '{"z": 1.0e+2,\n "a": "x: y",  "z2": -0.0}', '{"userId" : "u"}', T0),
    )
    [row] = read_all(name)
    assert row["data"] == '{"z":1.0e+2,"a":"x: y","z2":-0.0}'
    assert (row["metadata"], row["user_id"], row["error"]) == ('{"userId":"u"}', "u", None)


def test_snapshots(pg: psycopg.Connection[Any], name: str) -> None:
    t = sql.Identifier(name)
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (aggregate_id TEXT, version BIGINT, data JSONB, timestamp TIMESTAMPTZ)"
        ).format(t)
    )
    with pg.cursor() as cursor:
        cursor.executemany(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(t),
            [
                ("acc-2", 5, Jsonb({"balance": 1}), T0),
                ("acc-1", 7, Jsonb({"balance": "x, y"}), T0),
                ("acc-1", 3, None, T0),
            ],
        )
    pg.execute(
        sql.SQL("UPDATE {} SET data = %s::jsonb WHERE version = 7").format(t),
        ('{"balance": ' + BIG + "}",),
    )
    batches = list(read_postgres_snapshots(DSN, table=name, batch_size=2))
    assert all(b.schema == SNAPSHOT_SOURCE_SCHEMA for b in batches)
    rows = [r for b in batches for r in b.to_pylist()]
    assert [(r["aggregate_id"], r["version"]) for r in rows] == [
        ("acc-1", 3),
        ("acc-1", 7),
        ("acc-2", 5),
    ]
    assert rows[0]["error"] == "field 'state': is missing"
    assert rows[1]["state"] == '{"balance":' + BIG + "}"
    assert (rows[1]["taken_at"], rows[1]["aggregate_type"], rows[1]["error"]) == (T0, None, None)


def test_refusals(pg: psycopg.Connection[Any], name: str) -> None:
    with pytest.raises(QueryError, match="PostgreSQL refused"):
        list(read_postgres(DSN, table=name))
    create(pg, name, [])
    with pytest.raises(EsWorkbenchError, match="no column 'seq'"):
        list(read_postgres(DSN, table=name, columns={"source_position": "seq"}))
    with pytest.raises(EsWorkbenchError, match="not a field"):
        list(read_postgres(DSN, table=name, columns={"position": "id"}))
    with pytest.raises(EsWorkbenchError, match="batch_size"):
        list(read_postgres(DSN, table=name, batch_size=0))
    with pytest.raises(EsWorkbenchError, match="cannot connect"):
        list(read_postgres("postgresql://postgres@127.0.0.1:1/test", table=name))
    pg.execute(
        sql.SQL("ALTER TABLE {} ALTER COLUMN timestamp TYPE TIMESTAMP").format(sql.Identifier(name))
    )
    with pytest.raises(EsWorkbenchError, match="not timestamptz"):
        list(read_postgres(DSN, table=name))


def test_schema_qualified_table(pg: psycopg.Connection[Any], name: str) -> None:
    events = sql.Identifier(name, "events")
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        pg.execute(sql.SQL(EVENTS_DDL).format(t=events))
        pg.execute(sql.SQL(INSERT).format(t=events), (ids(1)[0], "E", "s", "T", 1, "{}", None, T0))
        [row] = [r for b in read_postgres(DSN, schema=name) for r in b.to_pylist()]
        assert (row["event_type"], row["error"]) == ("E", None)
    finally:
        pg.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def test_empty_table_yields_nothing(pg: psycopg.Connection[Any], name: str) -> None:
    create(pg, name, [])
    assert list(read_postgres(DSN, table=name)) == []


def add(connection: psycopg.Connection[Any], table: str, stream: str) -> int:
    """Inserts an event (version 1 of its own stream) and returns its id; commits only when
    ``connection`` is in autocommit mode."""
    query = sql.SQL(INSERT + " RETURNING id").format(t=sql.Identifier(table))
    row = (uuid.uuid4(), "E", stream, "T", 1, "{}", None, T0)
    found = connection.execute(query, row).fetchone()
    assert found is not None
    return int(found[0])


def drain(reading: Generator[Any, None, Unsettled | None]) -> tuple[list[int], Unsettled | None]:
    """The positions a reader yields from here on, and what it returns."""
    positions: list[int] = []
    while True:
        try:
            positions += next(reading)["source_position"].to_pylist()
        except StopIteration as stop:
            return positions, stop.value


def stored(store: esw.Store) -> list[str]:
    return [r[0] for r in store.sql("SELECT aggregate_id FROM events ORDER BY position").fetchall()]


def test_a_late_commit_is_imported_by_the_next_run(
    pg: psycopg.Connection[Any], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settled, "SETTLE_SECONDS", 0.2)
    create(pg, name, [])
    store = esw.open_store(tmp_path / "store")
    assert add(pg, name, "a") == 1
    with psycopg.connect(DSN) as slow:
        assert add(slow, name, "late") == 2  # its transaction stays open
        assert add(pg, name, "b") == 3
        first = esw.import_events(store, DSN, table=name)
        assert (first.imported, first.last_position, first.unsettled_after) == (1, 1, 1)
        assert "rows past source position 1 were left for the next run" in str(first)
        slow.commit()
    second = esw.import_events(store, DSN, table=name)
    assert (second.imported, second.last_position, second.unsettled_after) == (2, 3, None)
    assert esw.import_events(store, DSN, table=name).imported == 0
    assert stored(store) == ["a", "late", "b"]  # each once, in id order


def test_esw_import_says_which_rows_it_left(
    pg: psycopg.Connection[Any], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settled, "SETTLE_SECONDS", 0.1)
    create(pg, name, [])
    add(pg, name, "a")
    args = ["import", str(tmp_path / "store"), DSN, "--table", name]
    with psycopg.connect(DSN) as slow:
        add(slow, name, "late")
        add(pg, name, "b")
        result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.stdout) == (0, "Imported 1 event (source positions up to 1)\n")
    assert result.stderr.endswith(
        "Left the rows past source position 1 for the next run: a transaction that may still "
        "write before them is in progress\n"
    )
    again = CliRunner().invoke(main, args)
    assert (again.stdout, again.stderr) == ("Imported 2 events (source positions up to 3)\n", "")


def test_a_reader_waits_at_a_gap_for_the_writer_that_fills_it(
    pg: psycopg.Connection[Any], name: str
) -> None:
    create(pg, name, [])
    add(pg, name, "a")
    with psycopg.connect(DSN) as slow:
        add(slow, name, "late")
        add(pg, name, "b")
        # The writer outlives the wait: the read stops before the gap and says so.
        assert drain(read_postgres(DSN, table=name, settle_seconds=0.1)) == (
            [1],
            Unsettled(position=1, writers=1),
        )
        # The writer commits while the reader is at the gap: the reader reads on past it.
        reading = read_postgres(DSN, table=name, settle_seconds=30)
        assert next(reading)["source_position"].to_pylist() == [1]
        slow.commit()
        assert drain(reading) == ([2, 3], None)


def test_permanent_gaps_do_not_block(
    pg: psycopg.Connection[Any], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settled, "SETTLE_SECONDS", 30.0)  # a wait would show in the time
    create(pg, name, [])
    with psycopg.connect(DSN) as undone:
        add(undone, name, "rolled-back")  # id 1: below the first visible id
        undone.rollback()
    for stream in ("a", "b", "deleted", "c"):
        add(pg, name, stream)
    pg.execute(sql.SQL("DELETE FROM {} WHERE id = 4").format(sql.Identifier(name)))
    store = esw.open_store(tmp_path / "store")
    with psycopg.connect(DSN) as elsewhere:  # a writer of another table is no reason to wait
        elsewhere.execute("CREATE TEMPORARY TABLE busy (x int)")
        elsewhere.execute("INSERT INTO busy VALUES (1)")
        start = time.monotonic()
        result = esw.import_events(store, DSN, table=name)
        assert time.monotonic() - start < 10
    assert (result.imported, result.last_position, result.unsettled_after) == (3, 5, None)
    assert stored(store) == ["a", "b", "c"]
