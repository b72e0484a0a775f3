"""Declared folds compiled to DuckDB SQL: every aggregate of a type in one grouped query.

Each declared piece becomes one aggregate expression over the ``events`` view; field names, event
types and statuses travel as bound parameters. DuckDB reads JSON numbers as doubles, so SQL answers
are exact for numbers of up to 15 significant digits (every amount of money in practice); the Python
engine is exact for any number.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, Final

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.aggregates import Aggregate, Piece
from esworkbench.engine import _EXACT, _PLAIN, EPOCH, _decode_column
from esworkbench.errors import EsWorkbenchError
from esworkbench.events import dumps_json

__all__ = ["InexactError", "compile_as_of", "compile_timeline", "exact", "present_columns"]

_NUMBER: Final = "('BIGINT', 'UBIGINT', 'DOUBLE')"


class InexactError(EsWorkbenchError):
    """SQL cannot sum or compare a field's numbers exactly (beyond ``DECIMAL(38, 18)``): the
    Python engine answers instead, or, asked for SQL alone, this is the error."""


def _inexact(aggregate: Aggregate, slots: dict[str, int], *, grouped: bool) -> str:
    """SQL, true where sums, minima or maxima would take a number inexactly: beyond
    ``DECIMAL(38, 18)``. Such a number is a JSON double written in exponent form (``1e21``,
    ``1e-19``: rounded by the cast), or one the cast turns into NULL (20 integer digits and more);
    a number like ``1.5e-7`` that would fit is counted too, which only costs the fallback.
    ``grouped``: over each stream's events, as an aggregate (else for each row)."""
    numeric = ("sum", "min", "max")
    fields = {p.field for p in aggregate.fields.values() if p.kind in numeric and p.field}
    tests = []
    for slot in sorted(slots[f] for f in fields):
        v = f"v[{slot}]"
        number = f"TRY_CAST({v}::VARCHAR AS DECIMAL(38, 18))"
        if grouped:  # counts and a substring: nearly free beside the sum's own cast
            tests.append(
                f"count({number}) <> count(*) FILTER (WHERE json_type({v}) IN {_NUMBER}) OR "
                f"coalesce(bool_or(contains({v}::VARCHAR, 'e')) FILTER "
                f"(WHERE json_type({v}) = 'DOUBLE'), false)"
            )
        else:
            tests.append(
                f"(json_type({v}) = 'DOUBLE' AND (contains({v}::VARCHAR, 'e') OR {number} IS NULL))"
            )
    return " OR ".join(tests) or "false"


def exact(table: pa.Table, aggregate: Aggregate) -> pa.Table:
    """The result of :func:`compile_as_of` or :func:`compile_timeline` without its last column,
    ``_inexact``.

    Raises:
        InexactError: some number was beyond what SQL sums and compares exactly.

    Examples:
        >>> import pyarrow as pa, esworkbench as esw
        >>> fold = esw.Aggregate("A", fields={"n": esw.count()})
        >>> exact(pa.table({"n": [1], "_inexact": [False]}), fold).column_names
        ['n']
    """
    if pc.any(table.column("_inexact")).as_py():
        raise InexactError(
            f"aggregate {aggregate.name!r} sums or compares numbers beyond DECIMAL(38, 18) (more "
            "than 20 integer digits or 18 decimals), which SQL cannot do exactly. Hint: use "
            "engine='python' (engine='auto' does so on its own)"
        )
    return table.drop_columns(["_inexact"])


def json_path(field: str) -> str:
    """The JSON path of a top-level data field, quoted so that any name is safe.

    Examples:
        >>> json_path('a "b"')
        '$."a \\\\"b\\\\""'
    """
    return '$."' + field.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _conditions(piece: Piece, field: str, params: list[Any]) -> list[str]:
    """The rows a piece takes: its event types, and events carrying its field (a number for
    sum, min and max); ``field`` is its extracted JSON. Appends the params in order."""
    conditions: list[str] = []
    if piece.types is not None:
        types = sorted(piece.types)
        conditions.append(f"event_type IN ({', '.join('?' * len(types))})")
        params.extend(types)
    if piece.field is not None:
        if piece.kind in ("sum", "min", "max"):
            conditions.append(f"json_type({field}) IN {_NUMBER}")
        else:
            conditions.append(f"{field} IS NOT NULL")
    return conditions


