"""esw replay and esw asof, as transcripts: on a store, on a JSON Lines file, on PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import esworkbench as esw
from esworkbench.cli import main

DSN = os.environ.get("ESW_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

LINES = [
    {"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "AccountOpened",
     "version": 1, "data": {"owner": "Ann"}, "timestamp": "2024-03-01T09:00:00Z"},
    {"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "MoneyDeposited",
     "version": 2, "data": {"amount": 100.10}, "timestamp": "2024-03-01T14:03:00Z",
     "metadata": {"userId": "clerk-7"}},
    {"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "MoneyWithdrawn",
     "version": 3, "data": {"amount": 0.20}, "timestamp": "2024-03-02T08:00:00Z"},
    {"aggregateId": "acc-2", "aggregateType": "Account", "eventType": "AccountOpened",
     "version": 1, "data": {"owner": "Bo"}, "timestamp": "2024-03-03T10:00:00Z"},
]  # fmt: skip

FOLD = """
import esworkbench as esw

def deposit(state, event):
    return {**state, "balance": state["balance"] + event.data["amount"]}

def withdraw(state, event):
    if event.data["amount"] < 1:
        raise ValueError("too small to withdraw")
    return {**state, "balance": state["balance"] - event.data["amount"]}

account = esw.Aggregate("Account", initial={"balance": 0},
                        on={"MoneyDeposited": deposit, "MoneyWithdrawn": withdraw},
                        decimals=True)
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    text = "".join(json.dumps(line) + "\n" for line in LINES)
    # Exact decimals as a source writes them: trailing zeros are part of the number's text.
    path.write_text(text.replace("100.1}", "100.10}").replace("0.2}", "0.20}"))
    return path


@pytest.fixture
def store(tmp_path: Path, events: Path) -> Path:
    path = tmp_path / "store"
    esw.import_events(esw.open_store(path), events)
    return path


@pytest.fixture
def fold(tmp_path: Path) -> str:
    path = tmp_path / "folds.py"
    path.write_text(textwrap.dedent(FOLD))
    return f"{path}:account"


def test_replay_prints_the_state_at_the_end_a_version_or_an_instant(store: Path) -> None:
    result = run("replay", str(store), "--aggregate", "acc-1")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "acc-1 (Account) at version 3",
        "  owner   Ann",
        "  amount  0.20",
    ]
    at = run("replay", str(store), "--aggregate", "acc-1", "--at", "2024-03-01T14:03:00Z", "--json")
    assert json.loads(at.stdout) == {
        "aggregate_id": "acc-1", "aggregate_type": "Account", "version": 2,
        "state": {"owner": "Ann", "amount": 100.10},
    }  # fmt: skip
    first = run("replay", str(store), "--aggregate", "acc-1", "--version", "1", "--json")
    assert json.loads(first.stdout)["state"] == {"owner": "Ann"}


def test_replay_with_a_fold_from_a_file_and_a_comparison(store: Path, fold: str) -> None:
    result = run("replay", str(store), "--aggregate", "acc-1", "--fold", fold, "--version", "2")
    assert result.stdout.splitlines() == ["acc-1 (Account) at version 2", "  balance  100.10"]
    compare = run(
        "replay", str(store), "--aggregate", "acc-2", "--at", "2024-03-01T00:00:00Z",
        "--compare", "2024-03-04T00:00:00Z", "--json",
    )  # fmt: skip
    assert compare.exit_code == 0, compare.output
    assert json.loads(compare.stdout) == {"owner": {"before": None, "after": "Bo"}}


def test_compare_starts_from_the_end_unless_told_otherwise(store: Path) -> None:
    # Without --version or --at the point compared is the stream's end, as replay prints it.
    head = run("replay", str(store), "--aggregate", "acc-1", "--compare", "2024-03-01T14:03:00Z")
    assert head.exit_code == 0, head.output
    assert head.stdout.splitlines() == [
        "acc-1: version 3 → 2024-03-01T14:03:00+00:00 (version 2)",
        "  amount: 0.20 → 100.10",
    ]
    version = run(
        "replay", str(store), "--aggregate", "acc-1", "--version", "1",
        "--compare", "2024-03-02T08:00:00Z", "--json",
    )  # fmt: skip
    assert json.loads(version.stdout) == {"amount": {"before": None, "after": 0.20}}
    empty = run(
        "replay", str(store), "--aggregate", "acc-1", "--version", "0",
        "--compare", "2024-03-01T09:00:00Z",
    )  # fmt: skip
    assert empty.stdout.splitlines()[0] == (
        "acc-1: version 0 → 2024-03-01T09:00:00+00:00 (version 1)"
    )
    instant = run(
        "replay", str(store), "--aggregate", "acc-1", "--at", "2024-03-01T14:03:00Z",
        "--compare", "2024-03-02T08:00:00Z",
    )  # fmt: skip
    assert instant.stdout.splitlines() == [
        "acc-1: 2024-03-01T14:03:00+00:00 (version 2) → 2024-03-02T08:00:00+00:00 (version 3)",
        "  amount: 100.10 → 0.20",
    ]


