"""File readers: every source row becomes one row, good or bad, with its place and its error."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esworkbench as esw
from esworkbench.sources import _json
from esworkbench.sources._rows import check_row, zone_of
from esworkbench.sources.files import SOURCE_SCHEMA, read_csv, read_json, read_jsonl, read_table

FIXTURES = Path(__file__).parent / "fixtures" / "sources"
Rows = list[dict[str, Any]]


def rows_of(tables: Iterator[pa.Table]) -> Rows:
    out: Rows = []
    for table in tables:
        assert table.schema == SOURCE_SCHEMA
        out += table.to_pylist()
    return out


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "eventType": "MoneyDeposited",
        "aggregateType": "Account",
        "aggregateId": "acc-1",
        "timestamp": "2024-05-01T12:00:00Z",
        "data": {"amount": 1},
    }
    return {**base, **fields}


def write_lines(path: Path, *lines: object) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def compressed(path: Path, codec: str, name: str) -> Path:
    """The file's bytes compressed with ``codec``, written under ``name`` (suffix unrelated)."""
    target = path.with_name(name)
    with pa.CompressedOutputStream(str(target), codec) as sink:
        sink.write(path.read_bytes())
    return target


# -- JSON Lines -----------------------------------------------------------------------------


def test_every_kind_of_bad_line_is_a_row_at_its_line_number() -> None:
    rows = rows_of(read_jsonl(FIXTURES / "mixed.jsonl"))
    expected = json.loads((FIXTURES / "mixed.errors.json").read_text(encoding="utf-8"))
    assert [{"source_position": r["source_position"], "error": r["error"]} for r in rows] == (
        expected
    )
    # Line 2 is blank: no event, no row. Every other line gives exactly one row.
    lines = (FIXTURES / "mixed.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == sum(1 for line in lines if line.strip())


def test_a_good_line_reads_every_field_exactly() -> None:
    first = rows_of(read_jsonl(FIXTURES / "mixed.jsonl"))[0]
    assert first == {
        "source_position": 1,
        "event_id": "6f2fe78d-6a8e-4854-84ca-f6a9c2b4f17c",
        "event_type": "MoneyDeposited",
        "aggregate_type": "Account",
        "aggregate_id": "acc-1",
        "version": 1,
        "recorded_at": datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC),
        "occurred_at": datetime(2024, 4, 30, 9, tzinfo=UTC),
        "schema_version": 2,
        "data": '{"amount":10.10,"big":12345678901234567890.5,"note":"a, b: c","tags":["x",1e5]}',
        "metadata": '{"correlationId":"corr-1","causation_id":"cause-1","userId":"u-7",'
        '"ip":"10.0.0.1"}',
        "correlation_id": "corr-1",
        "causation_id": "cause-1",
        "user_id": "u-7",
        "error": None,
    }


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"eventType": None}, "event_type", "is missing"),
        ({"eventType": ""}, "event_type", "is empty"),
        ({"aggregateId": 42}, "aggregate_id", "must be a string, got 42"),
        ({"version": "3a"}, "version", "must be an integer, got '3a'"),
        ({"version": 2.0}, "version", "must be an integer, got 2.0"),
        ({"version": True}, "version", "must be an integer, got true"),
        ({"version": 2**64}, "version", "is too large"),
        ({"timestamp": "2024-05-01 12:00"}, "recorded_at", "is a naive timestamp"),
        ({"timestamp": "yesterday"}, "recorded_at", "is not an ISO 8601 instant: 'yesterday'"),
        ({"occurredAt": 1714564800}, "occurred_at", "must be an ISO 8601 instant, got"),
        ({"data": [1]}, "data", "must be a JSON object, got an array"),
        ({"data": None}, "data", "is missing"),
        ({"data": "[]"}, "data", "must be a JSON object, got an array"),
        ({"metadata": 5}, "metadata", "must be a JSON object, got 5"),
        ({"eventId": "x"}, "event_id", "is not a UUID: 'x'"),
        ({"schemaVersion": 0}, "schema_version", "must be >= 1, got 0"),
        ({"eventType": "A\x00"}, "event_type", "contains a NUL character"),
        ({"metadata": {"userId": "u\x00"}}, "user_id", "contains a NUL character"),
        ({"metadata": {"userId": True}}, "user_id", "must be a string, got true in metadata"),
        ({"stream": "s"}, "stream", "is not a field of an event"),
        ({"event_type": "Other"}, "event_type", "is given twice with different values"),
    ],
)
def test_each_bad_field_is_named_with_its_reason(
    tmp_path: Path, fields: dict[str, object], field: str, reason: str
) -> None:
    good = event(version=1)
    # A None leaves the field out; data=None is written as an explicit null.
    bad = {k: v for k, v in {**event(version=2), **fields}.items() if v is not None or k == "data"}
    [first, second] = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", good, bad)))
    assert first["error"] is None
    assert second["source_position"] == 2
    assert f"field {field!r}: {reason}" in second["error"]
    # What could be read is kept.
    assert second["aggregate_type"] == "Account"


