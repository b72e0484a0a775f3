"""Tests of the demo history generator: determinism, shape, and the domain's invariants."""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

import esworkbench.store
from esworkbench.demo import generate, write_demo
from esworkbench.errors import EsWorkbenchError
from esworkbench.events import EVENT_SCHEMA, dumps_json

Rows = list[dict[str, Any]]
SAGA_TYPES = {"Order", "Inventory", "Payment"}


@pytest.fixture(scope="module")
def history() -> pa.Table:
    return pa.concat_tables(generate(20_000, seed=7, batch_size=3_000))


@pytest.fixture(scope="module")
def rows(history: pa.Table) -> Rows:
    listed: Rows = history.to_pylist()
    return listed


def _data(row: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(row["data"], parse_float=Decimal)
    return loaded


# -- shape -----------------------------------------------------------------------------------


def _ipc_bytes(tables: list[pa.Table]) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, EVENT_SCHEMA) as writer:
        for table in tables:
            writer.write_table(table)
    return bytes(sink.getvalue())


def test_same_seed_gives_byte_identical_tables() -> None:
    first = _ipc_bytes(list(generate(5_000, seed=3, batch_size=1_000)))
    assert _ipc_bytes(list(generate(5_000, seed=3, batch_size=1_000))) == first
    assert _ipc_bytes(list(generate(5_000, seed=4, batch_size=1_000))) != first


def test_batch_size_only_cuts_the_same_history() -> None:
    first = pa.concat_tables(generate(5_000, seed=3, batch_size=1_000))
    assert first.equals(pa.concat_tables(generate(5_000, seed=3, batch_size=1_700)))


@pytest.mark.parametrize(("events", "batch_size"), [(1_000, 300), (12_345, 1_000), (20, 200_000)])
def test_yields_exactly_the_events_asked_for_in_batches(events: int, batch_size: int) -> None:
    sizes = [table.num_rows for table in generate(events, seed=1, batch_size=batch_size)]
    assert sum(sizes) == events
    assert all(size == batch_size for size in sizes[:-1])
    assert 0 < sizes[-1] <= batch_size


def test_no_events_gives_no_tables() -> None:
    assert list(generate(0)) == []


def test_every_table_has_the_event_schema_and_position_zero() -> None:
    for table in generate(2_500, seed=2, batch_size=1_000):
        assert table.schema.equals(EVENT_SCHEMA)
        assert set(table.column("position").to_pylist()) == {0}
        assert set(table.column("schema_version").to_pylist()) <= {1, 2}


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"events": -1}, "events and seed must be >= 0"),
        ({"events": 10, "seed": -5}, "events and seed must be >= 0"),
        ({"events": 10, "batch_size": 0}, "batch_size >= 1"),
        ({"events": 10, "start": datetime(2024, 1, 1)}, "tzinfo=UTC"),
    ],
)
def test_bad_arguments_are_refused_at_the_call(kwargs: dict[str, Any], hint: str) -> None:
    with pytest.raises(EsWorkbenchError, match="Hint") as caught:
        generate(**kwargs)
    assert hint in str(caught.value)