def test_steps_go_on_past_a_failing_event(store: Path, fold: str) -> None:
    result = run("replay", str(store), "--aggregate", "acc-1", "--fold", fold, "--steps")
    assert result.exit_code == 0, result.output
    # Each step's time shows in the text too: "(12 µs)", "(1.5 ms)" or "(2.00 s)".
    took = r"\((\d+ µs|\d+\.\d ms|\d+\.\d\d s)\)"
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"v1 AccountOpened  {took}", lines[0]), lines[0]
    assert re.fullmatch(rf"v2 MoneyDeposited  {took}", lines[1]), lines[1]
    assert lines[2] == "    balance: 0 → 100.10"
    assert re.fullmatch(rf"v3 MoneyWithdrawn  {took}  ERROR .*too small to withdraw", lines[3])
    as_json = run("replay", str(store), "--aggregate", "acc-1", "--fold", fold, "--steps", "--json")
    steps = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [s["version"] for s in steps] == [1, 2, 3]
    assert steps[1]["changed"] == {"balance": {"before": 0, "after": 100.10}}
    assert steps[2]["error"] is not None


def test_replay_straight_on_a_json_lines_file(events: Path) -> None:
    result = run("replay", str(events), "--aggregate", "acc-2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == {"owner": "Bo"}


def test_asof_prints_every_stream_of_a_type(store: Path, fold: str, tmp_path: Path) -> None:
    result = run("asof", str(store), "--type", "Account", "--at", "2024-03-02T00:00:00Z",
                 "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["aggregate_id"], r["version"], r["owner"]) for r in rows] == [("acc-1", 2, "Ann")]
    csv = run("asof", str(store), "--fold", fold, "--at", "2024-03-01T23:00:00Z", "--format", "csv")
    assert csv.stdout.splitlines() == [
        "aggregate_id,version,last_event_at,balance",
        "acc-1,2,2024-03-01T14:03:00+00:00,100.10",
    ]
    failing = run("asof", str(store), "--fold", fold)  # the fold raises on acc-1's version 3
    assert failing.exit_code == 1
    assert "too small to withdraw" in failing.output
    assert "'acc-1' version 3" in failing.output
    out = tmp_path / "accounts.parquet"
    written = run("asof", str(store), "--type", "Account", "--format", "parquet", "--output",
                  str(out))  # fmt: skip
    assert written.exit_code == 0, written.output
    assert out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--aggregate", "acc-9"], "stream 'acc-9' has no events"),
        (["--aggregate", "acc-1", "--version", "1", "--at", "2024-03-01T00:00:00Z"], "pick one"),
        (["--aggregate", "acc-1", "--at", "2024-03-01T00:00:00"], "naive"),
        (["--aggregate", "acc-1", "--fold", "nowhere"], "does not name a fold"),
        (["--aggregate", "acc-1", "--fold", "json:dumps"], "not an esw.Aggregate"),
        (["--aggregate", "acc-1", "--pause"], "--pause goes with --steps"),
    ],
)
def test_replay_errors_are_one_line(store: Path, args: list[str], message: str) -> None:
    result = run("replay", str(store), *args)
    assert result.exit_code != 0
    assert message in result.output


def test_a_missing_store_is_not_created(tmp_path: Path) -> None:
    result = run("replay", str(tmp_path / "nothing"), "--aggregate", "acc-1")
    assert result.exit_code != 0
    assert not (tmp_path / "nothing").exists()


@pytest.fixture
def pg_table() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    table = f"esw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, event_id UUID, event_type TEXT, "
            "aggregate_id TEXT, aggregate_type TEXT, version BIGINT, data JSONB, "
            "metadata JSONB, timestamp TIMESTAMPTZ, UNIQUE (aggregate_id, version))"
        )
        for line in LINES:
            conn.execute(
                f"INSERT INTO {table} (event_id, event_type, aggregate_id, aggregate_type, "
                "version, data, metadata, timestamp) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [str(uuid.uuid4()), line["eventType"], line["aggregateId"],
                 line["aggregateType"], line["version"], json.dumps(line["data"]),
                 json.dumps(line.get("metadata")) if "metadata" in line else None,
                 line["timestamp"]],
            )  # fmt: skip
        yield table
        conn.execute(f"DROP TABLE {table}")


@pytest.mark.postgres
def test_replay_straight_on_postgresql(pg_table: str) -> None:
    result = run("replay", DSN, "--table", pg_table, "--aggregate", "acc-1", "--json")
    assert result.exit_code == 0, result.output
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer["version"] == 3
    assert answer["state"] == {"owner": "Ann", "amount": 0.20}
