"""The esw command line, as transcripts: what a user types, and what they see."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

import esworkbench as esw
from esworkbench import cli

ACC_1 = "6f2fe78d-6a8e-4854-84ca-f6a9c2b4f17c"
EVENTS = "\n".join(
    [
        json.dumps(
            {
                "eventId": ACC_1,
                "eventType": "AccountOpened",
                "aggregateId": "acc-1",
                "aggregateType": "Account",
                "version": 1,
                "timestamp": "2024-01-01T00:00:00Z",
                "data": {"owner": "Ann"},
                "metadata": {"userId": "u-7"},
            }
        ),
        "",  # blank lines are skipped, but they still count for line numbers
        '{"event_type": "MoneyDeposited", "aggregate_id": "acc-1", "aggregate_type": "Account",'
        ' "recorded_at": "2024-01-02T00:00:00Z", "data": {"amount": 10.10}}',
        '{"eventType": "OrderPlaced", "aggregateId": "ord-1", "aggregateType": "Order",'
        ' "timestamp": "2024-01-03T12:30:00+01:00", "data": {"total": 5, "items": ["a", "b"]}}',
    ]
)
QUERY = "select position, event_type, aggregate_id, version, recorded_at from events order by 1"


def esw_(*args: str, stdin: str | None = None, color: bool = False) -> Result:
    """Runs ``esw ARGS`` in-process, as a user would type it."""
    return CliRunner().invoke(cli.main, list(args), input=stdin, color=color)


def error_line(result: Result) -> str:
    """The one line a failing command writes, after checking it is the only output."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = tmp_path / "bank"
    result = esw_("init", str(path))
    assert result.exit_code == 0
    return str(path)


@pytest.fixture
def filled(store: str) -> str:
    result = esw_("append", store, stdin=EVENTS)
    assert result.exit_code == 0, result.output
    return store


# -- version, init --------------------------------------------------------------------------


def test_version() -> None:
    result = esw_("--version")
    assert (result.exit_code, result.stdout) == (0, f"esw, version {esw.__version__}\n")


def test_help_lists_the_commands() -> None:
    result = esw_("--help")
    assert result.exit_code == 0
    for command in ("init", "append", "sql", "info", "demo"):
        assert f"  {command} " in result.stdout


def test_init_creates_a_store_then_says_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    result = esw_("init", str(path))
    assert (result.exit_code, result.stdout) == (0, f"Initialised store at {path}\n")
    assert esw.open_store(path, create=False).stream_version("acc-1") == 0
    again = esw_("init", str(path))
    assert (again.exit_code, again.stdout) == (0, f"Store already initialised at {path}\n")


def test_init_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = error_line(esw_("init", str(tmp_path)))
    assert "holds notes.txt, but it is not an esworkbench store" in line
    assert "Hint: choose an empty or new directory" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "store.json").exists()


def test_init_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "is a file, not a store" in error_line(esw_("init", str(tmp_path / "f")))


def test_the_error_line_is_red() -> None:
    result = esw_("sql", "/nowhere/at/all", "select 1", color=True)
    assert result.exit_code == 1
    assert result.stderr.startswith("\x1b[31mError: ")


