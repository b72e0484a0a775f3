"""The SQL behind an attached lake: its file listing and the canonical record over its columns.

See :mod:`esworkbench.attach`. Values are never formatted into SQL here; what is (file paths and
zone names) comes from the lake's listing or is checked first, and is quoted as a literal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import pyarrow as pa

from esworkbench.errors import StoreError
from esworkbench.events import TIMESTAMP

__all__ = [
    "FILES",
    "OFFSET",
    "REQUIRED",
    "ROW",
    "Files",
    "delta_files",
    "expression",
    "literal",
    "quote",
]

FILES: Final = "_esw_lake_files"
REQUIRED: Final = ("recorded_at", "version")  # besides those every import needs
OFFSET: Final = "_esw_offset"
ROW: Final = "_esw_row"
_METADATA_KEYS: Final = {
    "correlation_id": ("correlationId", "correlation_id"),
    "causation_id": ("causationId", "causation_id"),
    "user_id": ("userId", "user_id"),
}


def literal(text: str) -> str:
    """Quotes a path or zone name as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def quote(name: str) -> str:
    """Quotes a column name as a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Files:
    """The lake's data files in position order, with the first position of each."""

    paths: list[str]
    rows: list[int]
    partitions: dict[str, pa.Array]  # Delta: partition column -> value per file, from the log
    physical: dict[str, str]  # Delta column mapping: logical name -> name in the files
    version: int | None  # Delta: the log version read

    def table(self) -> pa.Table:
        """One row per file: its path, the position before its first row, its partition values."""
        offsets, total = [], 0
        for count in self.rows:
            offsets.append(total)
            total += count
        columns = {"_esw_file": pa.array(self.paths, pa.string())}
        columns[OFFSET] = pa.array(offsets, pa.int64())
        columns.update({f"_esw_part_{n}": v for n, v in self.partitions.items()})
        return pa.table(columns)


def expression(
    name: str,
    mapping: Mapping[str, str],
    types: Mapping[str, pa.DataType],
    zone: ZoneInfo | None,
) -> str:
    """The SQL of one canonical column over the lake's (logically named) columns."""
    column = mapping.get(name)
    kind = types.get(name)
    if name == "position":
        if column is None:
            return f"({OFFSET} + {ROW} + 1)"
        return _cast(quote(column), kind, "BIGINT")
    if column is None or kind is None:
        return _default(name, mapping, types, zone)
    x = quote(column)
    if name in ("version", "schema_version"):
        value = _cast(x, kind, "BIGINT" if name == "version" else "INTEGER")
        return value if name == "version" else f"coalesce({value}, 1)"
    if name in ("recorded_at", "occurred_at"):
        value = _instant(x, kind, zone, name)
        if name == "occurred_at":
            recorded = _instant(quote(mapping["recorded_at"]), types["recorded_at"], zone, name)
            return f"coalesce({value}, {recorded})"
        return value
    if name in ("data", "metadata"):
        return _json_text(x, kind)
    text = _cast(x, kind, "VARCHAR")
    if name in _METADATA_KEYS:
        return f"coalesce({text}, {_from_metadata(name, mapping, types)})"
    return text


def _default(
    name: str, mapping: Mapping[str, str], types: Mapping[str, pa.DataType], zone: ZoneInfo | None
) -> str:
    if name == "occurred_at":
        return _instant(quote(mapping["recorded_at"]), types["recorded_at"], zone, "recorded_at")
    if name == "schema_version":
        return "CAST(1 AS INTEGER)"
    if name == "metadata":
        return "'{}'"
    if name in _METADATA_KEYS:
        return _from_metadata(name, mapping, types)
    # event_id: a UUID-shaped digest of the event's place, the same on every read.
    parts = [
        _cast(quote(mapping[n]), types[n], "VARCHAR") for n in ("aggregate_type", "aggregate_id")
    ]
    version = _cast(quote(mapping["version"]), types["version"], "BIGINT")
    key = f"concat_ws(chr(0), {parts[0]}, {parts[1]}, CAST({version} AS VARCHAR))"
    return f"CAST(CAST(md5({key}) AS UUID) AS VARCHAR)"


