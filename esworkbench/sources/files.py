"""Readers of event histories in files: JSON Lines, JSON arrays, CSV, Parquet and Arrow IPC.

Every reader yields Arrow tables of :data:`SOURCE_SCHEMA`, at most ``batch_size`` rows each, in
the source's order, with memory bounded by one batch. Each row of the source becomes exactly one
row: a good event with ``error`` null, or a bad one whose ``error`` names the fields that could
not be read (the fields that could be read are kept). ``source_position`` is the row's place in
the source: the line number in JSON Lines, the element's index + 1 in a JSON array, the data row's
number (1 for the row after the header) in CSV, the row's number in Parquet and Arrow files.

``data`` and ``metadata`` keep the source's exact JSON text, made compact: ``10.10`` stays
``10.10`` and ``12345678901234567890.5`` stays exact. Instants without an offset are an error
unless ``tz`` names their zone. An event without ``event_id`` has it null (the store assigns one
when it is appended); one without ``recorded_at`` has it null (the store uses the time of the
append); ``occurred_at`` defaults to ``recorded_at``; ``correlation_id``, ``causation_id`` and
``user_id`` are taken from metadata (camelCase or snake_case keys) when the event has none.

Compressed files (gzip, zstd) are recognised by their first bytes, whatever their names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources import _json, _stage, _tabular
from esworkbench.sources._rows import SOURCE_SCHEMA, zone_of
from esworkbench.sources._tabular import open_stream

__all__ = ["SOURCE_SCHEMA", "read_csv", "read_json", "read_jsonl", "read_table"]

PathLike = str | os.PathLike[str]


def read_jsonl(
    path: PathLike, *, batch_size: int = 100_000, tz: str | None = None
) -> Iterator[pa.Table]:
    """Reads JSON Lines of events (plain, gzip or zstd): one event object per line.

    Events may use the common camelCase shape (``eventId``, ``eventType``, ``aggregateId``,
    ``aggregateType``, ``version``, ``timestamp``, ``occurredAt``, ``schemaVersion``, ``data``,
    ``metadata``) or snake_case names. A line that is not JSON, or a field that is missing or
    wrong, gives a row with an ``error``; blank lines hold no event and give no row.

    Args:
        path: the file.
        batch_size: the most rows in one table.
        tz: IANA zone of instants written without an offset; without it they are an error.

    Returns:
        An iterator of tables of :data:`SOURCE_SCHEMA`.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
        >>> _ = path.write_text(
        ...     '{"eventType": "Deposited", "aggregateType": "Account", "aggregateId": "a-1",'
        ...     ' "version": 1, "timestamp": "2024-05-01T12:00:00Z", "data": {"amount": 10.10}}\\n'
        ...     '{"eventType": "Deposited", "version": "3a"}\\n')
        >>> [table] = read_jsonl(path)
        >>> table.column("data").to_pylist()
        ['{"amount":10.10}', None]
        >>> print(table.column("error")[1])
        field 'aggregate_type': is missing; field 'aggregate_id': is missing; field 'version': \