def _piece(piece: Piece, slots: dict[str, int], params: list[Any]) -> str:
    """One piece as SQL aggregate expressions (some pieces need two), appending its params.

    ``v`` is the list of the data fields the fold reads, extracted once per event: ``v[i]`` is
    the JSON of field ``slots[name]``, NULL when the event does not carry it.
    """
    if piece.kind == "status":
        types = [t for t, _ in piece.statuses]
        for event_type, value in piece.statuses:
            params.extend([event_type, dumps_json(value)])
        params.extend(types)
        cases = " ".join("WHEN ? THEN ?" for _ in types)
        marks = ", ".join("?" * len(types))
        return (
            f"arg_max(CASE event_type {cases} END, version) FILTER (WHERE event_type IN ({marks}))"
        )
    value = f"v[{slots[piece.field]}]" if piece.field is not None else ""
    number = f"TRY_CAST({value}::VARCHAR AS DECIMAL(38, 18))"
    if piece.kind in ("first_at", "last_at"):
        function = "arg_min" if piece.kind == "first_at" else "arg_max"
        text = f"{function}({piece.instant}, version)"
    elif piece.kind == "count":
        text = "count(*)"
    elif piece.kind == "last":
        text = f"arg_max({value}::VARCHAR, version)"
    elif piece.kind == "sum":
        text = f"sum({number})"
    else:  # ties go to the earliest version, as in the Python engine (5 and 5.0 are a tie)
        function, version = (
            ("arg_min", "version") if piece.kind == "min" else ("arg_max", "-version")
        )
        text = f"{function}({value}::VARCHAR, {{'k': {number}, 'v': {version}}})"
    conditions = _conditions(piece, value, params)
    where = f" FILTER (WHERE {' AND '.join(conditions)})" if conditions else ""
    if piece.kind == "sum":  # whether any operand had a fraction: the sum is then not an int
        params.extend(params[len(params) - len(piece.types or ()) :])
        return f"{text}{where}, bool_or(json_type({value}) = 'DOUBLE'){where}"
    return text + where


def compile_as_of(
    aggregate: Aggregate, where: str, where_params: list[Any], source: str = "events"
) -> tuple[str, list[Any]]:
    """The query for every stream of a declared aggregate whose events pass ``where``.

    Columns: aggregate_id, version, last_event_at, then one (two for sums) per declared field,
    then ``_inexact`` (see :func:`exact`).
    ``source`` is the relation the events come from: the ``events`` view, or a SELECT over it
    (the view with upcasters applied, :meth:`~esworkbench.Upcasters.events_sql`). Each event's
    data is parsed once: every field the fold reads comes out of one ``json_extract``.

    Examples:
        >>> import esworkbench as esw
        >>> query, params = compile_as_of(esw.Aggregate("A", fields={"n": esw.count()}), "true", [])
        >>> params
        [[], 'A']
    """
    names = dict.fromkeys(p.field for p in aggregate.fields.values() if p.field is not None)
    slots = {name: i + 1 for i, name in enumerate(names)}
    params: list[Any] = []
    columns = [_piece(piece, slots, params) for piece in aggregate.fields.values()]
    relation = "events" if source == "events" else f"({source}) AS events"
    query = (
        "SELECT aggregate_id, max(version) AS version, arg_max(recorded_at, version) AS "
        f"last_event_at, {', '.join(columns)}, {_inexact(aggregate, slots, grouped=True)} "
        "AS _inexact "
        "FROM (SELECT aggregate_id, version, event_type, "
        "recorded_at, occurred_at, json_extract(data, ?::VARCHAR[]) AS v "
        f"FROM {relation} WHERE aggregate_type = ? AND ({where})) "
        "GROUP BY aggregate_id ORDER BY aggregate_id"
    )
    paths = [json_path(name) for name in names]
    return query, [*params, paths, aggregate.name, *where_params]


