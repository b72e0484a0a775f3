"""Upcasters: old payload shapes brought up to date on read, one schema_version at a time.

An upcaster is registered for ``(event_type, schema_version)`` and returns the new data, or a pair
``(new_event_type, new_data)``. Reading an event of schema_version 1 with steps for 1 and 2 runs
the step for 1 (the event is then at 2), then the step for 2, and so on while a step exists.

A step may also be written in SQL (:meth:`Upcasters.add_sql`): a DuckDB expression over ``data``
(JSON text) that gives the new data. When every step has SQL, declared folds stay in SQL
(:meth:`Upcasters.events_sql` is the ``events`` view with the steps applied). Where a step has
both forms, the Python engine runs the Python one; a step with only SQL runs through DuckDB one
event at a time there (correct, but slower: give both forms for large Python replays). DuckDB reads
JSON numbers as doubles, so a SQL step keeps numbers exact up to 15 significant digits.

The same steps serve folds (the engine runs them per event), projections and exports
(:meth:`Upcasters.apply` upcasts canonical rows), and :meth:`Upcasters.dry_run` tries them over a
whole history before anyone relies on them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError, InvalidEventError
from esworkbench.events import dumps_json, loads_exact

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

    from esworkbench.engine import Source

__all__ = ["UpcastError", "Upcasters"]

Step = Callable[[Any], Any]
_FAILURES_KEPT: Final = 5  # failures a dry run shows per (event_type, schema_version)


class UpcastError(EsWorkbenchError):
    """An upcaster raised or returned something it should not (names the event and step).

    Examples:
        >>> issubclass(UpcastError, EsWorkbenchError)
        True
    """


@dataclass(frozen=True, slots=True)
class _SqlStep:
    data: str
    event_type: str | None


@dataclass
class _Tally:
    """What a dry run found for one (event_type, schema_version)."""

    events: int = 0
    upcast: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _literal(text: str) -> str:
    """A registered event type as a SQL string literal (the developer's name, never user input)."""
    return "'" + text.replace("'", "''") + "'"


class Upcasters:
    """A registry of upcasting steps, keyed by (event_type, from schema_version).

    Examples:
        >>> up = Upcasters()
        >>> up.add("MoneyDeposited", 1, lambda data: {"amount": data["amt"]})
        >>> up.upcast("MoneyDeposited", 1, {"amt": 5})
        ('MoneyDeposited', 2, {'amount': 5})
    """

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Step] = {}
        self._sql: dict[tuple[str, int], _SqlStep] = {}
        self._duckdb: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, int], Step] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Folds travel to worker processes with cloudpickle; a DuckDB connection cannot.
        return {"_steps": self._steps, "_sql": self._sql}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._duckdb = None
        self._lock = threading.Lock()
        self._runners = {}

    def __bool__(self) -> bool:
        return bool(self._steps) or bool(self._sql)

    def __len__(self) -> int:
        return len(self._steps.keys() | self._sql.keys())

    def __repr__(self) -> str:
        keys = sorted(self._steps.keys() | self._sql.keys())
        return f"Upcasters({', '.join(f'{t} v{v}' for t, v in keys)})"

    @staticmethod
    def _key(event_type: str, from_version: int) -> tuple[str, int]:
        if not isinstance(event_type, str) or not event_type:
            raise EsWorkbenchError(
                f"event_type must be a non-empty string, got {event_type!r}. "
                'Hint: add("MoneyDeposited", 1, step)'
            )
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise EsWorkbenchError(
                f"from_version must be an integer >= 1, got {from_version!r}. "
                "Hint: the schema_version the step reads, e.g. 1"
            )
        return event_type, from_version

    def add(self, event_type: str, from_version: int, step: Step) -> None:
        """Registers the Python step that takes ``event_type`` from ``from_version`` to the next.

        Examples:
            >>> up = Upcasters()
            >>> up.add("Renamed", 1, lambda data: ("OwnerChanged", {"owner": data["name"]}))
            >>> up.upcast("Renamed", 1, {"name": "Ann"})
            ('OwnerChanged', 2, {'owner': 'Ann'})
        """
        key = self._key(event_type, from_version)
        if not callable(step):
            raise EsWorkbenchError(
                f"the upcaster for {event_type} schema_version {from_version} is not callable. "
                "Hint: pass a function data -> new data"
            )
        if key in self._steps:
            raise EsWorkbenchError(
                f"an upcaster for {event_type} schema_version {from_version} is already "
                "registered. Hint: one step per (event_type, schema_version)"
            )
        self._steps[key] = step

    def add_sql(
        self,
        event_type: str,
        from_version: int,
        data_sql: str,
        event_type_sql: str | None = None,
    ) -> None:
        """Registers the SQL form of a step: a DuckDB expression over ``data`` (JSON text).

        Args:
            event_type: the event type the step reads.
            from_version: the schema_version it reads.
            data_sql: the new data, e.g. ``json_object('amount', json_extract(data, '$.amt'))``.
            event_type_sql: the new event_type, an expression over ``data`` and ``event_type``
                (e.g. ``'OwnerChanged'`` in quotes); by default the type stays.

        Examples:
            >>> up = Upcasters()
            >>> up.add_sql("MoneyDeposited", 1,
            ...            "json_object('amount', json_extract(data, '$.amt'))")
            >>> up.upcast("MoneyDeposited", 1, {"amt": 5}), up.sql_complete
            (('MoneyDeposited', 2, {'amount': 5}), True)
        """
        key = self._key(event_type, from_version)
        for name, text in (("data_sql", data_sql), ("event_type_sql", event_type_sql)):
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise EsWorkbenchError(
                    f"{name} of the step for {event_type} schema_version {from_version} must be "
                    f"a SQL expression, got {text!r}. Hint: json_object('amount', "
                    "json_extract(data, '$.amt'))"
                )
        if key in self._sql:
            raise EsWorkbenchError(
                f"a SQL upcaster for {event_type} schema_version {from_version} is already "
                "registered. Hint: one SQL step per (event_type, schema_version)"
            )
        self._sql[key] = _SqlStep(data_sql, event_type_sql)

    def register(self, event_type: str, from_version: int) -> Callable[[Step], Step]:
        """A decorator form of :meth:`add`.

        Examples:
            >>> up = Upcasters()
            >>> @up.register("MoneyDeposited", 1)
            ... def amount(data):
            ...     return {"amount": data["amt"]}
            >>> len(up)
            1
        """

        def decorate(step: Step) -> Step:
            self.add(event_type, from_version, step)
            return step

        return decorate

    def touches(self, event_type: str, schema_version: int) -> bool:
        """Whether an event of this type and schema_version has a step to run.

        Examples:
            >>> up = Upcasters()
            >>> up.add("MoneyDeposited", 1, dict)
            >>> up.touches("MoneyDeposited", 1), up.touches("MoneyDeposited", 2)
            (True, False)
        """
        key = (event_type, schema_version)
        return key in self._steps or key in self._sql

    @property
    def sql_complete(self) -> bool:
        """Whether every step has a SQL form, so declared folds can stay in SQL.

        Examples:
            >>> up = Upcasters()
            >>> up.add("MoneyDeposited", 1, dict)
            >>> up.sql_complete
            False
        """
        return all(key in self._sql for key in self._steps)

    def upcast(
        self, event_type: str, schema_version: int, data: Any, *, where: object = None
    ) -> tuple[str, int, Any]:
        """Runs the steps one at a time; returns (event_type, schema_version, data).

        Raises:
            UpcastError: when a step raises; names the step and ``where`` (the event).

        Examples:
            >>> up = Upcasters()
            >>> up.add("A", 1, lambda d: {**d, "b": 0})
            >>> up.add("A", 2, lambda d: {**d, "c": d["b"] + 1})
            >>> up.upcast("A", 1, {})
            ('A', 3, {'b': 0, 'c': 1})
        """
        while True:
            key = (event_type, schema_version)
            step = self._steps.get(key)
            if step is None and key in self._sql:
                step = self._runners.get(key) or self._runners.setdefault(
                    key, self._sql_runner(key)
                )
            if step is None:
                return event_type, schema_version, data
            try:
                result = step(data)
            except Exception as exc:
                raise UpcastError(
                    f"the upcaster for {event_type} schema_version {schema_version} raised "
                    f"{type(exc).__name__}: {exc}"
                    + (f" on {where!r}" if where else "")
                    + ". Hint: Upcasters.dry_run shows every event it fails on"
                ) from exc
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
                event_type, data = result
            else:
                data = result
            schema_version += 1

    # -- SQL ---------------------------------------------------------------------------------

    def _sql_runner(self, key: tuple[str, int]) -> Step:
        """A Python step that runs the SQL form of ``key`` through DuckDB for one event."""
        sql_step = self._sql[key]
        event_type = key[0]
        new_type = sql_step.event_type or "event_type"
        query = (
            f"SELECT CAST(({sql_step.data}) AS VARCHAR), CAST(({new_type}) AS VARCHAR) "
            "FROM (SELECT CAST(? AS VARCHAR) AS data, CAST(? AS VARCHAR) AS event_type)"
        )

        def run(data: Any) -> Any:
            import duckdb

            with self._lock:
                if self._duckdb is None:
                    self._duckdb = duckdb.connect()
                try:
                    row = self._duckdb.execute(query, [dumps_json(data), event_type]).fetchone()
                except duckdb.Error as exc:
                    raise ValueError(f"DuckDB refused the SQL step: {exc}") from None
            assert row is not None
            text, new = row
            value = None if text is None else loads_exact(text)
            return value if new == event_type else (new, value)

        return run

    def _rounds(self) -> int:
        """How many steps one event can go through at most (the nesting of :meth:`events_sql`)."""
        if any(step.event_type is not None for step in self._sql.values()):
            return len(self._sql)  # a step may rename the type: every step could follow another
        longest = 0
        for event_type, version in self._sql:
            length = 1
            while (event_type, version + length) in self._sql:
                length += 1
            longest = max(longest, length)
        return longest

    def events_sql(self, source: str = "events") -> str:
        """A SELECT over ``source`` (the ``events`` view) with every SQL step applied.

        Each round of CASE expressions takes every matching row one schema_version further,
        reading the row as it was before the round; there are as many rounds as the longest
        chain of steps.

        Raises:
            EsWorkbenchError: when some step has no SQL form.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amt": 5})],
            ...                  aggregate_type="Account")
            >>> up = Upcasters()
            >>> up.add_sql("MoneyDeposited", 1,
            ...            "json_object('amount', json_extract(data, '$.amt'))")
            >>> store.sql(f"SELECT data, schema_version FROM ({up.events_sql()})").fetchall()
            [('{"amount":5}', 2)]
        """
        missing = sorted(key for key in self._steps if key not in self._sql)
        if missing:
            names = ", ".join(f"{t} v{v}" for t, v in missing)
            raise EsWorkbenchError(
                f"the upcasters for {names} have no SQL form, so SQL cannot apply them. "
                "Hint: add one with Upcasters.add_sql, or use the Python engine"
            )
        query = f"SELECT * FROM {source}"
        if not self._sql:
            return query
        matches: list[str] = []
        data_cases: list[str] = []
        type_cases: list[str] = []
        for (event_type, version), step in sorted(self._sql.items()):
            match = f"event_type = {_literal(event_type)} AND schema_version = {version}"
            matches.append(f"({match})")
            data_cases.append(f"WHEN {match} THEN CAST(({step.data}) AS VARCHAR)")
            if step.event_type is not None:
                type_cases.append(f"WHEN {match} THEN CAST(({step.event_type}) AS VARCHAR)")
        replaced = [
            f"CASE {' '.join(data_cases)} ELSE data END AS data",
            f"CASE WHEN {' OR '.join(matches)} THEN schema_version + 1 "
            "ELSE schema_version END AS schema_version",
        ]
        if type_cases:
            replaced.append(f"CASE {' '.join(type_cases)} ELSE event_type END AS event_type")
        for _ in range(self._rounds()):
            query = f"SELECT * REPLACE ({', '.join(replaced)}) FROM ({query})"
        return query

    # -- whole tables --------------------------------------------------------------------------

    def _touched(self, table: pa.Table | pa.RecordBatch) -> pa.Array:
        """A mask of the rows that some step reads."""
        mask = pa.array(np.zeros(table.num_rows, dtype=bool))
        types, versions = table.column("event_type"), table.column("schema_version")
        for event_type, version in self._steps.keys() | self._sql.keys():
            hit = pc.and_(pc.equal(types, event_type), pc.equal(versions, version))
            mask = pc.or_(mask, hit)
        return mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask

    def apply(self, table: pa.Table) -> pa.Table:
        """Upcasts canonical rows (``event_type``, ``schema_version``, ``data``): for exports
        and projections. Numbers keep their exact digits; untouched rows stay as they are.

        Raises:
            UpcastError: when a step fails on a row (names its event_id and version).

        Examples:
            >>> import pyarrow as pa
            >>> up = Upcasters()
            >>> up.add("MoneyDeposited", 1, lambda d: {"amount": d["amt"]})
            >>> rows = pa.table({"event_type": ["MoneyDeposited", "AccountOpened"],
            ...                  "schema_version": pa.array([1, 1], pa.int32()),
            ...                  "data": ['{"amt":10.10}', '{"owner":"Ann"}']})
            >>> up.apply(rows).to_pylist()[0]
            {'event_type': 'MoneyDeposited', 'schema_version': 2, 'data': '{"amount":10.10}'}
        """
        if not self or table.num_rows == 0:
            return table
        mask = self._touched(table)
        wanted = ("event_type", "schema_version", "data", "aggregate_id", "version", "event_id")
        chosen = table.filter(mask).select([n for n in wanted if n in table.column_names])
        if chosen.num_rows == 0:
            return table
        types, versions, datas = [], [], []
        for row in _rows(chosen):
            event_type, version, data = self._one(row)
            types.append(event_type)
            versions.append(version)
            datas.append(data)
        columns = {
            "event_type": types,
            "schema_version": versions,
            "data": datas,
        }
        out = table
        for name, values in columns.items():
            index = out.schema.get_field_index(name)
            column = out.column(index)
            replaced = pc.replace_with_mask(
                column.combine_chunks(), mask, pa.array(values, column.type)
            )
            out = out.set_column(index, out.schema.field(index), replaced)
        return out

    def _one(self, row: dict[str, Any]) -> tuple[str, int, str]:
        """One row upcast: its new event_type, schema_version and data text."""
        where = _where(row)
        try:
            data = loads_exact(row["data"])
        except ValueError as exc:
            raise UpcastError(
                f"the data of {where} is not JSON: {exc}. Hint: run a validation of the store"
            ) from None
        event_type, version, data = self.upcast(
            row["event_type"], row["schema_version"], data, where=where
        )
        try:
            text = dumps_json(data)
        except InvalidEventError as exc:
            raise UpcastError(
                f"the upcasters returned data that JSON cannot hold for {where}: {exc}"
            ) from None
        return event_type, version, text

    def dry_run(self, source: Source, *, batch_size: int = 65_536) -> pd.DataFrame:
        """Tries every step on every event it reads, over the whole history; changes nothing.

        Reads only the events some step reads, in batches (memory stays bounded), and reports
        per (event_type, schema_version) of the stored events: ``events`` (how many are
        stored), ``upcast`` (how many went through every step), ``failed``, ``to_version``
        (the schema_version after the steps, from the first event that went through) and
        ``first_failures`` (up to five: event_id, aggregate_id, version, reason). Every
        schema_version of an event type that has a step is listed, with or without a step.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amt": 5}),
            ...                            esw.NewEvent("MoneyDeposited", {"amount": 1})],
            ...                  aggregate_type="Account")
            >>> up = Upcasters()
            >>> up.add("MoneyDeposited", 1, lambda d: {"amount": d["amt"]})
            >>> report = up.dry_run(store)
            >>> report[["event_type", "schema_version", "events", "upcast", "failed"]].values
            array([['MoneyDeposited', 1, 2, 1, 1]], dtype=object)
            >>> print(report.first_failures[0][0]["reason"])  # doctest: +ELLIPSIS
            the upcaster for MoneyDeposited schema_version 1 raised KeyError: 'amt' on the ...
        """
        import pandas as pd

        tallies: dict[tuple[str, int], _Tally] = {}
        reached: dict[tuple[str, int], int] = {}
        keys = sorted(self._steps.keys() | self._sql.keys())
        if keys:
            types = sorted({t for t, _ in keys})
            counts = source.sql(
                "SELECT event_type, schema_version, count(*) FROM events "
                "WHERE list_contains(?, event_type) GROUP BY ALL",
                [types],
            ).fetchall()
            for event_type, version, count in counts:
                tallies[event_type, version] = _Tally(events=int(count))
                if not self.touches(event_type, version):
                    reached[event_type, version] = version
        touched = sorted(key for key in tallies if self.touches(*key))
        for batch in self._read_touched(source, touched, batch_size):
            for row in _rows(batch):
                key = (row["event_type"], row["schema_version"])
                tally = tallies[key]
                try:
                    _, version, _ = self._one(row)
                except UpcastError as exc:
                    tally.failed += 1
                    if len(tally.failures) < _FAILURES_KEPT:
                        tally.failures.append(
                            {
                                "event_id": row["event_id"],
                                "aggregate_id": row["aggregate_id"],
                                "version": row["version"],
                                "reason": str(exc),
                            }
                        )
                else:
                    tally.upcast += 1
                    reached.setdefault(key, version)
        rows = [
            {
                "event_type": key[0],
                "schema_version": key[1],
                "events": tally.events,
                "upcast": tally.upcast,
                "failed": tally.failed,
                "to_version": reached.get(key),
                "first_failures": tally.failures,
            }
            for key, tally in sorted(tallies.items())
        ]
        columns = ["event_type", "schema_version", "events", "upcast", "failed", "to_version"]
        return pd.DataFrame(rows, columns=[*columns, "first_failures"])

    def _read_touched(
        self, source: Source, keys: list[tuple[str, int]], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        if not keys:
            return
        marks = " OR ".join("(event_type = ? AND schema_version = ?)" for _ in keys)
        params: list[object] = [value for key in keys for value in key]
        reader = source.sql(
            "SELECT event_id, aggregate_id, version, event_type, schema_version, data "
            f"FROM events WHERE {marks}",
            params,
        ).to_arrow_reader(batch_size)
        yield from reader

    @property
    def identity(self) -> str:
        """A digest of the registered steps' code and SQL: keys snapshots with the fold's.

        Examples:
            >>> up = Upcasters()
            >>> before = up.identity
            >>> up.add_sql("A", 1, "data")
            >>> before != up.identity
            True
        """
        from esworkbench.aggregates import _code_identity

        parts = sorted((k, _code_identity(v)) for k, v in self._steps.items())
        sql_parts = sorted((k, s.data, s.event_type) for k, s in self._sql.items())
        text = repr(parts) if not sql_parts else repr((parts, sql_parts))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rows(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    return table.to_pylist()  # type: ignore[no-any-return]


class _Where(str):
    """Names an event in an error message (its repr is the text itself)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _where(row: dict[str, Any]) -> _Where:
    parts = [f"{row['event_type']} schema_version {row['schema_version']}"]
    if row.get("aggregate_id") is not None:
        parts.append(f"stream {row['aggregate_id']!r} version {row.get('version')}")
    if row.get("event_id") is not None:
        parts.append(f"event_id {row['event_id']}")
    return _Where("the event " + ", ".join(parts))