@pytest.mark.parametrize("command", [["append"], ["sql", "select 1"], ["info"]])
def test_an_unknown_store_path_is_an_error_not_a_new_store(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "typo"
    line = error_line(esw_(command[0], str(missing), *command[1:], stdin=""))
    assert line == f"Error: {missing} is not an esworkbench store. Hint: run esw init {missing}\n"
    assert not missing.exists()


# -- append ---------------------------------------------------------------------------------


def test_append_reads_json_lines_in_one_commit(store: str) -> None:
    result = esw_("append", store, stdin=EVENTS)
    assert (result.exit_code, result.stdout) == (
        0,
        "Appended 3 events to 2 streams (positions 1-3)\n",
    )
    rows = esw.open_store(store).sql(
        "select aggregate_id, version, data, user_id from events order by position"
    )
    assert rows.fetchall() == [
        ("acc-1", 1, '{"owner":"Ann"}', "u-7"),
        ("acc-1", 2, '{"amount":10.10}', None),  # the amount stays exact
        ("ord-1", 1, '{"total":5,"items":["a","b"]}', None),
    ]
    info = json.loads(esw_("info", store, "--format", "json").stdout)
    assert info["table_version"] == 1  # one commit


def test_append_one_event(store: str) -> None:
    line = '{"aggregateId": "a", "aggregateType": "Account", "eventType": "Opened", "data": {}}'
    assert esw_("append", store, stdin=line).stdout == "Appended 1 event to 1 stream (position 1)\n"


@pytest.mark.parametrize("stdin", ["", "\n  \n"])
def test_append_nothing(store: str, stdin: str) -> None:
    result = esw_("append", store, stdin=stdin)
    assert (result.exit_code, result.stdout) == (0, "Appended 0 events\n")


def test_append_names_the_line_that_is_not_json(store: str) -> None:
    stdin = EVENTS.splitlines()[0] + "\n{not json}\n"
    line = error_line(esw_("append", store, stdin=stdin))
    assert line == (
        "Error: line 2 of stdin is not JSON: Expecting property name enclosed in double quotes"
        " at column 2. Hint: give one JSON object per line (JSON Lines)\n"
    )
    assert esw.open_store(store).sql("select count(*) from events").fetchall() == [(0,)]


def test_append_refuses_a_line_that_is_not_an_object(store: str) -> None:
    line = error_line(esw_("append", store, stdin="[1, 2]\n"))
    assert "line 1 of stdin is a JSON list, not an object" in line


def test_append_names_the_line_and_field_of_a_bad_event(filled: str) -> None:
    stdin = '{"aggregateId": "b", "aggregateType": "Account", "eventType": "X", "data": {}}\n\n'
    stdin += '{"aggregateId": "c", "eventType": "Opened", "data": {}}\n'
    line = error_line(esw_("append", filled, stdin=stdin))
    assert line.startswith("Error: line 3 of stdin: event 1 (eventType='Opened', aggregateId='c')")
    assert "field 'aggregate_type' is missing" in line
    assert esw.open_store(filled).sql("select count(*) from events").fetchall() == [(3,)]


def test_append_refuses_a_version_that_does_not_continue_the_stream(filled: str) -> None:
    stdin = (
        '{"aggregateId": "acc-1", "aggregateType": "Account", "eventType": "X", "data": {},'
        ' "version": 7}'
    )
    line = error_line(esw_("append", filled, stdin=stdin))
    assert "stream 'acc-1' would get version 7, but its next version is 3" in line


# -- sql ------------------------------------------------------------------------------------


def test_sql_prints_an_aligned_table_by_default(filled: str) -> None:
    result = esw_("sql", filled, QUERY)
    assert result.exit_code == 0
    assert result.stdout == (
        "position  event_type      aggregate_id  version  recorded_at\n"
        "--------  --------------  ------------  -------  -------------------------\n"
        "       1  AccountOpened   acc-1               1  2024-01-01T00:00:00+00:00\n"
        "       2  MoneyDeposited  acc-1               2  2024-01-02T00:00:00+00:00\n"
        "       3  OrderPlaced     ord-1               1  2024-01-03T11:30:00+00:00\n"
        "(3 rows)\n"
    )


def test_sql_table_shows_nulls_and_escapes_newlines(filled: str) -> None:
    result = esw_("sql", filled, "select null as n, 'a' || chr(10) || 'b' as s, 1.5 as x")
    assert result.stdout == "n     s       x\n----  ----  ---\nNULL  a\\nb  1.5\n(1 row)\n"


def test_sql_csv(filled: str) -> None:
    result = esw_("sql", filled, QUERY + " limit 2", "--format", "csv")
    assert result.stdout == (
        "position,event_type,aggregate_id,version,recorded_at\n"
        "1,AccountOpened,acc-1,1,2024-01-01T00:00:00+00:00\n"
        "2,MoneyDeposited,acc-1,2,2024-01-02T00:00:00+00:00\n"
    )


def test_sql_csv_quotes_json_and_leaves_nulls_empty(filled: str) -> None:
    query = "select data, user_id from events where aggregate_id = ? order by version"
    result = esw_("sql", filled, query, "--param", "acc-1", "--format", "csv")
    assert result.stdout == 'data,user_id\n"{""owner"":""Ann""}",u-7\n"{""amount"":10.10}",\n'


def test_sql_json_is_one_array_with_iso_instants_and_ints(filled: str) -> None:
    result = esw_("sql", filled, QUERY, "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        {
            "position": 1,
            "event_type": "AccountOpened",
            "aggregate_id": "acc-1",
            "version": 1,
            "recorded_at": "2024-01-01T00:00:00+00:00",
        },
        {
            "position": 2,
            "event_type": "MoneyDeposited",
            "aggregate_id": "acc-1",
            "version": 2,
            "recorded_at": "2024-01-02T00:00:00+00:00",
        },
        {
            "position": 3,
            "event_type": "OrderPlaced",
            "aggregate_id": "ord-1",
            "version": 1,
            "recorded_at": "2024-01-03T11:30:00+00:00",
        },
    ]


