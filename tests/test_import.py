"""import_events: exact, all or nothing, incremental, and honest about bad rows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

import esworkbench as esw
from esworkbench.sources import _runs

DSN = "postgresql://postgres@127.0.0.1:5432/test"


def event(stream: str, version: int, **extra: object) -> dict[str, object]:
    return {
        "eventId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{stream}/{version}")),
        "eventType": "MoneyDeposited",
        "aggregateId": stream,
        "aggregateType": "Account",
        "version": version,
        "timestamp": f"2024-01-01T00:00:{version:02d}Z",
        "data": {"amount": 10, "n": version},
        "metadata": {"userId": "u-1"},
        **extra,
    }


def write_lines(path: Path, rows: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def count(store: esw.Store) -> int:
    return int(store.sql("select count(*) from events").fetchall()[0][0])


@pytest.fixture
def store(tmp_path: Path) -> esw.Store:
    return esw.open_store(tmp_path / "store")


def test_jsonl_import_is_exact_and_in_source_order(store: esw.Store, tmp_path: Path) -> None:
    rows = [event("a", 1), event("b", 1), event("a", 2, data={"amount": 10.10})]
    source = tmp_path / "events.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows).replace("10.1", "10.10"))
    result = esw.import_events(store, source, format="common", on_error="fail")
    assert (result.imported, result.quarantined, result.last_position) == (3, 0, 3)
    stored = store.sql("select event_id, aggregate_id, version, data from events order by position")
    assert [r[0] for r in stored.fetchall()] == [r["eventId"] for r in rows]
    assert store.read_stream("a")["data"].to_pylist()[1] == '{"amount":10.10}'


def test_a_rerun_imports_only_what_is_new(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("a", 1), event("a", 2)])
    assert esw.import_events(store, source).imported == 2
    again = esw.import_events(store, source)
    assert (again.imported, again.last_position) == (0, 2)  # the checkpoint it stands at
    write_lines(source, [event("a", 1), event("a", 2), event("a", 3), event("b", 1)])
    more = esw.import_events(store, source)
    assert (more.imported, more.last_position) == (2, 4)
    assert store.stream_version("a") == 3
    assert count(store) == 4


def test_a_rewritten_source_is_reported_not_merged(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("a", 1), event("a", 2)])
    esw.import_events(store, source)
    changed = event("a", 2, eventId=str(uuid.uuid4()))
    write_lines(source, [event("a", 1), changed, event("a", 3)])
    with pytest.raises(esw.SourceRewrittenError, match="position 2"):
        esw.import_events(store, source)
    assert count(store) == 2


def test_fail_mode_names_the_row_and_commits_nothing(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    rows: list[object] = [event("a", 1), event("a", 2), {**event("b", 1), "version": "3a"}]
    write_lines(source, rows)
    with pytest.raises(esw.InvalidEventError, match=r"position 3.*version") as caught:
        esw.import_events(store, source, batch_size=1)
    assert "Nothing of this import was committed" in str(caught.value)
    assert count(store) == 0
    assert list((store.table_path).rglob("*.parquet")) == []
    assert esw.import_events(store, tmp_path / "events.jsonl", on_error="quarantine").imported == 2


def test_quarantine_keeps_every_bad_row_with_its_reason(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    good = [event("a", 1), event("a", 2)]
    source.write_text(
        json.dumps(good[0])
        + "\n"
        + "{not json\n"
        + json.dumps({**event("b", 1), "data": [1]})
        + "\n"
        + json.dumps(good[1])
        + "\n"
    )
    result = esw.import_events(store, source, on_error="quarantine")
    assert (result.imported, result.quarantined, result.last_position) == (2, 2, 4)
    assert result.quarantine_path is not None
    lines = [json.loads(x) for x in Path(result.quarantine_path).read_text().splitlines()]
    assert [x["source_position"] for x in lines] == [2, 3]
    assert "not JSON" in lines[0]["reason"]
    assert "data" in lines[1]["reason"]
    assert esw.import_events(store, source, on_error="quarantine").imported == 0


def test_versions_continue_across_batches_of_one_import(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("a", v) for v in range(1, 8)])
    assert esw.import_events(store, source, batch_size=2).imported == 7
    assert store.read_stream("a")["version"].to_pylist() == list(range(1, 8))
    assert store.refresh() == 1  # one commit for the whole import


def test_a_gap_in_the_source_fails_the_whole_import(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("a", 1), event("a", 3)])
    with pytest.raises(esw.ConcurrencyError):
        esw.import_events(store, source, batch_size=1)
    assert count(store) == 0


def quarantined_lines(result: esw.ImportResult) -> list[dict[str, object]]:
    assert result.quarantine_path is not None
    lines = Path(result.quarantine_path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_gap_fails_naming_its_source_position(store: esw.Store, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("b", 1), event("a", 1), event("a", 3), event("a", 4)])
    with pytest.raises(esw.ConcurrencyError, match=r"position 3: .*'version' is 3.*gap") as caught:
        esw.import_events(store, source)
    assert (caught.value.aggregate_id, caught.value.actual) == ("a", 1)
    assert "Nothing of this import was committed" in str(caught.value)
    assert count(store) == 0


def test_quarantine_takes_version_conflicts_row_by_row(store: esw.Store, tmp_path: Path) -> None:
    first = tmp_path / "first.jsonl"
    write_lines(first, [event("c", 1), event("c", 2), event("f", 1)])
    rows = [
        event("a", 1),
        event("a", 3),  # a gap
        event("b", 1),
        event("a", 4),  # follows the gap
        event("b", 2),
        {**event("b", 1), "eventId": str(uuid.uuid4())},  # a duplicate (aggregate_id, version)
        event("d", 1),
        event("c", 1, eventId=str(uuid.uuid4())),  # a duplicate of a stored version
        event("d", 2),
        event("c", 3),  # follows the duplicate
        {**event("d", 3), "aggregateType": "Order"},  # another aggregate_type
        event("e", 1),
        event("f", 3),  # does not continue the store's head (1)
    ]
    source = tmp_path / "events.jsonl"
    write_lines(source, rows)
    for batch_size in (100, 1):  # one batch, or each row in a batch of its own
        target = esw.open_store(tmp_path / f"store-{batch_size}")
        esw.import_events(target, first)
        result = esw.import_events(target, source, on_error="quarantine", batch_size=batch_size)
        assert (result.imported, result.quarantined) == (6, 7)
        assert result.imported + result.quarantined == len(rows)
        assert result.last_position == len(rows)
        lines = quarantined_lines(result)
        reasons = {line["source_position"]: line["reason"] for line in lines}
        assert sorted(reasons) == [2, 4, 6, 8, 10, 11, 13]
        assert "is 3, but stream 'a' continues at version 2 (a gap)" in reasons[2]
        assert "stream 'a' was broken at source position 2" in reasons[4]
        assert "which stream 'b' already has (a duplicate)" in reasons[6]
        assert (
            "is 1, which stream 'c' already has (a duplicate); its next version is 3"
            in (reasons[8])
        )
        assert "stream 'c' was broken at source position 8" in reasons[10]
        assert "is 'Order', but stream 'd' is of aggregate_type 'Account'" in reasons[11]
        assert "is 3, but stream 'f' continues at version 2 (a gap)" in reasons[13]
        versions = target.sql("select aggregate_id, max(version) from events group by 1 order by 1")
        expected = [("a", 1), ("b", 2), ("c", 2), ("d", 2), ("e", 1), ("f", 1)]
        assert versions.fetchall() == expected
        assert target.sql("select count(*) from events").fetchall() == [(9,)]


def test_a_refused_row_breaks_its_stream_for_later_batches(
    store: esw.Store, tmp_path: Path
) -> None:
    source = tmp_path / "events.jsonl"
    rows = [event("a", 1), {**event("a", 2), "data": [1]}, event("b", 1), event("a", 3)]
    write_lines(source, rows)
    result = esw.import_events(store, source, on_error="quarantine", batch_size=2)
    assert (result.imported, result.quarantined) == (2, 2)
    lines = quarantined_lines(result)
    assert [line["source_position"] for line in lines] == [2, 4]
    assert "data" in str(lines[0]["reason"])
    assert "stream 'a' was broken at source position 2" in str(lines[1]["reason"])
    assert store.stream_version("a") == 1
    again = esw.import_events(store, source, on_error="quarantine")  # past the checkpoint
    assert (again.imported, again.quarantined) == (0, 0)


@pytest.mark.parametrize("batch_size", [100, 1])
def test_repeated_event_ids_are_refused_exactly(
    store: esw.Store, tmp_path: Path, batch_size: int
) -> None:
    first = tmp_path / "first.jsonl"
    write_lines(first, [event("s", 1)])
    esw.import_events(store, first)
    rows = [
        event("a", 1),
        {**event("b", 1), "eventId": event("a", 1)["eventId"]},  # repeats position 1
        event("c", 1, eventId=event("s", 1)["eventId"]),  # repeats a stored event
        event("b", 2),  # follows the refused b 1
        event("d", 1),
    ]
    source = tmp_path / "events.jsonl"
    write_lines(source, rows)
    with pytest.raises(esw.DuplicateEventError, match=r"position 2: .*event_id") as caught:
        esw.import_events(store, source, batch_size=batch_size)
    assert caught.value.event_id == event("a", 1)["eventId"]
    result = esw.import_events(store, source, on_error="quarantine", batch_size=batch_size)
    assert (result.imported, result.quarantined) == (2, 3)
    reasons = {line["source_position"]: line["reason"] for line in quarantined_lines(result)}
    assert "which source position 1 has too" in reasons[2] or (
        "this import has already given to version 1 of stream 'a'" in reasons[2]
    )
    assert "the store already holds at version 1 of stream 's'" in reasons[3]
    assert "stream 'b' was broken at source position 2" in reasons[4]
    ids = store.sql("select event_id from events").fetchall()
    assert len(ids) == len({i for (i,) in ids}) == 3


def test_unknown_format_and_missing_file_are_clear(store: esw.Store, tmp_path: Path) -> None:
    with pytest.raises(esw.EsWorkbenchError, match="unknown format"):
        esw.import_events(store, tmp_path / "x.jsonl", format="kafka")  # type: ignore[arg-type]
    with pytest.raises(esw.EsWorkbenchError, match="is not a file"):
        esw.import_events(store, tmp_path / "missing.jsonl")


# -- PostgreSQL, common schema --------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[str]:
    name = f"events_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.execute(
            f"CREATE TABLE {name} (id BIGSERIAL PRIMARY KEY, event_id UUID UNIQUE, "
            "event_type TEXT, aggregate_id TEXT, aggregate_type TEXT, version INT, data JSONB, "
            "metadata JSONB, timestamp TIMESTAMPTZ, UNIQUE (aggregate_id, version))"
        )
        yield name
        connection.execute(f"DROP TABLE {name}")


def insert(table: str, rows: list[tuple[object, ...]]) -> None:
    with psycopg.connect(DSN, autocommit=True) as connection:
        connection.cursor().executemany(
            f"INSERT INTO {table} (event_id, event_type, aggregate_id, aggregate_type, version, "
            "data, metadata, timestamp) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )


@pytest.mark.postgres
def test_postgres_import_follows_id_order_and_keeps_timestamps(
    store: esw.Store, pg_table: str
) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    insert(
        pg_table,
        [
            (
                ids[0],
                "AccountOpened",
                "a",
                "Account",
                1,
                '{"owner": "Zoë"}',
                None,
                "2024-01-02T00:00:00Z",
            ),
            # back-dated: a later id with an earlier timestamp
            (
                ids[1],
                "MoneyDeposited",
                "a",
                "Account",
                2,
                '{"amount": 12345678901234567890.01}',
                '{"correlationId": "c-1"}',
                "2024-01-01T00:00:00Z",
            ),
        ],
    )
    result = esw.import_events(store, DSN, format="common", table=pg_table)
    assert (result.imported, result.last_position) == (2, 2)
    rows = store.read_stream("a").to_pylist()
    assert [r["event_id"] for r in rows] == [str(i) for i in ids[:2]]
    assert rows[1]["recorded_at"] < rows[0]["recorded_at"]
    assert rows[1]["data"] == '{"amount":12345678901234567890.01}'
    assert rows[1]["correlation_id"] == "c-1"
    assert rows[0]["metadata"] is None
    insert(
        pg_table,
        [(ids[2], "MoneyWithdrawn", "a", "Account", 3, "{}", "{}", "2024-01-03T00:00:00Z")],
    )
    assert esw.import_events(store, DSN, table=pg_table).imported == 1
    assert store.stream_version("a") == 3


def test_spilled_runs_answer_as_runs_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for width in (0, 3):
        (tmp_path / str(width)).mkdir()
        spilled = _runs.SortedRuns(width=width, folder=tmp_path / str(width), memory_bytes=100)
        in_memory = _runs.SortedRuns(width=width)
        for _ in range(60):
            keys = np.unique(rng.integers(0, 400, int(rng.integers(0, 40))).astype(np.uint64))
            answers = [runs.find(keys) for runs in (spilled, in_memory)]
            for got, expected in zip(answers[0][:2], answers[1][:2], strict=True):
                assert np.array_equal(got, expected)
            found = answers[1][1]
            moved = rng.integers(0, 1000, (len(keys), width))
            for runs, (_, _, places) in zip((spilled, in_memory), answers, strict=True):
                runs.update(places, moved)
                runs.add(keys[~found], moved[~found])
        assert len(spilled) == len(in_memory) > 300


@pytest.mark.parametrize("on_error", ["fail", "quarantine"])
def test_an_import_that_spills_is_as_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_error: str
) -> None:
    monkeypatch.setattr(_runs, "MEMORY_BYTES", 256)  # a few keys in memory, the rest spilled
    monkeypatch.setattr(_runs, "_CHUNK", 5)
    store = esw.open_store(tmp_path / "store")
    first = tmp_path / "first.jsonl"
    write_lines(first, [event(f"s{i}", v) for i in range(20) for v in (1, 2)])
    esw.import_events(store, first, batch_size=7)
    rows: list[object] = [event(f"s{i}", 3) for i in range(20)]
    rows += [event(f"n{i}", 1) for i in range(40)]
    rows += [event(f"n{i}", 2) for i in range(40)]
    rows.append(event("late", 1, eventId=event("n3", 1)["eventId"]))  # repeats an early row
    rows.append(event("s4", 3, eventId=str(uuid.uuid4())))  # repeats a version spilled
    rows.append(event("n5", 3))
    source = tmp_path / "events.jsonl"
    write_lines(source, rows)
    if on_error == "fail":
        with pytest.raises(esw.DuplicateEventError, match="position 101: "):
            esw.import_events(store, source, batch_size=9)
        assert count(store) == 40
        assert not list(store.path.glob(".import-*"))
        return
    result = esw.import_events(store, source, on_error="quarantine", batch_size=9)
    assert (result.imported, result.quarantined) == (101, 2)
    reasons = [line["reason"] for line in quarantined_lines(result)]
    assert "this import has already given to version 1 of stream 'n3'" in reasons[0]
    assert "which stream 's4' already has (a duplicate)" in reasons[1]
    assert store.stream_version("n5") == 3
    assert store.stream_version("s7") == 3
    assert not list(store.path.glob(".import-*"))


def test_an_import_clears_what_a_killed_one_spilled(store: esw.Store, tmp_path: Path) -> None:
    left = store.path / ".import-killed"
    (left / "event_ids").mkdir(parents=True)
    (left / "event_ids" / "keys-3.u64").write_bytes(b"\0" * 64)
    source = tmp_path / "events.jsonl"
    write_lines(source, [event("a", 1)])
    assert esw.import_events(store, source).imported == 1
    assert not list(store.path.glob(".import-*"))
