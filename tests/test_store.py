"""The store: opening, appends and their version checks, reads, SQL, compaction, layout."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

import esworkbench as esw


@pytest.fixture
def store(tmp_path: Path) -> esw.Store:
    return esw.open_store(tmp_path / "store")


def opened(owner: str = "Ann") -> dict[str, object]:
    return {"event_type": "AccountOpened", "data": {"owner": owner}}


def deposit(amount: int, event_id: str | None = None) -> dict[str, object]:
    event: dict[str, object] = {"eventType": "MoneyDeposited", "data": {"amount": amount}}
    if event_id:
        event["eventId"] = event_id
    return event


# -- opening ------------------------------------------------------------------------------


def test_open_creates_then_reopens(tmp_path: Path) -> None:
    first = esw.open_store(tmp_path / "s")
    first.append("acc-1", [opened()], aggregate_type="Account", expected_version=0)
    again = esw.open_store(tmp_path / "s")
    assert again.stream_version("acc-1") == 1


def test_open_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(esw.StoreError, match="not an esworkbench store"):
        esw.open_store(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_open_refuses_a_newer_format(tmp_path: Path) -> None:
    esw.open_store(tmp_path / "s")
    marker = tmp_path / "s" / "store.json"
    body = json.loads(marker.read_text())
    body["format_version"] = 99
    marker.write_text(json.dumps(body))
    with pytest.raises(esw.StoreError, match="format version 99"):
        esw.open_store(tmp_path / "s")


def test_open_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(esw.StoreError, match="is a file"):
        esw.open_store(tmp_path / "f")


def test_open_without_create_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(esw.StoreError, match="esw init"):
        esw.open_store(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


# -- appends ------------------------------------------------------------------------------


def test_append_returns_the_new_version_and_versions_continue(store: esw.Store) -> None:
    assert store.append("acc-1", [opened()], aggregate_type="Account", expected_version=0) == 1
    assert store.append("acc-1", [deposit(5), deposit(7)], expected_version=1) == 3
    table = store.read_stream("acc-1")
    assert table.column("version").to_pylist() == [1, 2, 3]
    assert table.column("aggregate_type").to_pylist() == ["Account"] * 3


def test_expected_version_mismatch_names_stream_expected_and_actual(store: esw.Store) -> None:
    store.append("acc-1", [opened()], aggregate_type="Account", expected_version=0)
    with pytest.raises(esw.ConcurrencyError) as caught:
        store.append("acc-1", [deposit(1)], expected_version=0)
    assert (caught.value.aggregate_id, caught.value.expected, caught.value.actual) == (
        "acc-1",
        0,
        1,
    )
    assert "'acc-1'" in str(caught.value)
    assert "version 1" in str(caught.value)
    assert store.stream_version("acc-1") == 1


def test_stream_exists_and_any(store: esw.Store) -> None:
    with pytest.raises(esw.ConcurrencyError, match="expected to exist"):
        store.append(
            "acc-1", [opened()], aggregate_type="Account", expected_version=esw.STREAM_EXISTS
        )
    assert (
        store.append("acc-1", [opened()], aggregate_type="Account", expected_version=esw.ANY) == 1
    )
    assert store.append("acc-1", [deposit(1)], expected_version=esw.STREAM_EXISTS) == 2
    assert store.append("acc-1", [deposit(1)]) == 3


def test_bad_expected_version_is_refused(store: esw.Store) -> None:
    for bad in (-1, "1", True, 1.0):
        with pytest.raises(esw.InvalidEventError, match="expected_version"):
            store.append("acc-1", [opened()], aggregate_type="Account", expected_version=bad)  # type: ignore[arg-type]


def test_new_stream_needs_its_aggregate_type(store: esw.Store) -> None:
    with pytest.raises(esw.InvalidEventError, match="aggregate_type must be given"):
        store.append("acc-1", [opened()])


def test_a_stream_keeps_its_aggregate_type(store: esw.Store) -> None:
    store.append("acc-1", [opened()], aggregate_type="Account")
    with pytest.raises(esw.InvalidEventError, match="aggregate_type 'Account'"):
        store.append("acc-1", [deposit(1)], aggregate_type="Order")


def test_explicit_versions_must_continue_the_head(store: esw.Store) -> None:
    store.append("acc-1", [opened()], aggregate_type="Account")
    with pytest.raises(esw.ConcurrencyError):
        store.append("acc-1", [{**deposit(1), "version": 3}])
    assert store.append("acc-1", [{**deposit(1), "version": 2}]) == 2


def test_retry_with_the_same_event_ids_is_a_no_op(store: esw.Store) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2)]
    events = [{**opened(), "event_id": ids[0]}, deposit(3, ids[1])]
    first = store.append("acc-1", events, aggregate_type="Account", expected_version=0)
    again = store.append("acc-1", events, aggregate_type="Account", expected_version=0)
    assert first == again == 2
    assert store.sql("select count(*) from events").fetchall() == [(2,)]


def test_event_id_stored_elsewhere_is_a_duplicate(store: esw.Store) -> None:
    event_id = str(uuid.uuid4())
    store.append("acc-1", [deposit(1, event_id)], aggregate_type="Account")
    with pytest.raises(esw.DuplicateEventError, match=event_id) as caught:
        store.append("acc-2", [deposit(1, event_id)], aggregate_type="Account")
    assert caught.value.event_id == event_id
    # Same stream but a different place (not a retry of the same append) is a duplicate too.
    with pytest.raises(esw.DuplicateEventError):
        store.append("acc-1", [deposit(2), deposit(1, event_id)])
    assert store.sql("select count(*) from events").fetchall() == [(1,)]


def test_repeated_id_inside_one_append_is_refused(store: esw.Store) -> None:
    event_id = str(uuid.uuid4())
    with pytest.raises(esw.DuplicateEventError):
        store.append("a", [deposit(1, event_id), deposit(2, event_id)], aggregate_type="Account")


def test_a_bad_event_rejects_the_whole_append(store: esw.Store) -> None:
    with pytest.raises(esw.InvalidEventError, match="event 1"):
        store.append("acc-1", [opened(), {"event_type": "X", "data": 3}], aggregate_type="Account")
    assert store.stream_version("acc-1") == 0


def test_positions_increase_strictly_across_streams(store: esw.Store) -> None:
    store.append("a", [opened(), deposit(1)], aggregate_type="Account")
    store.append("b", [opened()], aggregate_type="Account")
    store.append("a", [deposit(2)])
    rows = store.sql("select aggregate_id, version, position from events order by position")
    assert rows.fetchall() == [("a", 1, 1), ("a", 2, 2), ("b", 1, 3), ("a", 3, 4)]


# -- batch appends ------------------------------------------------------------------------


def test_batch_append_of_many_streams_in_one_commit(store: esw.Store) -> None:
    version_before = store.refresh()
    events = [
        {
            "aggregateId": f"acc-{i % 3}",
            "aggregateType": "Account",
            "eventType": "Tick",
            "data": {"i": i},
        }
        for i in range(9)
    ]
    result = store.append_batch(events)
    assert (result.events, result.streams, result.first_position, result.last_position) == (
        9,
        3,
        1,
        9,
    )
    assert store.refresh() == version_before + 1
    assert store.read_stream("acc-2").column("version").to_pylist() == [1, 2, 3]


def test_batch_append_from_arrow_checks_versions_against_heads(store: esw.Store) -> None:
    store.append("acc-1", [opened()], aggregate_type="Account")
    batch = pa.table(
        {
            "aggregate_id": ["acc-1", "acc-2"],
            "aggregate_type": ["Account", "Account"],
            "event_type": ["MoneyDeposited", "AccountOpened"],
            "version": [3, 1],
            "data": ['{"amount": 1}', "{}"],
        }
    )
    with pytest.raises(esw.ConcurrencyError, match="'acc-1'"):
        store.append_batch(batch)
    fixed = batch.set_column(3, "version", pa.array([2, 1]))
    assert store.append_batch(fixed).events == 2
    assert store.stream_version("acc-1") == 2


def test_batch_from_arrow_refuses_bad_rows_with_their_index(store: esw.Store) -> None:
    batch = pa.table(
        {
            "aggregate_id": ["a", "b"],
            "aggregate_type": ["Account", "Account"],
            "event_type": ["X", "Y"],
            "data": ["{}", "[1]"],
        }
    )
    with pytest.raises(esw.InvalidEventError, match=r"event 1: field 'data' must be a JSON object"):
        store.append_batch(batch)
    naive = batch.append_column("recorded_at", pa.array([datetime(2024, 1, 1)] * 2))
    with pytest.raises(esw.InvalidEventError, match="naive"):
        store.append_batch(naive)
    assert store.sql("select count(*) from events").fetchall() == [(0,)]


def test_batch_from_arrow_takes_what_the_cheap_checks_cannot_prove(store: esw.Store) -> None:
    """Rows the column-wise fast path cannot vouch for go through the exact checks."""
    batch = pa.table(
        {
            "aggregate_id": ["a", "b", "c"],
            "aggregate_type": ["Account"] * 3,
            "event_type": ["X"] * 3,
            "data": [' {"padded": true}', "{}", "{}"],
            "metadata": [
                None,
                '\n {"correlationId": "k-1"}',
                '{"\\u0063ausationId": "c-1", "user_id": "u-1"}',
            ],
        }
    )
    assert store.append_batch(batch).events == 3
    rows = store.sql(
        "select aggregate_id, data, correlation_id, causation_id, user_id from events "
        "order by aggregate_id"
    ).fetchall()
    assert rows == [
        ("a", ' {"padded": true}', None, None, None),
        ("b", "{}", "k-1", None, None),
        ("c", "{}", None, "c-1", "u-1"),
    ]
    broken = batch.set_column(4, "metadata", pa.array([None, "{}", '{"userId": '], pa.string()))
    with pytest.raises(esw.InvalidEventError, match=r"event 2: field 'metadata'"):
        store.append_batch(broken)


def test_batch_retry_is_a_no_op(store: esw.Store) -> None:
    events = [
        {
            "aggregateId": "o-1",
            "aggregateType": "Order",
            "eventType": "OrderPlaced",
            "eventId": str(uuid.uuid4()),
            "data": {},
        }
        for _ in range(3)
    ]
    first = store.append_batch(events)
    again = store.append_batch(events)
    assert first == again
    assert store.stream_version("o-1") == 3


# -- reads --------------------------------------------------------------------------------


def test_read_stream_bounds(store: esw.Store) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    events = [{**deposit(i), "recorded_at": t0 + timedelta(minutes=i)} for i in range(5)]
    store.append("acc-1", events, aggregate_type="Account")
    versions = lambda table: table.column("version").to_pylist()  # noqa: E731
    assert versions(store.read_stream("acc-1", from_version=2, to_version=4)) == [2, 3, 4]
    assert versions(store.read_stream("acc-1", until=t0 + timedelta(minutes=2))) == [1, 2, 3]
    just_before = t0 + timedelta(minutes=2) - timedelta(microseconds=1)
    assert versions(store.read_stream("acc-1", until=just_before)) == [1, 2]
    assert store.read_stream("acc-1").schema == esw.EVENT_SCHEMA
    with pytest.raises(esw.InvalidEventError, match="naive"):
        store.read_stream("acc-1", until=datetime(2024, 1, 1))


def test_read_all_is_in_position_order_in_bounded_batches(store: esw.Store) -> None:
    for i in range(5):
        store.append_batch(
            [
                {"aggregateId": f"s{j}", "aggregateType": "T", "eventType": "E", "data": {"i": i}}
                for j in range(7)
            ]
        )
    batches = list(store.read_all(batch_size=4))
    assert all(b.num_rows <= 4 for b in batches)
    positions = [p for b in batches for p in b.column("position").to_pylist()]
    assert positions == list(range(1, 36))
    tail = [p for b in store.read_all(from_position=30) for p in b.column("position").to_pylist()]
    assert tail == [31, 32, 33, 34, 35]


# -- SQL ----------------------------------------------------------------------------------


def test_sql_results_as_pandas_polars_and_arrow(store: esw.Store) -> None:
    store.append("acc-1", [opened(), deposit(5)], aggregate_type="Account")
    query = "select aggregate_id, version from events where aggregate_type = ? order by version"
    assert store.sql(query, ["Account"]).df()["version"].tolist() == [1, 2]
    assert store.sql(query, ["Account"]).pl()["version"].to_list() == [1, 2]
    assert store.sql(query, ["Account"]).to_arrow_table().num_rows == 2
    streams = store.sql("select aggregate_id, last_version, event_count from streams")
    assert streams.fetchall() == [("acc-1", 2, 2)]


def test_sql_values_travel_as_parameters(store: esw.Store) -> None:
    store.append("acc-1", [opened()], aggregate_type="Account")
    hostile = "x' or '1'='1"
    assert store.sql(
        "select count(*) from events where aggregate_id = ?", [hostile]
    ).fetchall() == [(0,)]


def test_sql_error_shows_query_and_duckdb_message(store: esw.Store) -> None:
    with pytest.raises(esw.QueryError) as caught:
        store.sql("select nope from events")
    assert "select nope from events" in str(caught.value)
    assert "nope" in str(caught.value).splitlines()[0]
    assert caught.value.query == "select nope from events"
    with pytest.raises(esw.EsWorkbenchError):
        store.sql("selec 1")


def test_sql_sees_appends_made_through_another_handle(tmp_path: Path) -> None:
    reader = esw.open_store(tmp_path / "s")
    assert reader.sql("select count(*) from events").fetchall() == [(0,)]
    writer = esw.open_store(tmp_path / "s")
    writer.append("a", [opened()], aggregate_type="Account")
    assert reader.sql("select count(*) from events").fetchall() == [(1,)]


def test_sql_reads_timestamps_in_utc(store: esw.Store) -> None:
    at = datetime(2024, 3, 31, 1, 30, tzinfo=UTC)
    store.append("a", [{**opened(), "timestamp": at}], aggregate_type="Account")
    [(value,)] = store.sql("select recorded_at from events").fetchall()
    assert value == at


# -- layout -------------------------------------------------------------------------------


PATH_LIKE = ["../x", "a/b", "%2F", "..", ".", "ünï ☃", "C:\\win", "x" * 300, "a=b", " spaced "]


@pytest.mark.parametrize("kind", PATH_LIKE)
def test_path_like_aggregate_types_round_trip_inside_the_store(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "store"
    store = esw.open_store(root)
    store.append("s-1", [opened()], aggregate_type=kind)
    store.append_batch(
        [{"aggregateId": "s-2", "aggregateType": kind, "eventType": "E", "data": {}}]
    )
    assert store.read_stream("s-1").column("aggregate_type").to_pylist() == [kind]
    assert store.sql("select count(*) from events where aggregate_type = ?", [kind]).fetchall() == [
        (2,)
    ]
    outside = {p for p in tmp_path.rglob("*") if not p.is_relative_to(root)}
    assert outside == set()
    data_files = list((root / "events").rglob("*.parquet"))
    assert data_files
    assert all(p.parent.parent == root / "events" for p in data_files)
    assert store.compact() == 2
    assert store.read_stream("s-2").column("aggregate_type").to_pylist() == [kind]


def test_empty_aggregate_type_is_refused(store: esw.Store) -> None:
    with pytest.raises(esw.InvalidEventError, match="aggregate_type"):
        store.append("a", [opened()], aggregate_type="")
    with pytest.raises(esw.InvalidEventError, match="aggregate_type"):
        store.append_batch(
            [{"aggregateId": "a", "aggregateType": "", "eventType": "E", "data": {}}]
        )


def test_other_delta_readers_see_the_same_events(store: esw.Store) -> None:
    import deltalake
    import polars as pl

    store.append("acc-1", [opened(), deposit(1)], aggregate_type="Account")
    store.append("o-1", [opened()], aggregate_type="../x")
    table = deltalake.DeltaTable(str(store.table_path)).to_pyarrow_table()
    assert sorted(table.column("aggregate_type").to_pylist()) == ["../x", "Account", "Account"]
    frame = pl.read_delta(str(store.table_path))
    assert sorted(frame["aggregate_type"].to_list()) == ["../x", "Account", "Account"]


def test_compact_merges_files_without_changing_what_readers_see(store: esw.Store) -> None:
    for i in range(6):
        store.append(f"acc-{i % 2}", [deposit(i)], aggregate_type="Account")
    before = store.sql("select * from events order by position").fetchall()
    files_before = store.sql(
        "select count(distinct filename) from read_parquet(?, filename=true)",
        [str(store.table_path / "**/*.parquet")],
    )
    assert files_before.fetchall()[0][0] == 6
    assert store.compact() == 6
    assert store.sql("select * from events order by position").fetchall() == before
    assert store.compact() == 0
    assert store.read_stream("acc-1").column("version").to_pylist() == [1, 2, 3]
    store.append("acc-1", [deposit(9)])
    assert store.stream_version("acc-1") == 4