def test_not_json_and_not_an_object_name_the_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", event(), '{"eventType": ', "[1]", '"text"', event())
    rows = rows_of(read_jsonl(path))
    assert [r["error"] for r in rows] == [
        None,
        "line 2 is not JSON: Input data was truncated",
        "line 3 is not a JSON object but an array",
        "line 4 is not a JSON object but a string",
        None,
    ]
    assert all(r["event_type"] is None for r in rows[1:4])


def test_lines_read_as_a_block_or_one_by_one_alike(tmp_path: Path) -> None:
    snake = {"event_type": "Opened", "aggregate_type": "A", "aggregate_id": "a-1", "data": {}}
    two = json.dumps(event()) + " " + json.dumps(event())  # two objects on one line
    for lines, errors in (
        ([event(), event()], [None, None]),  # read as one block
        ([snake, snake], [None, None]),  # a block in snake_case
        ([event(), snake], [None, None]),  # mixed: line by line
        ([event(), two, event()], [None, "line 2 is not JSON: trailing characters", None]),
        ([event(), "", " " + json.dumps(event())], [None, None]),  # a blank line holds no row
    ):
        rows = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", *lines)))
        assert [r["error"] and r["error"].split(" (byte")[0] for r in rows] == errors
        assert [r["source_position"] for r in rows if r["error"] is None] == [
            n for n, line in enumerate(lines, start=1) if line and line is not two
        ]


def test_exact_decimals_and_compact_text(tmp_path: Path) -> None:
    text = (
        '{"eventType": "Paid", "aggregateType": "Order", "aggregateId": "o-1", "data": '
        '{ "amount" : 10.10 , "big": 12345678901234567890.5, "tiny": 1.0E-7, "s": "a ,: b" },'
        ' "metadata": {"correlation_id": "c"}, "timestamp": "2024-05-01T12:00:00Z"}'
    )
    [row] = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", text)))
    assert row["data"] == '{"amount":10.10,"big":12345678901234567890.5,"tiny":1.0E-7,"s":"a ,: b"}'
    assert row["correlation_id"] == "c"