# -- the window form: every version of every stream, for timelines --------------------------------


def _when(piece: Piece, value: str, field: str, params: list[Any]) -> str:
    """``value`` on the rows the piece takes (its event types; events carrying its field), NULL
    on the others; appends the params in order."""
    conditions = _conditions(piece, field, params)
    return f"CASE WHEN {' AND '.join(conditions)} THEN {value} END" if conditions else value


def _window_piece(piece: Piece, slots: dict[str, int], params: list[Any]) -> str:
    """One piece as running window expressions over ``w`` (some pieces need two); ``v`` as in
    :func:`_piece`."""
    if piece.kind == "status":
        cases = " ".join("WHEN ? THEN ?" for _ in piece.statuses)
        for event_type, value in piece.statuses:
            params.extend([event_type, dumps_json(value)])
        return f"last_value(CASE event_type {cases} END IGNORE NULLS) OVER w"
    field = f"v[{slots[piece.field]}]" if piece.field is not None else ""
    number = f"TRY_CAST({field}::VARCHAR AS DECIMAL(38, 18))"
    if piece.kind in ("first_at", "last_at"):
        function = "first_value" if piece.kind == "first_at" else "last_value"
        return f"{function}({_when(piece, piece.instant, field, params)} IGNORE NULLS) OVER w"
    if piece.kind == "count":
        return f"count({_when(piece, '1', field, params)}) OVER w"
    if piece.kind == "last":
        return f"last_value({_when(piece, f'{field}::VARCHAR', field, params)} IGNORE NULLS) OVER w"
    if piece.kind == "sum":
        total = _when(piece, number, field, params)
        fraction = _when(piece, f"json_type({field}) = 'DOUBLE'", field, params)
        return f"sum({total}) OVER w, bool_or({fraction}) OVER w"
    # Ties go to the earliest version, as in the Python engine (5 and 5.0 are a tie).
    function, version = ("arg_min", "version") if piece.kind == "min" else ("arg_max", "-version")
    value = _when(piece, f"{field}::VARCHAR", field, params)
    key = _when(piece, f"{{'k': {number}, 'v': {version}}}", field, params)
    return f"{function}({value}, {key}) OVER w"


def compile_timeline(
    aggregate: Aggregate, where: str, where_params: list[Any], source: str = "events"
) -> tuple[str, list[Any]]:
    """The query for every version of every stream of a declared aggregate (window functions).

    Columns: aggregate_id, version, recorded_at, then the declared fields exactly as
    :func:`compile_as_of` lays them out (so :func:`present_columns` reads either), then
    event_type, event_id, user_id, correlation_id, valid_to (the next event's recorded_at) and
    ``_inexact`` (see :func:`exact`).
    Each field is a running aggregate over the stream's events up to and including the row.
    ``source`` is the relation the events come from, as for :func:`compile_as_of`; each event's
    data is parsed once.

    Examples:
        >>> import esworkbench as esw
        >>> query, params = compile_timeline(
        ...     esw.Aggregate("A", fields={"n": esw.count(types="B")}), "true", [])
        >>> params
        ['B', [], 'A']
    """
    names = dict.fromkeys(p.field for p in aggregate.fields.values() if p.field is not None)
    slots = {name: i + 1 for i, name in enumerate(names)}
    params: list[Any] = []
    columns = [_window_piece(piece, slots, params) for piece in aggregate.fields.values()]
    relation = "events" if source == "events" else f"({source}) AS events"
    query = (
        f"SELECT aggregate_id, version, recorded_at, {', '.join(columns)}, event_type, event_id, "
        "user_id, correlation_id, lead(recorded_at) OVER stream AS valid_to, "
        f"{_inexact(aggregate, slots, grouped=False)} AS _inexact "
        "FROM (SELECT aggregate_id, version, event_type, recorded_at, occurred_at, event_id, "
        "user_id, correlation_id, json_extract(data, ?::VARCHAR[]) AS v "
        f"FROM {relation} WHERE aggregate_type = ? AND ({where})) "
        "WINDOW stream AS (PARTITION BY aggregate_id ORDER BY version), "
        "w AS (stream ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) "
        "ORDER BY aggregate_id, version"
    )
    paths = [json_path(name) for name in names]
    return query, [*params, paths, aggregate.name, *where_params]


