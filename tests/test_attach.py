"""Attached lakes: foreign Delta tables and hive Parquet read exactly as a store reads its own."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from deltalake import write_deltalake

import esworkbench as esw
from esworkbench import cli
from esworkbench.events import EVENT_SCHEMA

# Partition values a path cannot hold as they are: a slash, a space, an equals sign, non-ASCII.
KINDS = ("Account", "Order/Line Zürich=1", "100%")
T0 = datetime(2024, 3, 1, tzinfo=UTC)


def _events() -> list[dict[str, Any]]:
    events = []
    for i in range(60):
        kind = KINDS[i % 3]
        metadata: dict[str, Any] = {"correlationId": f"c-{i % 4}", "source": "test"}
        if i % 5 == 0:
            metadata["userId"] = "u-7"
        events.append(
            {
                "aggregateId": f"{kind}-{i % 7}",
                "aggregateType": kind,
                "eventType": "Happened",
                "timestamp": (T0 + timedelta(minutes=i)).isoformat(),
                "occurredAt": (T0 + timedelta(minutes=i - (30 if i % 9 == 0 else 0))).isoformat(),
                "schemaVersion": 1 + i % 2,
                "data": {"n": i, "amount": "10.10", "note": "ünïcödé"},
                "metadata": metadata,
            }
        )
    return events


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[esw.Store]:
    store = esw.open_store(tmp_path_factory.mktemp("attach") / "store")
    store.append_batch(_events())
    yield store
    store.close()


@pytest.fixture(scope="module")
def rows(store: esw.Store) -> pa.Table:
    """The store's events, as a foreign writer would have them: the canonical columns."""
    return store.sql("select * from events order by position").to_arrow_table()


def _same_as_store(lake: esw.AttachedLake, store: esw.Store) -> None:
    query = "select * from events order by position"
    assert lake.sql(query).to_arrow_table().equals(store.sql(query).to_arrow_table())
    streams = "select * from streams order by aggregate_id"
    assert lake.sql(streams).fetchall() == store.sql(streams).fetchall()
    for (stream,) in store.sql("select distinct aggregate_id from events").fetchall():
        for bounds in ({}, {"from_version": 2, "to_version": 3}, {"until": T0 + timedelta(20)}):
            expected = store.read_stream(stream, **bounds)
            assert lake.read_stream(stream, **bounds).equals(expected), (stream, bounds)
    batches = list(lake.read_all(batch_size=7))
    assert all(b.schema.equals(EVENT_SCHEMA) for b in batches)
    assert pa.Table.from_batches(batches).equals(
        pa.Table.from_batches(list(store.read_all(batch_size=7)))
    )


def test_the_views_have_the_store_columns_and_types(
    tmp_path: Path, store: esw.Store, rows: pa.Table
) -> None:
    write_deltalake(tmp_path / "lake", rows, partition_by=["aggregate_type"])
    lake = esw.attach(tmp_path / "lake")
    for view in ("events", "streams"):
        assert lake.sql(f"describe {view}").fetchall() == store.sql(f"describe {view}").fetchall()


def test_a_delta_table_partitioned_elsewhere_reads_like_the_store(
    tmp_path: Path, store: esw.Store, rows: pa.Table
) -> None:
    # Shuffled and split over two commits: positions come from the mapped column, not order.
    shuffled = rows.take(pa.array(list(range(59, -1, -2)) + list(range(0, 60, 2))))
    write_deltalake(tmp_path / "lake", shuffled.slice(0, 30), partition_by=["aggregate_type"])
    write_deltalake(
        tmp_path / "lake", shuffled.slice(30), partition_by=["aggregate_type"], mode="append"
    )
    lake = esw.attach(tmp_path / "lake", columns={"position": "position"})
    assert lake.format == "delta"
    assert {k for (k,) in lake.sql("select aggregate_type from events").fetchall()} == set(KINDS)
    _same_as_store(lake, store)