def test_snake_case_mixed_names_and_upper_case_ids(tmp_path: Path) -> None:
    snake = {
        "event_id": "1C0F4A7E-3D52-4D61-9B61-8F1F0F7E8A10",
        "event_type": "Opened",
        "aggregate_type": "Account",
        "aggregate_id": "acc-2",
        "recorded_at": "2024-05-01T12:00:00Z",
        "schema_version": 3,
        "data": {},
        "user_id": "u-1",
        "metadata": {"userId": "ignored"},
    }
    mixed = {**event(), "recorded_at": "2024-05-01T12:00:00Z"}
    mixed.pop("timestamp")
    rows = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", snake, mixed)))
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["event_id"] == "1c0f4a7e-3d52-4d61-9b61-8f1f0f7e8a10"
    assert (rows[0]["schema_version"], rows[0]["user_id"]) == (3, "u-1")
    assert rows[1]["recorded_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_integer_ids_in_metadata_become_text(tmp_path: Path) -> None:
    metadata = {"userId": None, "user_id": 42, "correlationId": -7, "causationId": "c"}
    [row] = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", event(metadata=metadata))))
    assert (row["user_id"], row["correlation_id"], row["causation_id"]) == ("42", "-7", "c")


def test_missing_ids_and_times_stay_null_for_the_store_to_fill(tmp_path: Path) -> None:
    minimal = {"eventType": "A", "aggregateType": "T", "aggregateId": "t-1", "data": {}}
    [row] = rows_of(read_jsonl(write_lines(tmp_path / "e.jsonl", minimal)))
    assert row["error"] is None
    assert (row["event_id"], row["version"], row["recorded_at"], row["occurred_at"]) == (None,) * 4
    assert (row["schema_version"], row["metadata"]) == (1, None)


def test_naive_instants_take_the_named_zone_as_datetime_does(tmp_path: Path) -> None:
    times = [
        "2024-01-15 09:30:00",
        "2024-03-31T02:30:00",
        "2024-10-27T02:30:00",
        "2024-07-01T12:00",
    ]
    path = write_lines(tmp_path / "e.jsonl", *(event(timestamp=t) for t in times))
    rows = rows_of(read_jsonl(path, tz="Europe/Berlin"))
    zone = ZoneInfo("Europe/Berlin")
    expected = [datetime.fromisoformat(t).replace(tzinfo=zone).astimezone(UTC) for t in times]
    assert [r["recorded_at"] for r in rows] == expected
    assert all(r["error"] is None for r in rows)
    with pytest.raises(esw.InvalidEventError, match="unknown time zone"):
        read_jsonl(path, tz="Mars/Olympus")


def test_offsets_python_reads_but_the_fast_path_does_not(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "e.jsonl",
        event(timestamp="2024-05-01T12:00:00+0100"),
        event(timestamp="2024-05-01T12:00:00.123456789Z"),
    )
    rows = rows_of(read_jsonl(path))
    assert [r["recorded_at"] for r in rows] == [
        datetime(2024, 5, 1, 11, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
    ]


@pytest.mark.parametrize(("codec", "name"), [("gzip", "e.jsonl.gz"), ("zstd", "e.jsonl")])
def test_compressed_files_are_found_by_their_first_bytes(
    tmp_path: Path, codec: str, name: str
) -> None:
    plain = write_lines(tmp_path / "plain.jsonl", *(event(version=v) for v in range(1, 6)))
    packed = compressed(plain, codec, name)
    assert packed.read_bytes()[:2] != b"{"
    rows = rows_of(read_jsonl(packed))
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    # A plain file named .gz is read as plain text.
    misnamed = tmp_path / "plain.jsonl.gz"
    misnamed.write_bytes(plain.read_bytes())
    assert len(rows_of(read_jsonl(misnamed))) == 5


def test_concatenated_gzip_members_are_read_whole(tmp_path: Path) -> None:
    one = json.dumps(event(version=1)) + "\n"
    two = json.dumps(event(version=2)) + "\n"
    path = tmp_path / "e.jsonl.gz"
    path.write_bytes(gzip.compress(one.encode()) + gzip.compress(two.encode()))
    assert [r["version"] for r in rows_of(read_jsonl(path))] == [1, 2]


def test_batches_hold_at_most_batch_size_rows_in_source_order(tmp_path: Path) -> None:
    lines: list[object] = [event(version=v) for v in range(1, 24)]
    lines[10] = "not json"
    tables = list(read_jsonl(write_lines(tmp_path / "e.jsonl", *lines), batch_size=5))
    assert [t.num_rows for t in tables] == [5, 5, 5, 5, 3]
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["source_position"] for r in rows] == list(range(1, 24))
    assert rows[10]["error"] is not None
    with pytest.raises(esw.EsWorkbenchError, match="batch_size"):
        read_jsonl(tmp_path / "e.jsonl", batch_size=0)


def test_unicode_and_a_megabyte_payload(tmp_path: Path) -> None:
    big = "é" * 500_000 + "😀"
    line = event(eventType="Überwiesen", aggregateId="конто-1", data={"text": big, "n": "日本"})
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    [row] = rows_of(read_jsonl(path))
    assert row["error"] is None
    assert (row["event_type"], row["aggregate_id"]) == ("Überwiesen", "конто-1")
    assert json.loads(row["data"]) == {"text": big, "n": "日本"}
    assert len(row["data"].encode()) > 1_000_000


def test_byte_order_marks_and_crlf_line_ends(tmp_path: Path) -> None:
    lines = [json.dumps(event(version=v)) for v in (1, 2)]
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    array = tmp_path / "e.json"
    array.write_bytes(b"\xef\xbb\xbf[" + ",\r\n".join(lines).encode() + b"]")
    for read in (read_jsonl, read_json):
        for path in (jsonl, array) if read is read_json else (jsonl,):
            assert [(r["version"], r["error"]) for r in rows_of(read(path))] == [
                (1, None),
                (2, None),
            ]


def test_a_reader_left_half_way_stops_cleanly(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", *(event(version=v) for v in range(1, 50)))
    tables = read_jsonl(path, batch_size=10)
    assert next(tables).num_rows == 10
    cast("Generator[pa.Table, None, None]", tables).close()  # the checking thread ends too


def test_a_missing_file_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")


def test_a_corrupt_compressed_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-40])
    with pytest.raises(esw.EsWorkbenchError, match=r"broken\.jsonl\.gz cannot be read"):
        rows_of(read_jsonl(path))