def present_columns(
    aggregate: Aggregate, table: pa.Table, *, arrow_instants: bool = False
) -> dict[str, Any]:
    """The declared fields of a result (of :func:`compile_timeline` or :func:`compile_as_of`)
    column by column, as the Python engine would show them, each JSON column decoded in one
    call. With ``arrow_instants`` the instants stay
    Arrow timestamp columns (for a frame, which converts them in one call).

    Examples:
        >>> import pyarrow as pa, esworkbench as esw
        >>> fold = esw.Aggregate("A", fields={"owner": esw.last("owner"), "n": esw.count()})
        >>> table = pa.table({"aggregate_id": ["a"], "version": [1], "at": [0],
        ...                   "owner": ['"Ann"'], "n": [1]})
        >>> present_columns(fold, table)
        {'owner': ['Ann'], 'n': [1]}
    """
    decoder = _EXACT if aggregate.decimals else _PLAIN
    fields: dict[str, list[Any]] = {}
    column = 3
    for name, piece in aggregate.fields.items():
        values = table.column(column)
        column += 1
        if piece.kind == "sum":
            fractions = table.column(column)
            column += 1
            fields[name] = _sums(values, fractions, decimals=aggregate.decimals)
        elif piece.kind in ("last", "min", "max", "status"):
            fields[name] = _decode(values, decoder, piece.initial())
        elif piece.kind == "count":
            fields[name] = values.to_pylist()
        elif arrow_instants:
            fields[name] = values
        else:  # instants: through integers, ten times faster than Arrow's aware datetimes
            fields[name] = [
                None if us is None else EPOCH + timedelta(microseconds=us)
                for us in pc.cast(values, pa.int64()).to_pylist()
            ]
    return fields


def _sums(values: pa.ChunkedArray, fractions: pa.ChunkedArray, *, decimals: bool) -> list[Any]:
    """A sum column as :func:`_sum` shows each value; whole columns of integers in one cast."""
    if not pc.any(fractions).as_py():
        try:
            return pc.cast(values, pa.int64()).fill_null(0).to_pylist()  # type: ignore[no-any-return]
        except pa.ArrowInvalid:  # beyond int64: Python ints take any size
            pass
    # Through text, trailing zeros trimmed: Decimal() and float() of text are exact and fast.
    text = pc.utf8_rtrim(pc.utf8_rtrim(pc.cast(values, pa.string()), "0"), ".").fill_null("0")
    convert = Decimal if decimals else float
    flags = fractions.fill_null(False)
    sums: list[Any] = list(map(convert, text.to_pylist()))
    whole = pc.indices_nonzero(pc.invert(flags)).to_pylist()  # streams that only summed ints
    if whole:
        exact = pc.cast(values.fill_null(0), pa.decimal128(38, 0), safe=False)
        for i, value in zip(whole, pc.take(exact, whole).to_pylist(), strict=True):
            sums[i] = int(value)
    return sums


def _decode(texts: pa.ChunkedArray, decoder: msgspec.json.Decoder[Any], null: Any) -> list[Any]:
    """JSON texts decoded in one call (the engine's decoder of data); SQL NULLs become ``null``."""
    values = _decode_column(texts, decoder)
    if texts.null_count:
        for i in pc.indices_nonzero(texts.is_null()).to_pylist():
            values[i] = null
    return values