def test_delta_partition_values_come_from_the_log_not_the_paths(
    tmp_path: Path, rows: pa.Table
) -> None:
    table = tmp_path / "lake"
    write_deltalake(table, rows, partition_by=["aggregate_type"])
    # Move every file to a directory whose name says nothing, as a foreign tool may lay them out.
    log = table / "_delta_log" / f"{0:020d}.json"
    actions = [json.loads(line) for line in log.read_text().splitlines()]
    for number, action in enumerate(a for a in actions if "add" in a):
        old = table / unquote(action["add"]["path"])
        new = f"moved-{number}/{old.name}"
        (table / new).parent.mkdir()
        old.rename(table / new)
        action["add"]["path"] = new
    log.write_text("".join(json.dumps(a) + "\n" for a in actions))
    lake = esw.attach(table)
    kinds = lake.sql("select aggregate_type, count(*) from events group by 1 order by 1")
    assert kinds.fetchall() == [(k, 20) for k in sorted(KINDS)]


def test_delta_column_mapping_reads_the_physical_columns(
    tmp_path: Path, store: esw.Store, rows: pa.Table
) -> None:
    write_deltalake(
        tmp_path / "lake",
        rows,
        partition_by=["aggregate_type"],
        configuration={"delta.columnMapping.mode": "name"},
    )
    written = pq.read_schema(next((tmp_path / "lake").glob("*/*.parquet")))
    assert "aggregate_id" not in written.names  # the files hold physical names only
    lake = esw.attach(tmp_path / "lake", columns={"position": "position"})
    _same_as_store(lake, store)


@pytest.mark.parametrize("writer", ["pyarrow", "duckdb"])
def test_hive_parquet_with_escaped_partition_values(
    tmp_path: Path, store: esw.Store, rows: pa.Table, writer: str
) -> None:
    folder = tmp_path / "hive"
    if writer == "pyarrow":
        ds.write_dataset(
            rows, folder, format="parquet", partitioning=["aggregate_type"],
            partitioning_flavor="hive",
        )  # fmt: skip
    else:
        connection = duckdb.connect()
        connection.register("source_rows", rows)
        connection.execute(
            f"COPY source_rows TO '{folder}' (FORMAT parquet, PARTITION_BY (aggregate_type))"
        )
    assert any("%" in p.name for p in folder.iterdir())  # the values were escaped
    lake = esw.attach(folder, columns={"position": "position"})
    assert lake.format == "parquet"
    _same_as_store(lake, store)
    by_glob = esw.attach(str(folder / "*" / "*.parquet"), columns={"position": "position"})
    assert by_glob.sql("select count(*) from events").fetchall() == [(60,)]


def test_a_column_mapping_and_the_canonical_defaults(tmp_path: Path) -> None:
    folder = tmp_path / "lake"
    folder.mkdir()
    pq.write_table(
        pa.table(
            {
                "stream": pa.array([7, 7, 8], pa.int32()),
                "kind": ["Account"] * 3,
                "type": ["Opened", "Deposited", "Opened"],
                "seq": pa.array([1, 2, 1], pa.int32()),
                "payload": pa.array(
                    [{"amount": 1.5}, {"amount": 2.0}, {"amount": None}],
                    pa.struct([("amount", pa.float64())]),
                ),
                "meta": ['{"correlation_id": "c-1", "userId": 42}', None, "not json"],
                "ts": pa.array([datetime(2024, 1, 1, 12)] * 3, pa.timestamp("ns")),
            }
        ),
        folder / "part-0.parquet",
    )
    columns = {
        "aggregate_id": "stream",
        "aggregate_type": "kind",
        "event_type": "type",
        "version": "seq",
        "data": "payload",
        "metadata": "meta",
        "recorded_at": "ts",
    }
    with pytest.raises(esw.InvalidEventError, match=r"without a zone.*Hint: .*tz="):
        esw.attach(folder, columns=columns)
    lake = esw.attach(folder, columns=columns, tz="Europe/Berlin")
    table = lake.read_stream("7")
    assert table.schema.equals(EVENT_SCHEMA)
    row = table.to_pylist()[0]
    assert row["position"] == 1
    assert row["recorded_at"] == row["occurred_at"] == datetime(2024, 1, 1, 11, tzinfo=UTC)
    assert row["schema_version"] == 1
    assert json.loads(row["data"]) == {"amount": 1.5}
    assert (row["correlation_id"], row["causation_id"], row["user_id"]) == ("c-1", None, "42")
    ids = [r[0] for r in lake.sql("select event_id from events order by position").fetchall()]
    assert len(set(ids)) == 3
    assert all(len(i) == 36 for i in ids)
    again = esw.attach(folder, columns=columns, tz="Europe/Berlin")
    assert [
        r[0] for r in again.sql("select event_id from events order by position").fetchall()
    ] == ids
    metadata = lake.sql("select metadata, correlation_id from events order by position")
    assert metadata.fetchall()[1:] == [(None, None), ("not json", None)]


