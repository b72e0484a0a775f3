"""Query results as text: aligned tables, CSV, JSON and JSON Lines, written batch by batch."""

from __future__ import annotations

import base64
import csv
import functools
import json
import math
from collections.abc import Callable, Iterable
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from typing import IO, Any, Final, Literal

import pyarrow as pa

from esworkbench.events import dumps_json

Format = Literal["table", "csv", "json", "jsonl", "parquet"]
FORMATS: Final[tuple[Format, ...]] = ("table", "csv", "json", "jsonl", "parquet")


def _plain(value: object) -> object:
    """A value of an Arrow row as a JSON value: instants as ISO 8601 text, bytes as base64."""
    if value is None or isinstance(value, str | int | Decimal):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | clock_time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)


def _column(column: pa.Array) -> list[Any]:
    """A column as JSON values; the common types skip the per-value dispatch of _plain."""
    kind, values = column.type, column.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return list(values)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        return [None if v is None else v.isoformat() for v in values]
    return [_plain(v) for v in values]


def _encoder(schema: pa.Schema) -> Callable[[object], str]:
    """JSON encoding; the slower exact one only where a Decimal may appear."""
    if any(pa.types.is_decimal(t) or pa.types.is_nested(t) for t in schema.types):
        return dumps_json
    return functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


def _cells(column: pa.Array, encode: Callable[[object], str], null: str) -> list[str]:
    """A column as text cells: text as it is, other values as JSON, nulls as ``null``."""
    return [null if v is None else v if isinstance(v, str) else encode(v) for v in _column(column)]


def _write_table(reader: pa.RecordBatchReader, out: IO[str]) -> None:
    table = reader.read_all()
    encode, names = _encoder(table.schema), table.column_names
    cells = [[c.replace("\n", "\\n") for c in _cells(col, encode, "NULL")] for col in table.columns]
    kinds, pat = table.schema.types, pa.types
    numeric = [pat.is_integer(k) or pat.is_floating(k) or pat.is_decimal(k) for k in kinds]
    widths = [
        max([len(name), *map(len, column)]) for name, column in zip(names, cells, strict=True)
    ]

    def line(row: Iterable[str]) -> str:
        padded = (
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(row, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip() + "\n"

    out.write(line(names))
    out.write(line("-" * w for w in widths))
    out.writelines(line(row) for row in zip(*cells, strict=True))
    out.write(f"({table.num_rows:,} row{'' if table.num_rows == 1 else 's'})\n")


def write(reader: pa.RecordBatchReader, output_format: Format, out: IO[str]) -> None:
    if output_format == "table":
        _write_table(reader, out)
        return
    names, encode = reader.schema.names, _encoder(reader.schema)
    if output_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for batch in reader:
            writer.writerows(zip(*(_cells(c, encode, "") for c in batch.columns), strict=True))
        return
    lines = (
        encode(dict(zip(names, row, strict=True)))
        for batch in reader
        for row in zip(*map(_column, batch.columns), strict=True)
    )
    if output_format == "jsonl":
        out.writelines(f"{line}\n" for line in lines)
    else:
        out.write("[")
        out.writelines(f"{',' if i else ''}\n{line}" for i, line in enumerate(lines))
        out.write("\n]\n")
