"""Exporters: what a store holds, written out and read back, is the same events."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esworkbench as esw
from esworkbench.demo import write_demo
from esworkbench.events import EVENT_SCHEMA
from esworkbench.sources import export
from esworkbench.sources.export import export_csv, export_jsonl, export_parquet
from esworkbench.sources.files import read_csv, read_jsonl, read_table

Rows = list[dict[str, Any]]
CANONICAL = [name for name in EVENT_SCHEMA.names if name != "position"]
FORMATS: dict[str, tuple[Callable[..., int], Callable[..., Iterator[pa.Table]]]] = {
    "events.jsonl": (export_jsonl, read_jsonl),
    "events.jsonl.gz": (export_jsonl, read_jsonl),
    "events.jsonl.zst": (export_jsonl, read_jsonl),
    "events.csv": (export_csv, read_csv),
    "events.csv.zst": (export_csv, read_csv),
    "events.parquet": (export_parquet, read_table),
}


def stored(store: esw.Store, where: str = "true", params: list[object] | None = None) -> Rows:
    query = f"select * from events where {where} order by position"
    rows: Rows = store.sql(query, params).to_arrow_table().select(CANONICAL).to_pylist()
    return rows


def read_back(read: Callable[..., Iterator[pa.Table]], path: Path) -> Rows:
    rows: Rows = []
    for table in read(path, batch_size=1000):
        rows += table.to_pylist()
    assert [r["error"] for r in rows] == [None] * len(rows)
    assert [r["source_position"] for r in rows] == list(range(1, len(rows) + 1))
    return [{name: r[name] for name in CANONICAL} for r in rows]


def export_and_read(store: esw.Store, path: Path, **options: Any) -> Rows:
    export, read = FORMATS[path.name]
    written = export(store, path, **options)
    rows = read_back(read, path)
    assert written == len(rows)
    return rows


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[esw.Store]:
    store = esw.open_store(tmp_path_factory.mktemp("demo") / "store")
    write_demo(store, 3000, seed=3, batch_size=1000)
    yield store
    store.close()


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_demo_history_round_trips(demo_store: esw.Store, tmp_path: Path, name: str) -> None:
    assert export_and_read(demo_store, tmp_path / name) == stored(demo_store)


def tricky_events() -> pa.Table:
    """Exact decimals, unicode, a megabyte, null metadata, ids outside metadata, back-dating."""
    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    rows = [
        {
            "event_type": "MoneyDeposited",
            "aggregate_type": "Account",
            "aggregate_id": "acc-1",
            "recorded_at": at,
            "occurred_at": at - timedelta(days=2, microseconds=1),
            "schema_version": 2,
            "data": '{"amount":10.10,"big":12345678901234567890.5,"e":1E+5,"neg":-0.0}',
            "metadata": '{"correlationId":"c-1","note":"ünï"}',
            "causation_id": "not-in-metadata",
        },
        {
            "event_type": "Überwiesen",
            "aggregate_type": "Kontö",
            "aggregate_id": "конто/1",
            "recorded_at": at + timedelta(microseconds=1),
            "data": json.dumps(
                {"text": "é" * 400_000 + '😀\n"', "tab": "\t"},
                ensure_ascii=False,
                separators=(",", ":"),
            ),
            "metadata": None,
            "user_id": "u-1",
        },
        {
            "event_type": "Quoted",
            "aggregate_type": "Account",
            "aggregate_id": 'acc,"2"',
            "recorded_at": at + timedelta(seconds=1),
            "data": "{}",
            "metadata": '{"userId":"u-9","correlation_id":"c-9"}',
            "correlation_id": "overrides-c-9",
        },
        {
            "event_type": "Odd",
            "aggregate_type": "Account",
            "aggregate_id": "acc-3",
            "recorded_at": at + timedelta(seconds=2),
            "data": "{}",
            # The store takes these as text; the reader wants them at the top level then.
            "metadata": '{"userId":true,"correlationId":42,"causationId":null,'
            '"causation_id":"c\\"q"}',
        },
    ]
    names = sorted({name for row in rows for name in row})
    return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])


@pytest.fixture
def tricky_store(tmp_path: Path) -> Iterator[esw.Store]:
    store = esw.open_store(tmp_path / "store")
    store.append_batch(tricky_events())
    yield store
    store.close()


@pytest.mark.parametrize("name", list(FORMATS))
def test_exact_text_unicode_large_payloads_and_nulls_round_trip(
    tricky_store: esw.Store, tmp_path: Path, name: str
) -> None:
    rows = export_and_read(tricky_store, tmp_path / name)
    assert rows == stored(tricky_store)
    assert rows[0]["data"] == '{"amount":10.10,"big":12345678901234567890.5,"e":1E+5,"neg":-0.0}'
    assert len(rows[1]["data"].encode()) > 800_000
    assert rows[1]["metadata"] is None
    assert (rows[0]["causation_id"], rows[2]["correlation_id"]) == (
        "not-in-metadata",
        "overrides-c-9",
    )


def test_the_jsonl_shape(tricky_store: esw.Store, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    export_jsonl(tricky_store, path)
    first, second, third, fourth = path.read_text(encoding="utf-8").splitlines()
    assert first.startswith('{"eventId":"')
    assert list(json.loads(first)) == [
        "eventId", "eventType", "aggregateType", "aggregateId", "version", "timestamp",
        "occurredAt", "schemaVersion", "data", "metadata", "causationId",
    ]  # fmt: skip
    assert '"timestamp":"2024-05-01T12:00:00.000000Z"' in first
    assert '"occurredAt":"2024-04-29T11:59:59.999999Z"' in first
    assert '"data":{"amount":10.10,"big":12345678901234567890.5' in first
    assert "occurredAt" not in second
    assert "metadata" not in second
    assert json.loads(second)["userId"] == "u-1"
    assert json.loads(third)["correlationId"] == "overrides-c-9"
    assert "userId" not in json.loads(third)  # the metadata says it already
    assert {k: v for k, v in json.loads(fourth).items() if k.endswith("Id")} == {
        "eventId": json.loads(fourth)["eventId"],
        "aggregateId": "acc-3",
        "correlationId": "42",
        "userId": "true",
    }


def test_filters_bind_their_values(demo_store: esw.Store, tmp_path: Path) -> None:
    since = datetime(2024, 1, 1, 0, 30, tzinfo=UTC)
    until = datetime(2024, 1, 1, 1, 0, tzinfo=UTC)
    rows = export_and_read(
        demo_store,
        tmp_path / "events.jsonl",
        where="event_type <> ? AND version > ?",
        params=["MoneyDeposited", 1],
        since=since,
        until=until,
        aggregate_types=["Account", "Order"],
    )
    expected = stored(
        demo_store,
        "event_type <> ? AND version > ? AND recorded_at >= ? AND recorded_at <= ?"
        " AND aggregate_type IN ('Account', 'Order')",
        ["MoneyDeposited", 1, since, until],
    )
    assert rows == expected
    assert 0 < len(rows) < 3000
    named = export_and_read(
        demo_store,
        tmp_path / "events.parquet",
        where="aggregate_type = $kind",
        params={"kind": "Payment"},
        aggregate_types=["Payment", "Order"],
    )
    assert named == stored(demo_store, "aggregate_type = 'Payment'")


def test_bad_filters_are_refused_and_leave_no_file(demo_store: esw.Store, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with pytest.raises(esw.QueryError):
        export_jsonl(demo_store, path, where="no_such_column = 1")
    with pytest.raises(esw.InvalidEventError, match="naive"):
        export_csv(demo_store, path, since=datetime(2024, 1, 1))
    with pytest.raises(esw.EsWorkbenchError, match="list of names"):
        export_parquet(demo_store, path, aggregate_types="Account")
    with pytest.raises(esw.EsWorkbenchError, match="compression"):
        export_jsonl(demo_store, path, compression="lz4")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_compression_follows_the_suffix_or_the_caller(
    demo_store: esw.Store, tmp_path: Path
) -> None:
    export_jsonl(demo_store, tmp_path / "a.jsonl.gz", aggregate_types=["Payment"])
    export_jsonl(demo_store, tmp_path / "b.jsonl.zst", aggregate_types=["Payment"])
    export_jsonl(demo_store, tmp_path / "c.jsonl", compression="zstd", aggregate_types=["Payment"])
    export_csv(demo_store, tmp_path / "d.csv", aggregate_types=["Payment"])
    heads = {p.name: p.read_bytes()[:4] for p in tmp_path.iterdir()}
    assert heads["a.jsonl.gz"][:2] == b"\x1f\x8b"
    assert heads["b.jsonl.zst"] == heads["c.jsonl"] == b"\x28\xb5\x2f\xfd"
    assert heads["d.csv"] == b'"pos'


def test_an_empty_selection_writes_an_empty_file(demo_store: esw.Store, tmp_path: Path) -> None:
    for name in ("events.jsonl", "events.csv", "events.parquet"):
        assert export_and_read(demo_store, tmp_path / name, where="false") == []
    assert (tmp_path / "events.jsonl").read_bytes() == b""
    assert pq.read_table(tmp_path / "events.parquet").schema == EVENT_SCHEMA


def test_windows_of_positions_join_up(
    demo_store: esw.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "_WINDOW", 97)  # many windows, ending mid-batch
    assert export_and_read(demo_store, tmp_path / "events.jsonl", batch_size=10) == stored(
        demo_store
    )
    named = export_and_read(
        demo_store, tmp_path / "events.parquet", where="version > $v", params={"v": 2}
    )
    assert named == stored(demo_store, "version > 2")


def test_parquet_keeps_the_store_positions(demo_store: esw.Store, tmp_path: Path) -> None:
    export_parquet(demo_store, tmp_path / "events.parquet", aggregate_types=["Inventory"])
    positions = pq.read_table(tmp_path / "events.parquet").column("position").to_pylist()
    assert positions == sorted(positions)
    assert positions == [
        r[0]
        for r in demo_store.sql(
            "select position from events where aggregate_type = 'Inventory' order by position"
        ).fetchall()
    ]


# -- the law: export, then read, gives the same events ---------------------------------------

PROPERTY = settings(
    max_examples=int(os.environ.get("ESW_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=8
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.decimals(
        allow_nan=False, allow_infinity=False, places=3, max_value=10**20, min_value=-(10**20)
    )
    | st.text(max_size=6)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
instants = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
STREAMS = {"a-1": "Account", "a-2": "Order", 'é,"3': "Ünï"}  # a stream keeps its type
events = st.fixed_dictionaries(
    {
        "event_type": text,
        "aggregate_id": st.sampled_from(sorted(STREAMS)),
        "recorded_at": instants,
        "data": st.dictionaries(st.text(max_size=6), values, max_size=4),
    },
    optional={
        "occurred_at": instants,
        "schema_version": st.integers(min_value=1, max_value=5),
        "metadata": st.dictionaries(st.sampled_from(["correlationId", "userId", "x"]), text),
        "causation_id": text,
    },
).map(lambda event: {**event, "aggregate_type": STREAMS[str(event["aggregate_id"])]})


@PROPERTY
@given(history=st.lists(events, min_size=1, max_size=12), name=st.sampled_from(sorted(FORMATS)))
def test_export_then_read_is_the_identity(history: Rows, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = esw.open_store(Path(folder) / "store")
        try:
            store.append_batch(history)
            assert export_and_read(store, Path(folder) / name) == stored(store)
        finally:
            store.close()


def test_loose_stored_text_comes_back_compact(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "store")
    loose = '{\n  "amount": 10.10,\n  "note": "a, b: c"\n}'
    table = pa.table({"event_type": ["A"], "aggregate_type": ["T"], "aggregate_id": ["t"],
                      "data": [loose]})  # fmt: skip
    store.append_batch(table)
    for name in ("events.jsonl", "events.csv", "events.parquet"):
        [row] = export_and_read(store, tmp_path / name)
        assert row["data"] == '{"amount":10.10,"note":"a, b: c"}'
    store.close()


def test_decimals_in_dict_payloads_stay_exact(tmp_path: Path) -> None:
    store = esw.open_store(tmp_path / "store")
    store.append_batch(
        [
            {
                "event_type": "Paid",
                "aggregate_type": "Order",
                "aggregate_id": "o-1",
                "data": {"amount": Decimal("10.10"), "big": Decimal("12345678901234567890.5")},
            }
        ]
    )
    [row] = export_and_read(store, tmp_path / "events.jsonl")
    assert row["data"] == '{"amount":10.10,"big":12345678901234567890.5}'
    store.close()