def test_missing_optional_columns_get_the_defaults(tmp_path: Path) -> None:
    pq.write_table(
        pa.table(
            {
                "aggregateId": ["a", "a"],
                "aggregateType": ["Account"] * 2,
                "eventType": ["Opened", "Closed"],
                "version": [1, 2],
                "data": ["{}", '{"why": "moved"}'],
                "timestamp": ["2024-01-01T10:00:00+02:00", "2024-01-02T00:00:00Z"],
            }
        ),
        tmp_path / "0.parquet",
    )
    lake = esw.attach(tmp_path)
    rows = lake.sql("select * from events order by position").to_arrow_table().to_pylist()
    assert [r["recorded_at"] for r in rows] == [
        datetime(2024, 1, 1, 8, tzinfo=UTC),
        datetime(2024, 1, 2, tzinfo=UTC),
    ]
    assert [r["occurred_at"] for r in rows] == [r["recorded_at"] for r in rows]
    assert [(r["metadata"], r["schema_version"], r["user_id"]) for r in rows] == [
        ("{}", 1, None)
    ] * 2


def test_positions_follow_file_order_without_a_position_column(
    tmp_path: Path, rows: pa.Table
) -> None:
    without = rows.drop_columns(["position"])
    pq.write_table(without.slice(30), tmp_path / "b.parquet", row_group_size=8)
    pq.write_table(without.slice(0, 30), tmp_path / "a.parquet", row_group_size=8)
    lake = esw.attach(tmp_path)
    events = lake.sql("select * from events order by position").to_arrow_table()
    assert events["position"].to_pylist() == list(range(1, 61))
    assert events.drop_columns(["position"]).equals(without)  # a.parquet first, then b
    streamed = pa.Table.from_batches(list(lake.read_all(from_position=25, batch_size=4)))
    assert streamed["position"].to_pylist() == list(range(26, 61))
    assert streamed.equals(events.slice(25).cast(EVENT_SCHEMA))


def test_read_all_walks_sparse_mapped_positions(tmp_path: Path, rows: pa.Table) -> None:
    sparse = rows.set_column(0, "position", pa.array([p * 1_000_003 for p in range(60)]))
    pq.write_table(sparse, tmp_path / "0.parquet")
    lake = esw.attach(tmp_path, columns={"position": "position"})
    positions = [p for b in lake.read_all(batch_size=5) for p in b["position"].to_pylist()]
    assert positions == [p * 1_000_003 for p in range(1, 60)]  # position > 0
    later = [
        p for b in lake.read_all(from_position=50 * 1_000_003) for p in b["position"].to_pylist()
    ]
    assert later == [p * 1_000_003 for p in range(51, 60)]


def test_a_delta_lake_follows_new_commits(tmp_path: Path, rows: pa.Table) -> None:
    write_deltalake(tmp_path / "lake", rows.slice(0, 10))
    lake = esw.attach(tmp_path / "lake", columns={"position": "position"})
    assert lake.sql("select count(*) from events").fetchall() == [(10,)]
    write_deltalake(tmp_path / "lake", rows.slice(10), mode="append")
    assert lake.sql("select count(*) from events").fetchall() == [(60,)]
    assert lake.read_stream(rows["aggregate_id"][59].as_py()).num_rows > 0


