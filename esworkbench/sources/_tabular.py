"""Tabular sources (CSV, Parquet, Arrow IPC), and opening files whatever their compression.

A table's columns are matched to the event's fields by name (canonical or camelCase) or by the
caller's mapping; the batches are then checked column-wise by :mod:`esworkbench.sources._stage`,
in a worker thread while the next batch is read.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esworkbench.errors import InvalidEventError
from esworkbench.events import _ALIASES
from esworkbench.sources import _stage
from esworkbench.sources._rows import FIELDS, SOURCE_SCHEMA, bad_row
from esworkbench.sources._stage import rebatch

__all__ = ["csv_header", "csv_tables", "open_stream", "resolve", "table_schema", "table_tables"]

_MAGIC: Final = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_CSV_BLOCK: Final = 32 << 20  # a CSV row must fit in one block: room for large payloads
_REQUIRED: Final = ("event_type", "aggregate_type", "aggregate_id", "data")


@contextmanager
def open_stream(path: Path) -> Iterator[pa.NativeFile]:
    """The file's bytes, decompressed when its first bytes say gzip or zstd."""
    with ExitStack() as stack:
        raw = stack.enter_context(pa.OSFile(str(path), "rb"))
        head = raw.read(4)
        codec = _MAGIC.get(head[:2]) or _MAGIC.get(head)
        raw.seek(0)
        if codec is None:
            yield raw
        else:
            yield stack.enter_context(pa.CompressedInputStream(raw, codec))


def resolve(names: Sequence[str], columns: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    """canonical field -> the file's column, from ``columns``, canonical and camelCase names.

    Raises:
        InvalidEventError: ``columns`` names a field or a column that does not exist, or no
            column is found for a field every event needs.
    """
    given = dict(columns or {})
    hint = f"Hint: the file's columns are {', '.join(map(repr, names))}"
    for field, column in given.items():
        if field not in FIELDS:
            raise InvalidEventError(
                f"columns= maps {field!r}, which is not a field of an event. Hint: the keys are "
                f"{', '.join(FIELDS)}",
                field=field,
            )
        if column not in names:
            raise InvalidEventError(f"{path} has no column {column!r}. {hint}", field=field)
    mapping: dict[str, str] = {}
    for name in names:
        field = _ALIASES.get(name, name)
        if field in FIELDS and field not in given and name not in given.values():
            mapping.setdefault(field, name)
    mapping.update(given)
    missing = [field for field in _REQUIRED if field not in mapping]
    if missing:
        raise InvalidEventError(
            f"{path} has no column for {', '.join(missing)}. {hint}; map yours with "
            f"columns={{{missing[0]!r}: 'your_column'}}",
            field=missing[0],
        )
    return mapping


def _renamed(table: pa.Table, mapping: Mapping[str, str], positions: Any) -> pa.Table:
    columns = {"source_position": pa.array(positions, pa.int64())}
    columns.update({field: table[column] for field, column in mapping.items()})
    return pa.table(columns)


# -- CSV ------------------------------------------------------------------------------------


def csv_header(path: Path, delimiter: str) -> list[str]:
    """The names in the file's first row."""
    with open_stream(path) as stream:
        head = b""
        while b"\n" not in head and (chunk := stream.read(1 << 16)):
            head += chunk
    line = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    return next(csv.reader([line], delimiter=delimiter), [])


def csv_tables(
    path: Path,
    names: list[str],
    mapping: dict[str, str],
    *,
    delimiter: str,
    batch_size: int,
    zone: ZoneInfo | None,
) -> Iterator[pa.Table]:
    """Checked tables of the file's rows; every cell is read as text (an empty cell is null).

    Arrow skips a row that does not split into the header's cells; the row's number (from
    Arrow, which counts rows, not lines) makes it a bad row in its place.
    """
    invalid: dict[int, str] = {}  # data row number -> why it could not be split into cells

    def on_invalid(row: Any) -> str:
        number = max(1, (row.number or 2) - 1)  # Arrow counts the header as row 1
        invalid[number] = (
            f"row {number} has {row.actual_columns} cells, but the header has "
            f"{row.expected_columns}"
        )
        return "skip"

    wanted = sorted(set(mapping.values()))
    options = {
        "read_options": pacsv.ReadOptions(
            use_threads=False, block_size=_CSV_BLOCK, column_names=names, skip_rows=1
        ),
        "parse_options": pacsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
        ),
        "convert_options": pacsv.ConvertOptions(
            column_types=dict.fromkeys(wanted, pa.string()),
            include_columns=wanted,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        ),
    }

    def jobs(connection: Any) -> Iterator[Callable[[], pa.Table]]:
        following = 1  # the number of the next data row
        with open_stream(path) as stream:
            for batch in pacsv.open_csv(stream, **options):
                for start in range(0, batch.num_rows, batch_size):
                    piece = pa.Table.from_batches([batch.slice(start, batch_size)])
                    numbers = _numbers(following, piece.num_rows, invalid)
                    following = int(numbers[-1]) + 1 if len(numbers) else following
                    table = _renamed(piece, mapping, numbers)
                    # Taken here, in the reading thread, where Arrow adds to `invalid`.
                    bad = _due(invalid, following)
                    yield partial(_checked_with, table, bad, connection, zone)
        bad = _due(invalid, None)
        if bad:
            yield partial(_merged, SOURCE_SCHEMA.empty_table(), bad)

    with _stage.connect() as connection:
        yield from _stage.pipelined(jobs(connection))