# -- JSON arrays ----------------------------------------------------------------------------


def test_a_pretty_json_array_is_read_element_by_element() -> None:
    rows = rows_of(read_json(FIXTURES / "pretty.json", batch_size=2))
    assert [r["source_position"] for r in rows] == [1, 2, 3, 4]
    assert [r["error"] for r in rows] == [
        None,
        "field 'version': must be an integer, got 'two'",
        "element 3 is not a JSON object but a string",
        None,
    ]
    assert rows[0]["data"] == (
        '{"items":[{"sku":"A-1","qty":2,"unitPrice":19.90}],"amount":39.80,'
        '"note":"gift, wrapped: yes ]"}'
    )
    assert (rows[0]["correlation_id"], rows[0]["user_id"]) == ("saga-1", "user-9")
    assert rows[3]["data"] == '{"carrier":"Åsa & Søn","trackingNumber":"\\u00e9-42"}'
    assert rows[3]["recorded_at"] == datetime(2024, 5, 1, 23, tzinfo=UTC)


def test_read_json_reads_json_lines_too() -> None:
    assert rows_of(read_json(FIXTURES / "mixed.jsonl")) == rows_of(
        read_jsonl(FIXTURES / "mixed.jsonl")
    )


def test_arrays_larger_than_a_read_chunk_and_empty_arrays(tmp_path: Path) -> None:
    events = [event(version=v, data={"pad": "x" * 50_000}) for v in range(1, 400)]
    path = tmp_path / "big.json.zst"
    with pa.CompressedOutputStream(str(path), "zstd") as sink:
        sink.write(json.dumps(events, indent=2).encode())
    rows = rows_of(read_json(path, batch_size=100))
    assert [r["version"] for r in rows] == list(range(1, 400))
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] \n")
    assert rows_of(read_json(empty)) == []


