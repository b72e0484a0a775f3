"""A source whose rows changed under an imported position is refused, for every kind of source.

Each kind of source (files in every format, with and without event ids; a PostgreSQL table in the
common schema, with and without event ids; the eventsourcing library's SQLite and PostgreSQL
recorders, written by the library itself; Marten's tables) is imported, edited in the middle of
what was imported (a row's data, its event type, a row deleted, a row inserted), appended to, and
imported again: the import fails naming the source and the positions of the change, imports
nothing, and changes nothing stored. Unedited, a re-run imports nothing; appended to, exactly the
new events.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

import esworkbench as esw
from esworkbench.sources import _digest

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
EDITS = ["data", "type", "delete", "insert"]
ROW = 3  # the row edited: the middle one of five


def count(store: esw.Store) -> int:
    return int(store.sql("select count(*) from events").fetchall()[0][0])


def streams(store: esw.Store) -> list[str]:
    return [r[0] for r in store.sql("select aggregate_id from events order by position").fetchall()]


def opened(k: int, *, ids: bool = True) -> dict[str, Any]:
    """The event that opens stream acc-<k>; its data is JSON text, written as it is."""
    row: dict[str, Any] = {
        "eventId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"acc-{k}")),
        "eventType": "Opened",
        "aggregateId": f"acc-{k}",
        "aggregateType": "Account",
        "version": 1,
        "timestamp": f"2024-01-01T00:00:{k % 60:02d}Z",
        "data": f'{{"amount": 10.10, "n": {k}}}',
    }
    if not ids:
        del row["eventId"]
    return row


def line(row: dict[str, Any] | str) -> str:
    """An event as a JSON object, its data text kept exactly (a string is a line as it is)."""
    if isinstance(row, str):
        return row
    rest = json.dumps({k: v for k, v in row.items() if k != "data"})
    return rest[:-1] + f', "data": {row["data"]}}}'


class Kind:
    """A source of five events, one per stream, that a test edits in place and appends to.

    ``position(row)`` is the source position of the row-th event (1-based); ``spacing`` how far
    apart positions are, so that an inserted row gets a position of its own between two.
    """

    name = ""
    ids = True
    spacing = 1

    def create(self) -> None:
        raise NotImplementedError

    def edit(self, how: str, row: int) -> None:
        raise NotImplementedError

    def append(self) -> None:
        """Two events of two new streams, acc-6 and acc-7."""
        raise NotImplementedError

    def import_into(self, store: esw.Store, **options: Any) -> esw.ImportResult:
        raise NotImplementedError

    def position(self, row: int) -> int:
        return row * self.spacing

    def changed_at(self, how: str, row: int) -> int:
        """Where an edit of ``row`` is: an inserted row comes before it."""
        return self.position(row) - (self.spacing // 2 if how == "insert" else 0)


class File(Kind):
    """A file rewritten whole by every edit: positions are row numbers."""

    def __init__(self, folder: Path, suffix: str, *, ids: bool) -> None:
        self.path = folder / f"events{suffix}"
        self.ids = ids
        self.name = f"{suffix[1:]}{'' if ids else '-without-ids'}"
        self.rows: list[dict[str, Any]] = []

    def create(self) -> None:
        self.rows = [opened(k, ids=self.ids) for k in range(1, 6)]
        self.write()

    def append(self) -> None:
        self.rows += [opened(k, ids=self.ids) for k in (6, 7)]
        self.write()

    def edit(self, how: str, row: int) -> None:
        if how == "data":  # the same number, written otherwise
            self.rows[row - 1]["data"] = f'{{"amount": 10.1, "n": {row}}}'
        elif how == "type":
            self.rows[row - 1]["eventType"] = "Closed"
        elif how == "delete":
            del self.rows[row - 1]
        else:
            self.rows.insert(row - 1, opened(90, ids=self.ids))
        self.write()

    def import_into(self, store: esw.Store, **options: Any) -> esw.ImportResult:
        return esw.import_events(store, self.path, **options)

    def write(self) -> None:
        suffix = self.path.suffix
        if suffix in (".jsonl", ".json"):
            texts = [line(r) for r in self.rows]
            text = (
                "".join(t + "\n" for t in texts) if suffix == ".jsonl" else f"[{','.join(texts)}]"
            )
            self.path.write_text(text)
            return
        names = list(self.rows[0])
        if suffix == ".csv":
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(names)
            writer.writerows([r[n] for n in names] for r in self.rows)
            self.path.write_text(out.getvalue())
            return
        columns = {n: [r[n] for r in self.rows] for n in names}
        columns["timestamp"] = [datetime.fromisoformat(t) for t in columns["timestamp"]]
        table = pa.table(columns)
        if suffix == ".parquet":
            pq.write_table(table, self.path)
        else:
            with pa.ipc.new_file(self.path, table.schema) as sink:
                sink.write_table(table)


class CommonTable(Kind):
    """A PostgreSQL table in the common schema, its ids ten apart, edited with SQL."""

    spacing = 10

    def __init__(self, connection: psycopg.Connection[Any], *, ids: bool) -> None:
        self.pg = connection
        self.ids = ids
        self.table = f"rewrites_{uuid.uuid4().hex[:10]}"
        self.name = f"postgres{'' if ids else '-without-ids'}"

    def create(self) -> None:
        self.pg.execute(
            sql.SQL(
                "CREATE TABLE {} (id BIGINT PRIMARY KEY, event_id UUID UNIQUE, event_type TEXT, "
                "aggregate_id TEXT, aggregate_type TEXT, version BIGINT, data JSONB, "
                "metadata JSONB, timestamp TIMESTAMPTZ)"
            ).format(sql.Identifier(self.table))
        )
        for k in range(1, 6):
            self.insert(self.position(k), opened(k))

    def insert(self, position: int, row: dict[str, Any]) -> None:
        self.pg.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, %s)").format(
                sql.Identifier(self.table)
            ),
            (
                position,
                row["eventId"] if self.ids else None,
                row["eventType"],
                row["aggregateId"],
                row["aggregateType"],
                row["version"],
                row["data"],
                row["timestamp"],
            ),
        )

    def append(self) -> None:
        for k in (6, 7):
            self.insert(self.position(k), opened(k))

    def edit(self, how: str, row: int) -> None:
        at = self.position(row)
        statements = {
            "data": 'UPDATE {} SET data = \'{{"amount": 10.1, "n": 3}}\' WHERE id = %s',
            "type": "UPDATE {} SET event_type = 'Closed' WHERE id = %s",
            "delete": "DELETE FROM {} WHERE id = %s",
        }
        if how == "insert":
            self.insert(self.changed_at(how, row), opened(90))
        else:
            self.pg.execute(sql.SQL(statements[how]).format(sql.Identifier(self.table)), (at,))

    def import_into(self, store: esw.Store, **options: Any) -> esw.ImportResult:
        return esw.import_events(store, DSN, table=self.table, **options)

    def drop(self) -> None:
        self.pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.table)))


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner


class Bank(Application[uuid.UUID]):
    pass


class Recorder(Kind):
    """The eventsourcing library's recorder: the library writes, SQL edits. Its positions are
    spread ten apart before the first import (the library goes on past the highest)."""

    spacing = 10

    def __init__(self, folder: Path, *, postgres: bool) -> None:
        self.postgres = postgres
        self.name = "eventsourcing-postgres" if postgres else "eventsourcing-sqlite"
        self.app_name = f"Bank{uuid.uuid4().hex[:10]}"
        self.path = folder / "bank.db"
        if postgres:
            env = {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": "test",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": "5432",
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
            }
            self.table = f"{self.app_name.lower()}_events"
        else:
            env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(self.path)}
            self.table = "stored_events"
        self.app = type(self.app_name, (Bank,), {})(env=env)
        self.position_column = "notification_id" if postgres else "rowid"

    def run(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        text = statement.format(t=self.table, p=self.position_column)
        if self.postgres:
            with psycopg.connect(DSN, autocommit=True) as connection:
                cursor = connection.execute(text.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description else []
        with sqlite3.connect(self.path) as connection:
            rows = connection.execute(text, params).fetchall()
        connection.close()
        return rows

    def create(self) -> None:
        self.app.save(*(Account(f"owner-{k}") for k in range(1, 6)))
        self.run("UPDATE {t} SET {p} = {p} * 10")
        if self.postgres:
            self.run("SELECT setval(pg_get_serial_sequence('{t}', 'notification_id'), 50)")

    def append(self) -> None:
        self.app.save(Account("owner-6"), Account("owner-7"))

    def edit(self, how: str, row: int) -> None:
        at = self.position(row)
        if how == "data":
            [(state,)] = self.run("SELECT state FROM {t} WHERE {p} = ?", (at,))
            changed = json.loads(bytes(state))
            changed["owner"] = "someone else"
            self.run("UPDATE {t} SET state = ? WHERE {p} = ?", (json.dumps(changed).encode(), at))
        elif how == "type":
            self.run("UPDATE {t} SET topic = topic || 'Again' WHERE {p} = ?", (at,))
        elif how == "delete":
            self.run("DELETE FROM {t} WHERE {p} = ?", (at,))
        else:
            [(topic, state)] = self.run("SELECT topic, state FROM {t} WHERE {p} = ?", (at,))
            new = uuid.uuid4()
            self.run(
                "INSERT INTO {t} ({p}, originator_id, originator_version, topic, state) "
                "VALUES (?, ?, 1, ?, ?)",
                (self.changed_at(how, row), new if self.postgres else new.hex, topic, state),
            )

    def import_into(self, store: esw.Store, **options: Any) -> esw.ImportResult:
        if self.postgres:
            return esw.import_events(
                store, DSN, format="eventsourcing", table=self.app_name, **options
            )
        return esw.import_events(store, f"sqlite:///{self.path}", **options)

    def drop(self) -> None:
        self.app.close()
        if self.postgres:
            with psycopg.connect(DSN, autocommit=True) as connection:
                for suffix in ("events", "snapshots"):
                    table = sql.Identifier(f"{self.app_name.lower()}_{suffix}")
                    connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))


MARTEN = """
CREATE TABLE {s}.mt_streams (id uuid PRIMARY KEY, type varchar, version bigint,
    timestamp timestamptz NOT NULL DEFAULT now(), snapshot jsonb, snapshot_version integer,
    created timestamptz NOT NULL DEFAULT now(), tenant_id varchar DEFAULT '*DEFAULT*',
    is_archived bool DEFAULT FALSE);