def test_writing_is_refused(tmp_path: Path, rows: pa.Table) -> None:
    write_deltalake(tmp_path / "lake", rows)
    lake = esw.attach(tmp_path / "lake")
    for write in (
        lambda: lake.append("a", [{"eventType": "E", "data": {}}]),
        lambda: lake.append_batch(rows),
        lambda: lake.compact(),
        lambda: esw.import_events(lake, tmp_path / "events.jsonl"),  # type: ignore[arg-type]
    ):
        with pytest.raises(esw.ReadOnlyError, match=r"read-only\. Hint: "):
            write()
    assert lake.sql("select count(*) from events").fetchall() == [(60,)]


def test_a_store_directory_attaches_its_events_table(store: esw.Store) -> None:
    lake = esw.attach(store.path)
    assert lake.format == "delta"
    _same_as_store(lake, store)


def test_errors_say_what_is_missing(tmp_path: Path, rows: pa.Table) -> None:
    with pytest.raises(esw.StoreError, match="does not exist"):
        esw.attach(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(esw.StoreError, match=r"no Parquet files .*Hint"):
        esw.attach(tmp_path / "empty")
    with pytest.raises(esw.StoreError, match="not a Delta table"):
        esw.attach(tmp_path / "empty", format="delta")
    pq.write_table(rows.drop_columns(["recorded_at"]), tmp_path / "empty" / "0.parquet")
    with pytest.raises(esw.StoreError, match=r"no column for recorded_at.*columns="):
        esw.attach(tmp_path / "empty")
    with pytest.raises(esw.InvalidEventError, match="has no column 'nope'"):
        esw.attach(tmp_path / "empty", columns={"recorded_at": "nope"})
    with pytest.raises(esw.StoreError, match="no column for position"):
        esw.attach(tmp_path / "empty", columns={"recorded_at": "occurred_at", "position": "p"})
    lake = esw.attach(tmp_path / "empty", columns={"recorded_at": "occurred_at"})
    with pytest.raises(esw.InvalidEventError, match="naive"):
        lake.read_stream("a", until=datetime(2024, 1, 1))
    with pytest.raises(esw.QueryError, match="Hint"):
        lake.sql("select nope from events")


def test_naive_text_instants_need_a_zone(tmp_path: Path) -> None:
    pq.write_table(
        pa.table(
            {
                "aggregate_id": ["a"], "aggregate_type": ["T"], "event_type": ["E"],
                "version": [1], "data": ["{}"], "recorded_at": ["2024-01-01 12:00:00"],
            }
        ),
        tmp_path / "0.parquet",
    )  # fmt: skip
    with pytest.raises(duckdb.Error, match=r"without a zone.*tz="):  # found as the rows are read
        esw.attach(tmp_path).sql("select recorded_at from events").fetchall()
    with pytest.raises(esw.QueryError, match=r"without a zone.*tz="):
        esw.attach(tmp_path).read_stream("a")
    berlin = esw.attach(tmp_path, tz="Europe/Berlin")
    assert berlin.sql("select recorded_at from events").fetchall() == [
        (datetime(2024, 1, 1, 11, tzinfo=UTC),)
    ]


def test_esw_sql_queries_a_foreign_lake(tmp_path: Path, rows: pa.Table) -> None:
    write_deltalake(tmp_path / "lake", rows, partition_by=["aggregate_type"])
    result = CliRunner().invoke(
        cli.main,
        ["sql", str(tmp_path / "lake"), "select count(*) as n from events", "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"n": 60}]
    missing = CliRunner().invoke(cli.main, ["sql", str(tmp_path / "nope"), "select 1"])
    assert missing.exit_code == 1
    assert "not an esworkbench store" in missing.output


def test_attach_keeps_no_path_of_the_machine_in_repr(tmp_path: Path, rows: pa.Table) -> None:
    write_deltalake(tmp_path / "lake", rows)
    lake = esw.attach(os.path.relpath(tmp_path / "lake"))
    assert repr(lake).startswith("AttachedLake(")
    assert "format='delta'" in repr(lake)
    assert lake.path == (tmp_path / "lake").resolve()