must be an integer, got '3a'; field 'data': is missing
    """
    source, zone = _checked(path, batch_size, tz)
    return _guarded(source, _json_tables(source, batch_size, zone, array=False))


def read_json(
    path: PathLike, *, batch_size: int = 100_000, tz: str | None = None
) -> Iterator[pa.Table]:
    """Reads a JSON array of events, or JSON Lines: a file whose first character is ``[`` is an
    array, anything else is read as :func:`read_jsonl` reads it.

    The array is read element by element, so it may be larger than memory.

    Args:
        path: the file (plain, gzip or zstd).
        batch_size: the most rows in one table.
        tz: IANA zone of instants written without an offset; without it they are an error.

    Returns:
        An iterator of tables of :data:`SOURCE_SCHEMA`.

    Raises:
        EsWorkbenchError: while reading, if the array is broken so badly that no later element
            can be found (the elements before it have been yielded).

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.json"
        >>> _ = path.write_text('[{"event_type": "Opened", "aggregate_type": "Account", '
        ...     '"aggregate_id": "a-1", "recorded_at": "2024-05-01 12:00", "data": {}}, 7]')
        >>> [table] = read_json(path, tz="Europe/Berlin")
        >>> table.column("recorded_at")[0].as_py().isoformat()
        '2024-05-01T10:00:00+00:00'
        >>> table.column("error").to_pylist()
        [None, 'element 2 is not a JSON object but a number']
    """
    source, zone = _checked(path, batch_size, tz)
    with open_stream(source) as stream:
        first = stream.read(1 << 12).removeprefix(_json.BOM).lstrip()[:1]
    array = first == b"["
    return _guarded(source, _json_tables(source, batch_size, zone, array=array))


def _json_tables(
    path: Path, batch_size: int, zone: ZoneInfo | None, *, array: bool
) -> Iterator[pa.Table]:
    with open_stream(path) as stream:
        if array:
            items = _json.array_items(stream, batch_size)
        else:
            items = _json.line_items(stream, batch_size)
        unit = "element" if array else "line"
        yield from _json.decode_batches(items, unit=unit, zone=zone)


def read_csv(
    path: PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    batch_size: int = 100_000,
    tz: str | None = None,
    delimiter: str = ",",
) -> Iterator[pa.Table]:
    """Reads a CSV file of events with a header row (plain, gzip or zstd).

    Columns are found by their canonical names, their camelCase names, or ``columns``. The
    ``data`` and ``metadata`` cells hold JSON text; ``version`` and ``schema_version`` hold digits;
    instants are ISO 8601 text. An empty cell is null. A row with the wrong number of cells is a
    bad row; so is a cell that cannot be read. Columns the event has no field for are not read.

    Args:
        path: the file.
        columns: canonical field name -> the file's column name, for columns named otherwise.
        batch_size: the most rows in one table.
        tz: IANA zone of instants written without an offset; without it they are an error.
        delimiter: the cell separator.

    Returns:
        An iterator of tables of :data:`SOURCE_SCHEMA`.

    Raises:
        InvalidEventError: the file lacks a column every event needs, or ``columns`` names a
            field or a column that does not exist.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.csv"
        >>> _ = path.write_text('type,stream,aggregate_type,version,data,recorded_at\\n'
        ...     'Opened,a-1,Account,1,"{""owner"": ""Ann""}",2024-05-01T12:00:00+02:00\\n'
        ...     'Closed,a-1,Account,2a,{},2024-05-02T12:00:00Z\\n')
        >>> [table] = read_csv(path, columns={"event_type": "type", "aggregate_id": "stream"})
        >>> table.column("data").to_pylist()
        ['{"owner":"Ann"}', '{}']
        >>> table.column("error").to_pylist()
        [None, "field 'version': must be an integer, got '2a'"]
    """
    source, zone = _checked(path, batch_size, tz)
    names = _tabular.csv_header(source, delimiter)
    mapping = _tabular.resolve(names, columns, source)
    tables = _tabular.csv_tables(
        source, names, mapping, delimiter=delimiter, batch_size=batch_size, zone=zone
    )
    return _guarded(source, _at_most(tables, batch_size))


def read_table(
    path: PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    batch_size: int = 100_000,
    tz: str | None = None,
) -> Iterator[pa.Table]:
    """Reads events from a Parquet file or an Arrow IPC file (``.arrow``, ``.feather``).

    Columns are found by their canonical names, their camelCase names, or ``columns``. Checks run
    on whole columns. ``data`` and ``metadata`` may be JSON text or struct or map columns (which
    become JSON objects); integer id columns become text; timestamp columns without a zone need
    ``tz``. Columns the event has no field for are not read.

    Args:
        path: the file.
        columns: canonical field name -> the file's column name, for example
            ``{"aggregate_id": "stream_id", "recorded_at": "ts"}``.
        batch_size: the most rows in one table.
        tz: IANA zone of naive timestamps; without it they are an error.

    Returns:
        An iterator of tables of :data:`SOURCE_SCHEMA`.

    Raises:
        InvalidEventError: the file lacks a column every event needs, or ``columns`` names a
            field or a column that does not exist.

    Examples:
        >>> import tempfile, pathlib, pyarrow as pa, pyarrow.parquet as pq
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.parquet"
        >>> pq.write_table(pa.table({"stream_id": [7, 7], "event_type": ["Opened", ""],
        ...     "aggregate_type": ["Account"] * 2, "data": ['{"a": 1}', '{}']}), path)
        >>> [table] = read_table(path, columns={"aggregate_id": "stream_id"})
        >>> table.select(["source_position", "aggregate_id", "data", "error"]).to_pylist()[1]
        {'source_position': 2, 'aggregate_id': '7', 'data': '{}', 'error': "field 'event_type': \
is empty"}
    """
    source, zone = _checked(path, batch_size, tz)
    schema = _tabular.table_schema(source)
    mapping = _tabular.resolve(schema.names, columns, source)
    _stage.check_types({field: schema.field(name).type for field, name in mapping.items()}, zone)
    tables = _tabular.table_tables(source, mapping, batch_size=batch_size, zone=zone)
    return _guarded(source, tables)


# -- shared ---------------------------------------------------------------------------------


def _checked(path: PathLike, batch_size: int, tz: str | None) -> tuple[Path, ZoneInfo | None]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EsWorkbenchError(f"batch_size must be an int >= 1, got {batch_size!r}")
    zone = zone_of(tz)
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a file. Hint: check the path")
    return source, zone


def _guarded(path: Path, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Translates I/O and Arrow failures into errors that name the file."""
    try:
        yield from tables
    except (OSError, pa.ArrowException) as exc:
        raise EsWorkbenchError(
            f"{path} cannot be read: {exc}. Hint: check that the file is complete and in the "
            "format read; a compressed file must be gzip or zstd"
        ) from exc


def _at_most(tables: Iterator[pa.Table], batch_size: int) -> Iterator[pa.Table]:
    for table in tables:
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)