CREATE TABLE {s}.mt_events (seq_id bigint PRIMARY KEY, id uuid NOT NULL UNIQUE,
    stream_id uuid REFERENCES {s}.mt_streams (id), version bigint NOT NULL, data jsonb NOT NULL,
    type varchar(500) NOT NULL, timestamp timestamptz NOT NULL DEFAULT now(),
    tenant_id varchar DEFAULT '*DEFAULT*', mt_dotnet_type varchar);
"""


class Marten(Kind):
    """Marten's mt_events and mt_streams (as Marten 7 creates them), seq_ids ten apart."""

    name = "marten"
    spacing = 10

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.pg = connection
        self.schema = f"esw_rewrites_{uuid.uuid4().hex[:10]}"

    def run(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        self.pg.execute(sql.SQL(statement).format(s=sql.Identifier(self.schema)), params)

    def create(self) -> None:
        self.run("CREATE SCHEMA {s}")
        self.run(MARTEN)
        for k in range(1, 6):
            self.insert(self.position(k), k)

    def insert(self, position: int, k: int) -> None:
        stream = uuid.UUID(int=k)
        self.run(
            "INSERT INTO {s}.mt_streams (id, type, version) VALUES (%s, 'Bank.Account, Bank', 1)",
            (stream,),
        )
        self.run(
            "INSERT INTO {s}.mt_events (seq_id, id, stream_id, version, data, type, timestamp) "
            "VALUES (%s, %s, %s, 1, %s, 'account_opened', %s)",
            (position, uuid.UUID(int=1000 + k), stream, json.dumps({"n": k}), datetime.now(UTC)),
        )

    def append(self) -> None:
        for k in (6, 7):
            self.insert(self.position(k), k)

    def edit(self, how: str, row: int) -> None:
        at = self.position(row)
        if how == "data":
            self.run("UPDATE {s}.mt_events SET data = '{{\"n\": 99}}' WHERE seq_id = %s", (at,))
        elif how == "type":
            self.run("UPDATE {s}.mt_events SET type = 'account_closed' WHERE seq_id = %s", (at,))
        elif how == "delete":
            self.run("DELETE FROM {s}.mt_events WHERE seq_id = %s", (at,))
        else:
            self.insert(self.changed_at(how, row), 90)

    def import_into(self, store: esw.Store, **options: Any) -> esw.ImportResult:
        return esw.import_events(store, DSN, format="marten", table=self.schema, **options)

    def drop(self) -> None:
        self.run("DROP SCHEMA IF EXISTS {s} CASCADE")


FILES = [(suffix, ids) for suffix in (".jsonl", ".json", ".csv", ".parquet", ".arrow")
         for ids in (True, False)]  # fmt: skip
KINDS = [f"file{s}{'' if ids else '-without-ids'}" for s, ids in FILES] + [
    pytest.param(name, marks=pytest.mark.postgres)
    for name in ("postgres", "postgres-without-ids", "eventsourcing-postgres", "marten")
] + ["eventsourcing-sqlite"]  # fmt: skip


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    name: str = request.param
    if name.startswith("file"):
        suffix, _, rest = name[4:].partition("-")
        yield File(tmp_path, suffix, ids=not rest)
        return
    if name == "eventsourcing-sqlite":
        recorder = Recorder(tmp_path, postgres=False)
        yield recorder
        recorder.drop()
        return
    with psycopg.connect(DSN, autocommit=True) as connection:
        made: Any
        if name.startswith("postgres"):
            made = CommonTable(connection, ids=name == "postgres")
        elif name == "marten":
            made = Marten(connection)
        else:
            made = Recorder(tmp_path, postgres=True)
        try:
            yield made
        finally:
            made.drop()


@pytest.fixture
def store(tmp_path: Path) -> esw.Store:
    return esw.open_store(tmp_path / "store")


def stored_state(store: esw.Store) -> tuple[int, int, bytes, list[Path]]:
    """What an import that changed nothing leaves as it was."""
    files = sorted(store.path.rglob("*.parquet"))
    return store.refresh(), count(store), (store.path / "imports.json").read_bytes(), files


@pytest.mark.parametrize("how", EDITS)
def test_an_edit_under_the_checkpoint_is_refused(kind: Kind, store: esw.Store, how: str) -> None:
    kind.create()
    assert kind.import_into(store).imported == 5
    before = stored_state(store)
    kind.edit(how, ROW)
    kind.append()  # new rows past the checkpoint: none of them is imported either
    with pytest.raises(esw.SourceRewrittenError) as caught:
        kind.import_into(store)
    error = caught.value
    at = kind.changed_at(how, ROW)
    assert error.first <= at <= error.last, (error.first, at, error.last)
    # Narrowed to the positions between two imported rows.
    assert error.last - error.first < kind.spacing
    assert error.source in str(error)
    assert "Nothing was imported" in str(error)
    assert str(error).endswith("compare the two histories")
    assert stored_state(store) == before
    assert not list(store.path.glob(".import-*"))
    with pytest.raises(esw.SourceRewrittenError):  # and again: the checkpoint did not move
        kind.import_into(store, on_error="quarantine")


def test_unchanged_and_appended_sources_import_exactly_the_new_events(
    kind: Kind, store: esw.Store
) -> None:
    kind.create()
    first = kind.import_into(store)
    assert first.imported == 5
    again = kind.import_into(store)
    assert (again.imported, again.last_position) == (0, first.last_position)
    checkpoints = (store.path / "imports.json").read_bytes()
    kind.append()
    more = kind.import_into(store)
    assert more.imported == 2
    assert (more.last_position or 0) > kind.position(5)
    assert count(store) == 7
    new = streams(store)[5:]
    assert len(set(new)) == 2
    assert not set(new) & set(streams(store)[:5])
    assert (store.path / "imports.json").read_bytes() != checkpoints
    assert kind.import_into(store).imported == 0


# -- files: batches, quarantined rows, old checkpoints, commits that fail ------------------------


def write_lines(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(line(r) + "\n" for r in rows))


def test_batches_of_any_size_give_the_same_digest(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    rows: list[Any] = [opened(k) for k in range(1, 40)]
    write_lines(source, rows)
    assert esw.import_events(store, source, batch_size=7).imported == 39
    for batch_size in (1, 5, 100_000):
        assert esw.import_events(store, source, batch_size=batch_size).imported == 0
    write_lines(source, [*rows, "{not json", opened(40)])  # a bad line reads line by line
    result = esw.import_events(store, source, on_error="quarantine", batch_size=3)
    assert (result.imported, result.quarantined) == (1, 1)


def test_quarantined_rows_are_part_of_what_was_read(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    bad = {**opened(2), "version": "two"}
    write_lines(source, [opened(1), bad, opened(3)])
    result = esw.import_events(store, source, on_error="quarantine")
    assert (result.imported, result.quarantined) == (2, 1)
    write_lines(source, [opened(1), {**bad, "version": "zwei"}, opened(3), opened(4)])
    assert esw.import_events(store, source, on_error="quarantine").imported == 1  # read as bad
    write_lines(source, [opened(1), opened(2), opened(3), opened(4)])  # fixed in the source
    with pytest.raises(esw.SourceRewrittenError, match="at position 2:") as caught:
        esw.import_events(store, source, on_error="quarantine")
    assert (caught.value.first, caught.value.last) == (2, 2)


def test_a_long_source_is_narrowed_to_a_few_rows(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    rows = [opened(k) for k in range(1, 3001)]
    write_lines(source, rows)
    assert esw.import_events(store, source, batch_size=400).imported == 3000
    marks = json.loads((store.path / "imports.json").read_text())
    [entry] = marks.values()
    assert _digest.MAX_MARKS // 2 < len(entry["digest"]["marks"]) <= _digest.MAX_MARKS
    rows[1700]["data"] = '{"n": -1}'
    write_lines(source, [*rows, opened(3001)])
    with pytest.raises(esw.SourceRewrittenError) as caught:
        esw.import_events(store, source)
    assert caught.value.first <= 1701 <= caught.value.last
    assert caught.value.last - caught.value.first < 3 * 3000 // _digest.MAX_MARKS


def test_a_shortened_file_is_refused(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [opened(k) for k in range(1, 6)])
    esw.import_events(store, source)
    write_lines(source, [opened(k) for k in range(1, 5)])
    with pytest.raises(esw.SourceRewrittenError, match=r"at position 5: .*1 row when imported, 0"):
        esw.import_events(store, source)


def old_checkpoint(store: esw.Store) -> tuple[str, dict[str, Any]]:
    """Rewrites the store's checkpoint as the previous version wrote it (no digest)."""
    path = store.path / "imports.json"
    [(key, entry)] = json.loads(path.read_text()).items()
    old = {"position": entry["position"], "event_id": entry["event_id"]}
    path.write_text(json.dumps({key: old}, indent=2) + "\n")
    return key, old


def test_a_checkpoint_without_digest_falls_back_to_the_event_id(
    store: esw.Store, tmp_path: Path
) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [opened(k) for k in range(1, 4)])
    esw.import_events(store, source)
    old_checkpoint(store)
    write_lines(source, [opened(1), opened(90), opened(3)])  # before the checkpoint: not seen
    assert esw.import_events(store, source).imported == 0
    entry = next(iter(json.loads((store.path / "imports.json").read_text()).values()))
    assert entry["digest"]["marks"][-1][:2] == [3, 3]  # the rows as they are now, from here on
    write_lines(source, [opened(1), opened(91), opened(3), opened(4)])
    with pytest.raises(esw.SourceRewrittenError, match="at position 2:"):
        esw.import_events(store, source)
    old_checkpoint(store)
    write_lines(source, [opened(1), opened(91), {**opened(3), "eventId": str(uuid.uuid4())}])
    with pytest.raises(esw.SourceRewrittenError, match=r"position 3 held event \S+ when it was"):
        esw.import_events(store, source)


@pytest.mark.postgres
def test_a_table_without_digest_falls_back_to_the_event_id(store: esw.Store) -> None:
    with psycopg.connect(DSN, autocommit=True) as connection:
        table = CommonTable(connection, ids=True)
        try:
            table.create()
            table.import_into(store)
            old_checkpoint(store)
            table.edit("data", 2)  # not at the checkpoint: the old check cannot see it
            assert table.import_into(store).imported == 0
            table.edit("type", 2)  # now the digest taken then sees it
            with pytest.raises(esw.SourceRewrittenError, match="at position 20:"):
                table.import_into(store)
            old_checkpoint(store)
            table.pg.execute(
                sql.SQL("UPDATE {} SET event_id = %s WHERE id = 50").format(
                    sql.Identifier(table.table)
                ),
                (uuid.uuid4(),),
            )
            with pytest.raises(esw.SourceRewrittenError, match="position 50 held event"):
                table.import_into(store)
        finally:
            table.drop()


def test_a_commit_that_fails_leaves_the_checkpoint_it_had(
    store: esw.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [opened(k) for k in range(1, 4)])
    esw.import_events(store, source)
    write_lines(source, [opened(k) for k in range(1, 6)])

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(esw.Store, "_commit_actions", fail)
    with pytest.raises(OSError, match="disk full"):
        esw.import_events(store, source)
    monkeypatch.undo()
    # The entry for position 5 was written before the commit; the store is still at 3.
    assert esw.import_events(store, source).imported == 2
    write_lines(source, [opened(1), opened(90), *(opened(k) for k in range(3, 6))])
    with pytest.raises(esw.SourceRewrittenError, match="at position 2:"):
        esw.import_events(store, source)


# -- the tally of row hashes -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=80),
    st.lists(st.integers(1, 30), min_size=1, max_size=10),
    st.lists(st.integers(0, 200), max_size=6),
    st.integers(0, 3),
)
def test_a_tally_is_the_same_however_the_rows_are_batched(
    hashes: list[int], cuts: list[int], wanted: list[int], gap: int
) -> None:
    positions = np.cumsum(np.full(len(hashes), 1 + gap, np.int64))
    values = np.array(hashes, np.uint64)
    tally = _digest.Tally(wanted=wanted)
    start = 0
    for size in [*cuts, len(hashes)]:
        tally.add(positions[start : start + size], values[start : start + size])
        start += size
        if start >= len(hashes):
            break
    tally.close()
    for position in wanted:
        upto = positions <= position
        expected = (int(upto.sum()), sum(h for h, u in zip(hashes, upto, strict=True) if u) % 2**64)
        assert tally.found[position] == expected
    marks = tally.marks()
    assert marks[-1] == _digest.Mark(int(positions[-1]), len(hashes), sum(hashes) % 2**64)
    for mark in marks:
        upto = positions <= mark.position
        assert mark.rows == int(upto.sum())
        assert mark.total == sum(h for h, u in zip(hashes, upto, strict=True) if u) % 2**64


def test_row_hashes_tell_apart_what_concatenation_would_not() -> None:
    connection = duckdb.connect()
    table = pa.table({"a": ["ab", "a", None, ""], "b": ["c", "bc", "", None]})
    hashes = _digest.row_hashes(table, connection)
    assert len(set(hashes.tolist())) == 4
    flags = pa.table({"p": [1, 1], "ok": [True, False]})
    assert len(set(_digest.row_hashes(flags, connection).tolist())) == 2
