"""Whole-column checks of source rows: one DuckDB pass per batch, Python only for doubtful rows.

A batch arrives as an Arrow table of the canonical columns in the source's types (text from CSV,
typed columns from Parquet, decoded fields from JSON). One SQL query parses what needs parsing and
tells, per row, whether every field is certainly right; columns that pass unchanged never leave
Arrow. The rows the query cannot vouch for (the rare bad ones, and unusual spellings such as
upper-case UUIDs or ``+0100`` offsets) are read again one by one by
:func:`esworkbench.sources._rows.check_row`, which is the authority on error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError, InvalidEventError
from esworkbench.sources._rows import FIELDS, SOURCE_SCHEMA, check_row

__all__ = ["Recheck", "check_types", "connect", "finish", "pipelined", "rebatch"]

Recheck = Callable[[Sequence[int]], list[dict[str, Any]]]
"""Reads the rows at these indices of a batch again, one by one, as SOURCE_SCHEMA rows."""

_SOURCE: Final = "_esw_source"
_TEXT: Final = (
    "event_id", "event_type", "aggregate_type", "aggregate_id",
    "correlation_id", "causation_id", "user_id",
)  # fmt: skip
_INTEGERS: Final = {"version": 2**63 - 1, "schema_version": 2**31 - 1}
_INSTANTS: Final = ("recorded_at", "occurred_at")
_OBJECTS: Final = ("data", "metadata")
_UUID: Final = "'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'"
_CLOCK: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
_AWARE: Final = f"'{_CLOCK}(Z|z|[+-][0-9]{{2}}:[0-9]{{2}})'"
_NAIVE: Final = f"'{_CLOCK}'"
# yyjson, behind json_valid, also takes NaN, Infinity and trailing commas; strict JSON does not.
# Outside strings only these may appear (letters only in true, false, null and exponents).
_JSON_TOKENS: Final = r"""'(?:"(?:[^"\\]|\\.)*"|[^"a-zA-Z]|[eE]|true|false|null)*'"""
_TRAILING_COMMA: Final = r"',[ \t\n\r]*[]}]'"
# Whitespace outside the strings of an object's text: a tab or line break anywhere (strings
# cannot hold them raw), or a space next to a bracket, comma or colon (values never touch).
_LOOSE: Final = r"'[\t\n\r]|[][{},:] | [][{},:]'"
_SPACE: Final = r"""'("(?:[^"\\]|\\.)*")|[ \t\n\r]+'"""
_PROMOTED: Final = ("correlation_id", "causation_id", "user_id")
_ID_TYPES: Final = "('VARCHAR', 'BIGINT', 'UBIGINT', 'NULL')"
_METADATA_PATHS: Final = (
    "['$.correlationId', '$.correlation_id', '$.causationId', '$.causation_id', "
    "'$.userId', '$.user_id']"
)


def connect() -> duckdb.DuckDBPyConnection:
    """A private DuckDB connection for checking batches (instants read in UTC)."""
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def pipelined(jobs: Iterable[Callable[[], pa.Table]]) -> Iterator[pa.Table]:
    """Runs each job in a worker thread while the next one is made; yields results in order.

    Making a job (decoding JSON, reading a file) holds the GIL; running one (DuckDB, Arrow)
    mostly does not, so the two overlap on two cores. At most two batches are held at once.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="esw-source") as pool:
        pending: Future[pa.Table] | None = None
        for job in jobs:
            running = pool.submit(job)
            if pending is not None:
                yield pending.result()
            pending = running
        if pending is not None:
            yield pending.result()


def rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Cuts a stream of record batches into tables of exactly ``size`` rows (the last: fewer).

    Examples:
        >>> b = pa.record_batch({"x": list(range(5))})
        >>> [t.num_rows for t in rebatch([b, b, b], 4)]
        [4, 4, 4, 3]
    """
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size).combine_chunks()
            rest = table.slice(size)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


def _q(name: str) -> str:
    return f'"{name}"'


def _query(schema: pa.Schema, zone: ZoneInfo | None, json_checked: bool) -> str:
    """The parsed values and one ``ok`` per row, in three nested SELECTs.

    Nesting (rather than lateral aliases, which DuckDB expands in place) computes each parsed
    value once: values first, then the metadata's ids, then the checks that use them.
    """
    values: list[str] = []
    checks: list[str] = []
    for name in ("event_id", "event_type", "aggregate_type", "aggregate_id"):
        x = _q(name)
        if name == "event_id":
            checks.append(f"({x} IS NULL OR regexp_full_match(lower({x}), {_UUID}))")
        else:
            checks.append(f"coalesce({x} <> '' AND NOT contains({x}, chr(0)), false)")
    for name, top in _INTEGERS.items():
        x, kind = _q(name), schema.field(name).type
        if pa.types.is_integer(kind):
            value = f"TRY_CAST({x} AS BIGINT)"
        else:  # text: digits only (DuckDB would also take " 3" or "3.0")
            value = (
                f"CASE WHEN regexp_full_match({x}, '[0-9]{{1,18}}') THEN CAST({x} AS BIGINT) END"
            )
        # Only values in range: the column is cast to its type before bad rows are dropped.
        values.append(f"CASE WHEN {value} BETWEEN 1 AND {top} THEN {value} END AS o_{name}")
        checks.append(f"({x} IS NULL OR o_{name} IS NOT NULL)")
    for name in _INSTANTS:
        value, naive = _instant(_q(name), schema.field(name).type, zone)
        values += [f"{value} AS o_{name}", f"{naive} AS naive_{name}"]
        checks.append(f"({_q(name)} IS NULL OR o_{name} IS NOT NULL OR naive_{name} IS NOT NULL)")
    for name in _OBJECTS:
        values += _json_object(_q(name), json_checked)
        checks.append(f"ok_{name}" if name == "data" else f"({_q(name)} IS NULL OR ok_{name})")
    promoted = []
    for i, name in enumerate(_PROMOTED):
        value = f"coalesce({_q(name)}, _m[{2 * i + 1}], _m[{2 * i + 2}])"
        promoted.append(f"{value} AS o_{name}")
        checks.append(f"NOT coalesce(contains({value}, chr(0)), false)")
    # Ids in the metadata are strings or integers; anything else is for Python to judge.
    kinds = f"list_transform(_t, lambda t: t IS NULL OR t IN {_ID_TYPES})"
    checks.append(f"coalesce(list_bool_and({kinds}), true)")
    outputs = ["source_position"] + [f"o_{n}" for n in (*_INTEGERS, *_INSTANTS)] + promoted
    outputs += [f"naive_{n}" for n in _INSTANTS] + [f"compact_{n}" for n in _OBJECTS]
    return f"""
    SELECT {", ".join(outputs)}, {" AND ".join(checks)} AS ok FROM (
        SELECT *, CASE WHEN ok_metadata
                       THEN json_extract_string(metadata, {_METADATA_PATHS}) END AS _m,
                  CASE WHEN ok_metadata THEN json_type(metadata, {_METADATA_PATHS}) END AS _t
        FROM (SELECT *, {", ".join(values)} FROM {_SOURCE})
    )
    """


def _json_object(x: str, checked: bool) -> list[str]:
    """``ok_`` (the text is a JSON object) and ``compact_`` (the text without its whitespace,
    or null when it has none outside strings) of a JSON text column."""
    name = x.strip('"')
    if checked:  # parsed by a strict JSON parser already
        good = f"starts_with({x}, '{{')"
    else:
        good = (
            f"json_valid({x}) AND regexp_matches({x}, '^[ \\t\\n\\r]*[{{]')"
            f" AND regexp_full_match({x}, {_JSON_TOKENS})"
            f" AND NOT regexp_matches({x}, {_TRAILING_COMMA})"
        )
    # The cheap test first: most texts have no whitespace at all.
    blank = " OR ".join(f"contains({x}, {c})" for c in ("' '", "chr(10)", "chr(9)", "chr(13)"))
    compact = (
        f"CASE WHEN {blank} THEN CASE WHEN regexp_matches({x}, {_LOOSE})"
        f" THEN regexp_replace({x}, {_SPACE}, '\\1', 'g') END END"
    )
    return [f"coalesce({good}, false) AS ok_{name}", f"{compact} AS compact_{name}"]


def _instant(x: str, kind: pa.DataType, zone: ZoneInfo | None) -> tuple[str, str]:
    """(aware value, naive value): naive values get their zone from Arrow afterwards."""
    nothing = "NULL::TIMESTAMP"
    if pa.types.is_timestamp(kind):
        if kind.tz is not None:
            return f"CAST({x} AS TIMESTAMPTZ)", nothing
        return "NULL::TIMESTAMPTZ", f"CAST({x} AS TIMESTAMP)" if zone else nothing
    year_zero = f"starts_with({x}, '0000')"  # DuckDB reads it as 1 BC, Python refuses it
    value = (
        f"CASE WHEN regexp_full_match({x}, {_AWARE}) AND NOT {year_zero}"
        f" THEN TRY_CAST({x} AS TIMESTAMPTZ) END"
    )
    if zone is None:
        return value, nothing
    naive = (
        f"CASE WHEN regexp_full_match({x}, {_NAIVE}) AND NOT {year_zero}"
        f" THEN TRY_CAST({x} AS TIMESTAMP) END"
    )
    return value, naive


def _prepare(
    table: pa.Table, connection: duckdb.DuckDBPyConnection, zone: ZoneInfo | None
) -> pa.Table:
    """Brings each column to a type the query reads, or refuses a type no event field can have.

    Missing fields become null columns, dictionaries are decoded, integer ids become text, and
    struct or map payloads become JSON text.
    """
    columns: dict[str, Any] = {"source_position": table["source_position"]}
    for name in FIELDS:
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows, pa.string())
            continue
        column = table[name]
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
            kind = column.type
        check_types({name: kind}, zone)
        if name in _OBJECTS and pa.types.is_nested(kind):
            column = _to_json(column, connection)
        elif _as_text(name, kind):
            column = column.cast(pa.string())
        columns[name] = column
    return pa.table(columns)


def check_types(types: Mapping[str, pa.DataType], zone: ZoneInfo | None) -> None:
    """Refuses a column type that no value of its field can have.

    Raises:
        InvalidEventError: naming the field, the type and what the field needs.
    """
    for name, kind in types.items():
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_timestamp(kind) and kind.tz is None and zone is None:
            raise InvalidEventError(
                f"the source's column for {name!r} holds timestamps without a zone. Hint: name "
                "their zone with tz='Europe/Berlin' (or 'UTC')",
                field=name,
            )
        nested = name in _OBJECTS and pa.types.is_nested(kind)
        if not (nested or _as_text(name, kind) or _readable(name, kind)):
            raise InvalidEventError(
                f"the source's column for {name!r} has type {kind}, which cannot hold "
                f"{_WANTED[_kind(name)]}. Hint: convert the column, or map another one with "
                "columns=",
                field=name,
            )


_WANTED: Final = {
    "text": "text",
    "integer": "integers (or their digits as text)",
    "instant": "instants (timestamps, or ISO 8601 text)",
    "object": "JSON objects (JSON text, structs or maps)",
}


def _kind(name: str) -> str:
    if name in _INTEGERS:
        return "integer"
    if name in _INSTANTS:
        return "instant"
    return "object" if name in _OBJECTS else "text"


def _as_text(name: str, kind: pa.DataType) -> bool:
    """Whether the column is read as text: other string types, JSON bytes, integer ids."""
    if pa.types.is_null(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return True
    return (name in _OBJECTS and pa.types.is_binary(kind)) or (
        name in _TEXT and pa.types.is_integer(kind)
    )


def _readable(name: str, kind: pa.DataType) -> bool:
    if pa.types.is_string(kind):
        return True
    wanted = _kind(name)
    return (wanted == "integer" and pa.types.is_integer(kind)) or (
        wanted == "instant" and pa.types.is_timestamp(kind)
    )


def _to_json(column: pa.ChunkedArray, connection: duckdb.DuckDBPyConnection) -> Any:
    connection.register(_SOURCE, pa.table({"x": column}))
    try:
        return connection.sql(f"SELECT to_json(x)::VARCHAR FROM {_SOURCE}").to_arrow_table()[0]
    finally:
        connection.unregister(_SOURCE)


def finish(
    table: pa.Table,
    connection: duckdb.DuckDBPyConnection,
    *,
    zone: ZoneInfo | None,
    json_checked: bool = False,
    recheck: Recheck | None = None,
    suspect: Any = None,
) -> pa.Table:
    """Checks a batch of source rows and returns it in :data:`SOURCE_SCHEMA`, in source order.

    Args:
        table: ``source_position`` and any of the canonical fields, in the source's types.
        connection: the reader's DuckDB connection (see :func:`connect`).
        zone: the zone of naive timestamps, or None to refuse them.
        json_checked: ``data`` and ``metadata`` were parsed by a strict JSON parser already.
        recheck: reads doubtful rows again; by default the rows of ``table`` itself, with digit
            text taken as integers.
        suspect: a boolean array: rows to read again whatever the columns say.

    Raises:
        InvalidEventError: a column has a type that no value of its field can have.
    """
    table = _prepare(table, connection, zone)
    connection.register(_SOURCE, table)
    try:  # a projection: DuckDB keeps the rows in their order (checked below, as it is cheap)
        out = connection.sql(_query(table.schema, zone, json_checked)).to_arrow_table()
    finally:
        connection.unregister(_SOURCE)
    if not out["source_position"].equals(table["source_position"]):
        raise EsWorkbenchError("DuckDB returned a batch's rows out of order")  # pragma: no cover
    ok = out["ok"]
    columns: dict[str, Any] = {
        "source_position": table["source_position"],
        "event_id": pc.utf8_lower(table["event_id"]),
        "event_type": table["event_type"],
        "aggregate_type": table["aggregate_type"],
        "aggregate_id": table["aggregate_id"],
    }
    for name in (*_INTEGERS, *_INSTANTS):
        columns[name] = out[f"o_{name}"]
    for name in _OBJECTS:
        columns[name] = pc.coalesce(out[f"compact_{name}"], table[name])
    for name in _PROMOTED:
        columns[name] = out[f"o_{name}"]
    if zone is not None:
        for name in _INSTANTS:
            naive = out[f"naive_{name}"]
            if naive.null_count == len(naive):
                continue
            local = pc.assume_timezone(
                naive, zone.key, ambiguous="earliest", nonexistent="earliest"
            )
            # A wall time in a DST gap does not exist: let Python decide, as datetime does.
            missing = pc.fill_null(pc.not_equal(pc.local_timestamp(local), naive), False)
            ok = pc.and_(ok, pc.invert(missing))
            columns[name] = pc.coalesce(columns[name], local.cast(SOURCE_SCHEMA.field(name).type))
    columns["occurred_at"] = pc.coalesce(columns["occurred_at"], columns["recorded_at"])
    columns["schema_version"] = pc.fill_null(columns["schema_version"], 1)
    columns["error"] = pa.nulls(table.num_rows, pa.string())
    if suspect is not None:
        ok = pc.and_(ok, pc.invert(suspect))
    good = pa.table([columns[n] for n in SOURCE_SCHEMA.names], schema=SOURCE_SCHEMA)
    if pc.all(ok).as_py():
        return good
    doubtful = np.flatnonzero(~ok.to_numpy(zero_copy_only=False)).tolist()
    if recheck is None:
        rows = [
            check_row(row.pop("source_position"), row, zone=zone, text_integers=True)
            for row in table.take(doubtful).to_pylist()
        ]
    else:
        rows = recheck(doubtful)
    again = pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
    return pa.concat_tables([good.filter(ok), again]).sort_by("source_position")