def test_sql_json_of_no_rows_is_an_empty_array(filled: str) -> None:
    result = esw_("sql", filled, "select * from events where false", "--format", "json")
    assert json.loads(result.stdout) == []


def test_sql_json_keeps_values_not_their_repr(filled: str) -> None:
    query = (
        "select 1.50::decimal(5, 2) as d, [1, 2] as l, {'k': date '2024-01-02'} as s,"
        " true as b, 'x'::blob as bytes, 'nan'::double as f, null as n,"
        " timestamp '2024-01-01 10:00' as naive, 3::hugeint as big"
    )
    [row] = json.loads(esw_("sql", filled, query, "--format", "json").stdout)
    assert row == {
        "d": 1.5,
        "l": [1, 2],
        "s": {"k": "2024-01-02"},
        "b": True,
        "bytes": "eA==",
        "f": None,
        "n": None,
        "naive": "2024-01-01T10:00:00",
        "big": 3,
    }


def test_sql_jsonl_is_one_object_per_line(filled: str) -> None:
    result = esw_("sql", filled, "select aggregate_id, version from events order by position",
                  "--format", "jsonl")  # fmt: skip
    assert result.stdout == (
        '{"aggregate_id":"acc-1","version":1}\n'
        '{"aggregate_id":"acc-1","version":2}\n'
        '{"aggregate_id":"ord-1","version":1}\n'
    )


def test_sql_binds_params_in_order(filled: str) -> None:
    query = "select aggregate_id, version from events where version > ? and aggregate_type = ?"
    result = esw_("sql", filled, query, "--param", "1", "--param", "Account", "--format", "jsonl")
    assert result.stdout == '{"aggregate_id":"acc-1","version":2}\n'


def test_sql_parquet_writes_the_file(filled: str, tmp_path: Path) -> None:
    out = tmp_path / "events.parquet"
    result = esw_(
        "sql", filled, "select * from events", "--format", "parquet", "--output", str(out)
    )
    assert (result.exit_code, result.stdout) == (0, "")
    assert result.stderr == f"Wrote parquet to {out}\n"
    table = pq.read_table(out)
    assert table.num_rows == 3
    assert table.schema.field("recorded_at").type == esw.EVENT_SCHEMA.field("recorded_at").type


def test_sql_parquet_needs_an_output_file(filled: str) -> None:
    result = esw_("sql", filled, "select 1", "--format", "parquet")
    assert result.exit_code == 2
    assert "Error: --format parquet writes a file: add --output FILE" in result.stderr