@pytest.mark.parametrize(
    "text",
    [
        '[{"eventType": "A"}, {"eventType": "B"',
        '[{"a": "unterminated}]',
        "[{}] trailing",
        "[{} {}]",
    ],
)
def test_a_broken_array_stops_with_an_error_after_what_was_readable(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(esw.EsWorkbenchError, match="cannot be read past element"):
        rows_of(read_json(path))


# -- CSV ------------------------------------------------------------------------------------


def test_csv_with_json_cells_a_mapping_and_bad_rows() -> None:
    columns = {"event_type": "kind", "aggregate_id": "stream"}
    rows = rows_of(read_csv(FIXTURES / "events.csv", columns=columns, batch_size=4))
    assert [r["source_position"] for r in rows] == list(range(1, 10))
    assert [r["error"] for r in rows] == [
        None,
        None,
        "row 3 has 3 cells, but the header has 8",
        "field 'version': must be an integer, got '3a'",
        "field 'recorded_at': is a naive timestamp (2024-05-01T12:04:00); name its zone with tz=",
        "field 'event_type': is missing; field 'data': must be a JSON object, got an array",
        "field 'data': is text that is not JSON: '{\"a\": NaN}'",
        "field 'data': is text that is not JSON: '{\"a\": 1,}'",
        None,
    ]
    assert rows[0]["data"] == '{"owner":"Ann, Smith","limit":100.00}'
    assert rows[0]["correlation_id"] == "c-1"
    assert rows[1]["data"] == '{"amount":12345678901234567890.5}'
    assert rows[1]["recorded_at"] == datetime(2024, 5, 1, 11, 1, tzinfo=UTC)
    assert rows[1]["metadata"] is None
    assert rows[8]["user_id"] == "u-2"


def test_csv_column_errors_are_raised_before_reading(tmp_path: Path) -> None:
    with pytest.raises(esw.InvalidEventError, match="no column for event_type, aggregate_id"):
        read_csv(FIXTURES / "events.csv")
    with pytest.raises(esw.InvalidEventError, match="has no column 'nope'"):
        read_csv(FIXTURES / "events.csv", columns={"event_type": "nope"})
    with pytest.raises(esw.InvalidEventError, match="not a field of an event"):
        read_csv(FIXTURES / "events.csv", columns={"stream": "stream"})


def test_csv_camel_case_headers_and_empty_strings(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(
        "eventType,aggregateType,aggregateId,timestamp,data,userId\n"
        'A,T,t-1,2024-05-01T12:00:00Z,{},""\n'
        "B,T,t-1,2024-05-01T12:00:00Z,{},\n",
        encoding="utf-8",
    )
    rows = rows_of(read_csv(path))
    assert [r["event_type"] for r in rows] == ["A", "B"]
    assert [r["user_id"] for r in rows] == ["", None]


# -- Parquet and Arrow IPC ----------------------------------------------------------------


def foreign_table() -> pa.Table:
    return pa.table(
        {
            "stream_id": pa.array([101, 101, 102, 102], pa.int64()),
            "kind": ["Opened", "Renamed", "Opened", ""],
            "aggregate_type": pa.array(["Account"] * 4).dictionary_encode(),
            "seq": pa.array([1, 2, 1, 0], pa.int32()),
            "ts": pa.array([datetime(2024, 5, 1, 12, i) for i in range(4)], pa.timestamp("ms")),
            "payload": pa.array(
                [{"name": "A", "n": 1}, {"name": "B", "n": 2}, None, {"name": "D", "n": 4}],
                pa.struct([("name", pa.string()), ("n", pa.int64())]),
            ),
            "meta": ['{"correlationId": "c-1"}', None, "[1]", None],
            "other": [1.5, 2.5, 3.5, 4.5],
        }
    )


MAPPING = {
    "aggregate_id": "stream_id",
    "event_type": "kind",
    "version": "seq",
    "recorded_at": "ts",
    "data": "payload",
    "metadata": "meta",
}


def test_parquet_with_a_column_mapping_is_checked_column_wise(tmp_path: Path) -> None:
    path = tmp_path / "foreign.parquet"
    pq.write_table(foreign_table(), path)
    with pytest.raises(esw.InvalidEventError, match="timestamps without a zone"):
        rows_of(read_table(path, columns=MAPPING))
    rows = rows_of(read_table(path, columns=MAPPING, tz="UTC", batch_size=3))
    assert [r["source_position"] for r in rows] == [1, 2, 3, 4]
    assert [r["aggregate_id"] for r in rows] == ["101", "101", "102", "102"]
    assert rows[0]["data"] == '{"name":"A","n":1}'
    assert rows[0]["correlation_id"] == "c-1"
    assert rows[1]["recorded_at"] == datetime(2024, 5, 1, 12, 1, tzinfo=UTC)
    assert rows[1]["error"] is None
    assert rows[2]["error"] == (
        "field 'data': is missing; field 'metadata': must be a JSON object, got an array"
    )
    assert rows[3]["error"] == "field 'event_type': is empty; field 'version': must be >= 1, got 0"


@pytest.mark.parametrize("writer", ["file", "stream"])
def test_arrow_ipc_files_and_streams(tmp_path: Path, writer: str) -> None:
    table = foreign_table().slice(0, 2)
    path = tmp_path / "foreign.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        opener = pa.ipc.new_file if writer == "file" else pa.ipc.new_stream
        with opener(sink, table.schema) as out:
            out.write_table(table)
    rows = rows_of(read_table(path, columns=MAPPING, tz="Europe/Berlin"))
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["recorded_at"] == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_a_column_of_a_type_no_field_can_have_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "floats.parquet"
    pq.write_table(foreign_table(), path)
    with pytest.raises(esw.InvalidEventError, match="'version' has type double"):
        rows_of(read_table(path, columns={**MAPPING, "version": "other"}, tz="UTC"))
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(esw.InvalidEventError, match="neither Parquet nor Arrow IPC"):
        read_table(not_parquet)


def test_text_columns_in_parquet_are_checked_strictly(tmp_path: Path) -> None:
    path = tmp_path / "text.parquet"
    data = ['{"a": 1.50}', '{"a": NaN}', '{"a": 1,}', "{", '"{}"', '{"a": "NaN, Infinity"}']
    pq.write_table(
        pa.table(
            {
                "event_type": ["A"] * 6,
                "aggregate_type": ["T"] * 6,
                "aggregate_id": ["t"] * 6,
                "version": ["1", "2", "3", "4", "5", "06"],
                "recorded_at": ["2024-05-01T12:00:00Z"] * 6,
                "data": data,
            }
        ),
        path,
    )
    rows = rows_of(read_table(path))
    assert [r["data"] for r in rows] == [
        '{"a":1.50}',
        None,
        None,
        None,
        None,
        '{"a":"NaN, Infinity"}',
    ]
    assert [r["error"] is None for r in rows] == [True, False, False, False, False, True]
    assert rows[5]["version"] == 6


# -- the law: the column-wise checks agree with the row-by-row checks ------------------------

PROPERTY = settings(
    max_examples=int(os.environ.get("ESW_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
instants = st.sampled_from(
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01 12:00:00.5+05:30",
        "2024-05-01T12:00:00+0100",
        "2024-05-01T12:00",
        "2024-03-31T02:30:00",
        "2024-10-27T02:30:00",
        "0000-01-01T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "soon",
    ]
)
payloads = st.sampled_from(
    ['{"a": 1.10}', '{"a":[1, {"b": "c, d"}]}', "[1]", "{", '"{}"', '{"a": NaN}', "", " { } "]
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "eventId": st.sampled_from(
            ["6F2FE78D-6A8E-4854-84CA-F6A9C2B4F17C", "6f2fe78d-6a8e-4854-84ca-f6a9c2b4f17c", "x"]
        ),
        "eventType": texts,
        "aggregateType": texts,
        "aggregateId": texts | st.integers(),
        "version": st.integers(min_value=-2, max_value=3) | st.sampled_from(["3", 2.5, True]),
        "timestamp": instants,
        "occurredAt": instants,
        "schemaVersion": st.integers(min_value=0, max_value=2**31),
        "data": st.dictionaries(texts, texts, max_size=2) | payloads | st.none(),
        "metadata": st.dictionaries(
            st.sampled_from(["userId", "user_id", "causation_id", "x"]),
            texts | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False),
        )
        | payloads,
        "correlation_id": texts,
    },
)


@PROPERTY
@given(events=st.lists(fields, min_size=1, max_size=8), tz=st.sampled_from([None, "Europe/Berlin"]))
def test_json_lines_read_column_wise_as_row_by_row(events: Rows, tz: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_lines(Path(folder) / "e.jsonl", *events)
        fast = rows_of(read_jsonl(path, tz=tz))
        lines = path.read_bytes().splitlines()
    slow = [_json._slow(n, line, "line", zone_of(tz)) for n, line in enumerate(lines, 1)]
    assert fast == slow


@PROPERTY
@given(events=st.lists(fields, min_size=1, max_size=8), tz=st.sampled_from([None, "Asia/Tokyo"]))
def test_text_tables_read_column_wise_as_row_by_row(events: Rows, tz: str | None) -> None:
    names = {"eventId": "event_id", "eventType": "event_type", "aggregateType": "aggregate_type",
             "aggregateId": "aggregate_id", "version": "version", "timestamp": "recorded_at",
             "occurredAt": "occurred_at", "schemaVersion": "schema_version", "data": "data",
             "metadata": "metadata", "correlation_id": "correlation_id"}  # fmt: skip
    as_text = [
        {field: None if e.get(key) is None else _cell(e[key]) for key, field in names.items()}
        for e in events
    ]
    table = pa.Table.from_pylist(
        as_text, schema=pa.schema([(f, pa.string()) for f in names.values()])
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "e.parquet"
        pq.write_table(table, path)
        fast = rows_of(read_table(path, tz=tz))
    slow = [
        check_row(n, row, zone=zone_of(tz), text_integers=True) for n, row in enumerate(as_text, 1)
    ]
    assert fast == slow


def _cell(value: object) -> str:
    """A JSON value as a CSV or Parquet text cell holds it."""
    return value if isinstance(value, str) else json.dumps(value)