def test_event_ids_are_unique_uuid4_text(history: pa.Table) -> None:
    ids = history.column("event_id").to_pylist()
    assert len(set(ids)) == len(ids)
    for text in ids[:: len(ids) // 50]:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version) == (text, 4)


def test_versions_run_one_two_three_per_stream_in_row_order(history: pa.Table) -> None:
    table = history.append_column("row", pa.array(range(history.num_rows), pa.int64()))
    with duckdb.connect() as con:
        con.register("h", table)
        bad = con.sql(
            """
            select aggregate_id from (
                select aggregate_id, aggregate_type, version,
                       row_number() over (partition by aggregate_id order by row) as expected,
                       count(distinct aggregate_type) over (partition by aggregate_id) as types
                from h)
            where version != expected or types != 1
            """
        ).fetchall()
        assert bad == []


def test_recorded_at_starts_at_start_and_never_goes_back() -> None:
    start = datetime(2030, 5, 1, 12, tzinfo=UTC)
    table = pa.concat_tables(generate(3_000, seed=5, batch_size=500, start=start))
    recorded = table.column("recorded_at").to_pylist()
    assert recorded[0] == start
    assert all(a <= b for a, b in pairwise(recorded))
    assert recorded[-1] - start < timedelta(days=1)


def test_default_start_is_2024_in_utc(history: pa.Table) -> None:
    assert history.column("recorded_at")[0].as_py() == datetime(2024, 1, 1, tzinfo=UTC)


def test_only_some_deposits_are_back_dated(rows: Rows) -> None:
    back = [r for r in rows if r["occurred_at"] != r["recorded_at"]]
    assert back
    assert {r["event_type"] for r in back} == {"MoneyDeposited"}
    assert all(
        timedelta(hours=1) <= r["recorded_at"] - r["occurred_at"] <= timedelta(days=3) for r in back
    )
    deposits = sum(r["event_type"] == "MoneyDeposited" for r in rows)
    assert len(back) < 0.05 * deposits


def test_data_and_metadata_are_compact_json_objects(rows: Rows) -> None:
    for row in rows:
        for name in ("data", "metadata"):
            value = json.loads(row[name], parse_float=Decimal)
            assert isinstance(value, dict)
            assert dumps_json(value) == row[name]


def test_metadata_repeats_the_promoted_columns(rows: Rows) -> None:
    for row in rows:
        meta = json.loads(row["metadata"])
        assert meta["correlationId"] == row["correlation_id"]
        assert meta.get("causationId") == row["causation_id"]
        assert meta["userId"] == row["user_id"]


def test_stream_lengths_are_skewed() -> None:
    table = pa.concat_tables(generate(100_000, seed=11))
    lengths = sorted(Counter(table.column("aggregate_id").to_pylist()).values())
    assert lengths[len(lengths) // 2] <= 10
    assert lengths[-1] >= 500  # a few hot streams: 50 times the median and more


# -- the bank ----------------------------------------------------------------------------------


def test_accounts_keep_their_rules_and_exact_balances(rows: Rows) -> None:
    balance: dict[str, Decimal] = {}
    state: dict[str, str] = {}
    for row in (r for r in rows if r["aggregate_type"] == "Account"):
        account, event, data = row["aggregate_id"], row["event_type"], _data(row)
        assert state.get(account) != "closed", f"{event} after AccountClosed on {account}"
        amounts = [v for v in data.values() if isinstance(v, Decimal)]
        assert all(v.as_tuple().exponent == -2 for v in amounts), row["data"]
        if event == "AccountOpened":
            assert account not in state
            assert data["currency"] in {"EUR", "USD", "GBP", "CHF"}
            balance[account], state[account] = data.get("openingBalance", Decimal("0.00")), "open"
            continue
        assert account in state, f"{event} before AccountOpened on {account}"
        if event in ("MoneyDeposited", "MoneyWithdrawn"):
            assert state[account] == "open", f"{event} while {state[account]} on {account}"
            amount = data["amt"] if "amt" in data else data["amount"]  # schema_version 1
            assert amount > 0
            balance[account] += amount if event == "MoneyDeposited" else -amount
            assert balance[account] >= 0
            if "balanceAfter" in data or event == "MoneyWithdrawn":
                assert data["balanceAfter"] == balance[account]
        elif event == "AccountFrozen":
            assert state[account] == "open"
            state[account] = "frozen"
        elif event == "AccountUnfrozen":
            assert state[account] == "frozen"
            state[account] = "open"
        else:
            assert event == "AccountClosed"
            assert balance[account] == 0
            state[account] = "closed"
    assert "closed" in state.values()


def test_money_deposited_comes_in_two_schema_versions(rows: Rows) -> None:
    shapes = {
        (r["schema_version"], tuple(_data(r))) for r in rows if r["event_type"] == "MoneyDeposited"
    }
    assert shapes == {(1, ("amt",)), (2, ("amount", "balanceAfter"))}
    versions = [r["schema_version"] for r in rows if r["event_type"] == "MoneyDeposited"]
    assert versions == sorted(versions), "schema_version 1 comes first in the history"
    others = {r["schema_version"] for r in rows if r["event_type"] != "MoneyDeposited"}
    assert others == {1}


# -- the order saga ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sagas(rows: Rows) -> dict[str, Rows]:
    by_correlation: dict[str, Rows] = defaultdict(list)
    for row in rows:
        if row["aggregate_type"] in SAGA_TYPES:
            by_correlation[row["correlation_id"]].append(row)
    return by_correlation


def test_roots_correlate_to_themselves_and_cause_nothing(rows: Rows) -> None:
    for row in rows:
        if row["event_type"] == "OrderPlaced" or row["aggregate_type"] == "Account":
            assert row["correlation_id"] == row["event_id"]
            assert row["causation_id"] is None


def test_a_saga_shares_one_correlation_and_chains_its_causes(sagas: dict[str, Rows]) -> None:
    assert any({r["aggregate_type"] for r in saga} == SAGA_TYPES for saga in sagas.values())
    for saga in sagas.values():
        assert saga[0]["event_type"] == "OrderPlaced"
        assert saga[0]["user_id"].startswith("user-")
        for cause, effect in pairwise(saga):
            assert effect["causation_id"] == cause["event_id"]
            cancelled_by_customer = effect["event_type"] == "OrderCancelled" and (
                cause["event_type"] == "OrderConfirmed"
            )
            assert effect["user_id"] == (saga[0]["user_id"] if cancelled_by_customer else "system")


def _path(saga: Rows) -> list[str]:
    return [r["event_type"] for r in saga]


def test_sagas_follow_the_fulfilment_paths(sagas: dict[str, Rows]) -> None:
    happy = ["OrderPlaced", "StockReserved", "PaymentAuthorized", "OrderConfirmed", "OrderShipped"]
    endings = {
        tuple(happy),
        ("OrderPlaced", "StockReservationFailed", "OrderCancelled"),
        ("OrderPlaced", "StockReserved", "PaymentFailed", "StockReleased", "OrderCancelled"),
        (*happy[:4], "OrderCancelled", "StockReleased", "PaymentRefunded"),
    }
    seen: Counter[tuple[str, ...]] = Counter()
    for saga in sagas.values():
        path = tuple(_path(saga))
        assert any(path == end[: len(path)] for end in endings), path
        seen[path] += 1
    assert all(seen[end] > 0 for end in endings), "every ending occurs"


def test_some_sagas_get_stuck_midway(sagas: dict[str, Rows], rows: Rows) -> None:
    halfway = rows[len(rows) // 2]["recorded_at"]
    finished = {"OrderShipped", "OrderCancelled", "PaymentRefunded"}
    old = [s for s in sagas.values() if s[0]["recorded_at"] < halfway]
    stuck = [s for s in old if _path(s)[-1] not in finished]
    assert 0 < len(stuck) < 0.1 * len(old)


def test_failed_payments_are_compensated(sagas: dict[str, Rows]) -> None:
    compensated = [
        s
        for s in sagas.values()
        if _path(s)[2:] == ["PaymentFailed", "StockReleased", "OrderCancelled"]
    ]
    assert compensated
    for saga in compensated:
        reserved, released = _data(saga[1]), _data(saga[3])
        assert saga[1]["aggregate_id"] == saga[3]["aggregate_id"]
        assert released["items"] == reserved["items"]
        assert _data(saga[4]) == {"reason": "payment failed"}


# -- writing to a store --------------------------------------------------------------------------


def test_write_demo_commits_each_table_and_counts_the_events() -> None:
    class Sink:
        def __init__(self) -> None:
            self.tables: list[pa.Table] = []

        def append_batch(self, table: pa.Table, /) -> None:
            self.tables.append(table)

    sink = Sink()
    assert write_demo(sink, 2_345, seed=1, batch_size=1_000) == 2_345
    assert [t.num_rows for t in sink.tables] == [1_000, 1_000, 345]
    assert pa.concat_tables(sink.tables).equals(pa.concat_tables(generate(2_345, seed=1)))


def test_write_demo_into_a_store(tmp_path: Path) -> None:
    store = esworkbench.store.open_store(tmp_path / "s")
    write_demo(store, 5000, seed=1)
    assert store.sql("select count(*) from events").fetchall()[0][0] == 5000