def test_sql_writes_text_formats_to_an_output_file(filled: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    result = esw_("sql", filled, QUERY + " limit 1", "--format", "csv", "--output", str(out))
    assert (result.exit_code, result.stdout) == (0, "")
    assert out.read_text().splitlines()[1] == "1,AccountOpened,acc-1,1,2024-01-01T00:00:00+00:00"


@pytest.mark.parametrize("output_format", ["csv", "parquet"])
def test_sql_says_when_it_cannot_write_the_output(
    filled: str, tmp_path: Path, output_format: str
) -> None:
    out = tmp_path / "missing" / "rows"
    line = error_line(
        esw_("sql", filled, "select 1", "--format", output_format, "--output", str(out))
    )
    assert line.startswith(f"Error: cannot write {out}: ")


def test_sql_refuses_an_unknown_format(filled: str) -> None:
    result = esw_("sql", filled, "select 1", "--format", "xml")
    assert result.exit_code == 2
    assert "Invalid value for '--format'" in result.stderr


def test_a_bad_query_is_one_error_line(filled: str) -> None:
    line = error_line(esw_("sql", filled, "select nope\nfrom events"))
    assert line.startswith("Error: DuckDB refused the query: Binder Error: ")
    assert "query: select nope from events Hint: the views are events and streams" in line


def test_a_query_failing_while_it_runs_is_one_error_line(filled: str) -> None:
    # DuckDB runs relations lazily: this cast fails only when the rows are fetched.
    line = error_line(esw_("sql", filled, "select cast(event_type as int) from events"))
    assert line.startswith("Error: DuckDB refused the query: Conversion Error: ")


# -- info -----------------------------------------------------------------------------------


def test_info_prints_counts_files_and_size(filled: str) -> None:
    result = esw_("info", filled)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        f"store             {Path(filled)}",
        "events            3",
        "streams           2",
        "aggregate types   2",
        "  Account         2",
        "  Order           1",
    ]
    assert lines[6:9] == [
        "first recorded_at 2024-01-01T00:00:00+00:00",
        "last recorded_at  2024-01-03T11:30:00+00:00",
        "data files        2",
    ]
    assert lines[9].startswith("size              ")
    assert lines[9].endswith(" KiB)")
    assert lines[10:] == ["table version     1"]


def test_info_as_json(filled: str) -> None:
    info = json.loads(esw_("info", filled, "--format", "json").stdout)
    assert info["events"] == 3
    assert info["aggregate_types"] == {"Account": 2, "Order": 1}
    assert info["last_recorded_at"] == "2024-01-03T11:30:00+00:00"
    assert info["size_bytes"] > 0


# -- demo -----------------------------------------------------------------------------------


def test_demo_writes_a_deterministic_history(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    result = esw_("demo", str(one), "--events", "300", "--seed", "4")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Wrote 300 events to {one} in ")
    assert result.stdout.endswith("s\n")
    assert "300/300" in result.stderr  # the progress bar
    esw_("demo", str(two), "--events", "300", "--seed", "4")
    query = "select event_id, data from events order by position"
    assert esw.open_store(one).sql(query).fetchall() == esw.open_store(two).sql(query).fetchall()


def test_demo_defaults_to_ten_thousand_events(tmp_path: Path) -> None:
    result = esw_("demo", str(tmp_path / "demo"))
    assert result.stdout.startswith("Wrote 10,000 events to ")


def test_demo_refuses_a_store_that_holds_events(filled: str) -> None:
    line = error_line(esw_("demo", filled, "--events", "10"))
    assert "already holds 3 events. Hint: write the demo into a new or empty directory" in line


def test_demo_refuses_a_negative_count(tmp_path: Path) -> None:
    assert esw_("demo", str(tmp_path / "d"), "--events", "-1").exit_code == 2


# -- the installed executable ---------------------------------------------------------------


def installed_esw() -> str:
    found = shutil.which("esw") or str(Path(sys.executable).parent / "esw")
    assert Path(found).exists(), "the esw entry point is not installed"
    return found


def test_installed_esw_round_trip(tmp_path: Path) -> None:
    exe, store = installed_esw(), str(tmp_path / "bank")
    env = {**os.environ, "TZ": "America/New_York"}  # output instants stay in UTC

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
        )

    assert run("init", store).returncode == 0
    appended = run("append", store, stdin=EVENTS)
    assert (appended.returncode, appended.stdout) == (
        0,
        "Appended 3 events to 2 streams (positions 1-3)\n",
    )
    query = "select aggregate_id, version, recorded_at from events order by position"
    rows = run("sql", store, query, "--format", "json")
    assert rows.returncode == 0, rows.stderr
    assert json.loads(rows.stdout) == [
        {"aggregate_id": "acc-1", "version": 1, "recorded_at": "2024-01-01T00:00:00+00:00"},
        {"aggregate_id": "acc-1", "version": 2, "recorded_at": "2024-01-02T00:00:00+00:00"},
        {"aggregate_id": "ord-1", "version": 1, "recorded_at": "2024-01-03T11:30:00+00:00"},
    ]


def test_the_examples_in_the_docstrings_run() -> None:
    assert doctest.testmod(cli).failed == 0