def _from_metadata(name: str, mapping: Mapping[str, str], types: Mapping[str, pa.DataType]) -> str:
    if "metadata" not in mapping:
        return "CAST(NULL AS VARCHAR)"
    m = _json_text(quote(mapping["metadata"]), types["metadata"])
    paths = (literal("$." + k) for k in _METADATA_KEYS[name])
    keys = ", ".join(f"json_extract_string({m}, {p})" for p in paths)
    return f"CASE WHEN json_valid({m}) THEN coalesce({keys}) END"


def _cast(x: str, kind: pa.DataType | None, sql_type: str) -> str:
    """A cast, left out where the column has the type already (so filters reach the files)."""
    same = {
        "BIGINT": pa.types.is_int64,
        "INTEGER": pa.types.is_int32,
        "VARCHAR": pa.types.is_string,
    }[sql_type]
    return x if kind is not None and same(kind) else f"CAST({x} AS {sql_type})"


def _instant(x: str, kind: pa.DataType, zone: ZoneInfo | None, name: str) -> str:
    if pa.types.is_timestamp(kind):
        if kind.tz is not None:
            return x if kind == TIMESTAMP else f"CAST({x} AS TIMESTAMPTZ)"
        assert zone is not None  # check_types refuses naive timestamps without a zone
        return f"timezone({literal(zone.key)}, {x})"
    text = _cast(x, kind, "VARCHAR")
    if zone is not None:
        naive = f"timezone({literal(zone.key)}, CAST({text} AS TIMESTAMP))"
    else:
        message = (
            f"{name} holds an instant without a zone. Hint: attach with tz='Europe/Berlin' "
            "(or 'UTC') to name the zone of such instants"
        )
        naive = f"error({literal(message)})"
    aware = f"regexp_matches({text}, '([Zz]|[+-][0-9]{{2}}(:?[0-9]{{2}})?)$')"
    return (
        f"CASE WHEN {text} IS NULL THEN NULL WHEN {aware} THEN CAST({text} AS TIMESTAMPTZ) "
        f"ELSE {naive} END"
    )


def _json_text(x: str, kind: pa.DataType) -> str:
    if pa.types.is_nested(kind):
        return f"CAST(to_json({x}) AS VARCHAR)"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return f"decode({x})"
    return _cast(x, kind, "VARCHAR")


def delta_files(path: Path) -> Files:
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        table = DeltaTable(str(path))
        actions = pa.table(table.get_add_actions(flatten=True))
        schema = table.schema()
        protocol = table.protocol()
        partitions = list(table.metadata().partition_columns)
    except (DeltaError, OSError) as exc:
        raise StoreError(
            f"the Delta table {path} cannot be read: {exc}. Hint: check that the directory "
            "holds a complete _delta_log"
        ) from exc
    unsupported = set(protocol.reader_features or []) - {"columnMapping", "timestampNtz"}
    if unsupported:
        raise StoreError(
            f"the Delta table {path} uses {', '.join(sorted(unsupported))}, which attach cannot "
            "read. Hint: rewrite the table without them (for deletion vectors: purge them)"
        )
    physical = {
        field.name: str(field.metadata.get("delta.columnMapping.physicalName", field.name))
        for field in schema.fields
    }
    ordered = actions.sort_by([("modification_time", "ascending"), ("path", "ascending")])
    paths = [str(path / unquote(p)) for p in ordered["path"].to_pylist()]
    values = {
        name: ordered[f"partition.{name}"].combine_chunks()
        if f"partition.{name}" in ordered.column_names
        else pa.nulls(ordered.num_rows, pa.string())
        for name in partitions
    }
    rows = [int(n) for n in ordered["num_records"].to_pylist()]
    return Files(paths, rows, values, physical, int(table.version()))