def _numbers(first: int, count: int, invalid: Mapping[int, str]) -> Any:
    """The numbers of ``count`` good rows from ``first`` on, passing over the invalid rows."""
    skip = [number for number in invalid if number >= first]
    numbers = np.arange(first, first + count + len(skip), dtype=np.int64)
    return numbers[~np.isin(numbers, skip)][:count]


def _due(invalid: dict[int, str], before: int | None) -> list[dict[str, Any]]:
    """Takes the rows that could not be split into cells, numbered below ``before``."""
    due = sorted(n for n in invalid if before is None or n < before)
    return [bad_row(number, invalid.pop(number)) for number in due]


def _checked_with(
    table: pa.Table, bad: list[dict[str, Any]], connection: Any, zone: ZoneInfo | None
) -> pa.Table:
    return _merged(_stage.finish(table, connection, zone=zone), bad)


def _merged(table: pa.Table, bad: list[dict[str, Any]]) -> pa.Table:
    if not bad:
        return table
    rows = pa.Table.from_pylist(bad, schema=SOURCE_SCHEMA)
    return pa.concat_tables([table, rows]).sort_by("source_position")


# -- Parquet and Arrow IPC ----------------------------------------------------------------


def _kind(path: Path) -> str:
    with path.open("rb") as handle:
        magic = handle.read(6)
    if magic[:4] == b"PAR1":
        return "parquet"
    return "ipc file" if magic == b"ARROW1" else "ipc stream"


def table_schema(path: Path) -> pa.Schema:
    """The schema of a Parquet or Arrow IPC file (told apart by their first bytes).

    Raises:
        InvalidEventError: the file is neither.
    """
    kind = _kind(path)
    try:
        if kind == "parquet":
            return pq.read_schema(path)
        with pa.memory_map(str(path)) as source:
            opener = pa.ipc.open_file if kind == "ipc file" else pa.ipc.open_stream
            return opener(source).schema
    except pa.ArrowException as exc:
        raise InvalidEventError(
            f"{path} is neither Parquet nor Arrow IPC: {exc}. Hint: read JSON with read_json "
            "and CSV with read_csv"
        ) from exc


def _batches(path: Path, wanted: list[str], batch_size: int) -> Iterator[pa.Table]:
    kind = _kind(path)
    if kind == "parquet":
        with pq.ParquetFile(path) as parquet:
            # One reader over the whole file holds on to what it has read until it ends (memory
            # grew with the file); a reader per row group holds at most a row group.
            pieces = (
                batch
                for group in range(parquet.num_row_groups)
                for batch in parquet.iter_batches(
                    batch_size=batch_size, row_groups=[group], columns=wanted
                )
            )
            yield from rebatch(pieces, batch_size)
        return
    with pa.memory_map(str(path)) as source:
        if kind == "ipc file":
            reader = pa.ipc.open_file(source)
            stored = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            stored = iter(pa.ipc.open_stream(source))
        for batch in stored:
            for start in range(0, batch.num_rows, batch_size):
                yield pa.Table.from_batches([batch.select(wanted).slice(start, batch_size)])


def table_tables(
    path: Path, mapping: dict[str, str], *, batch_size: int, zone: ZoneInfo | None
) -> Iterator[pa.Table]:
    """Checked tables of the rows of a Parquet or Arrow IPC file, numbered from 1."""
    wanted = sorted(set(mapping.values()))

    def jobs(connection: Any) -> Iterator[Callable[[], pa.Table]]:
        first = 1
        for batch in _batches(path, wanted, batch_size):
            numbers = np.arange(first, first + batch.num_rows, dtype=np.int64)
            first += batch.num_rows
            table = _renamed(batch, mapping, numbers)
            yield partial(_stage.finish, table, connection, zone=zone)

    with _stage.connect() as connection:
        yield from _stage.pipelined(jobs(connection))
