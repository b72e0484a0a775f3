"""The DuckDB session of a store: one connection, with views over the files the Delta log lists.

DuckDB reads the Parquet files itself, so its partition and row-group pruning apply. The views
are rebuilt only when the Delta log has moved on. User values travel as bound parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import duckdb

from esworkbench._statejson import SNAPSHOT_SCHEMA
from esworkbench.errors import QueryError
from esworkbench.events import COLUMNS, EVENT_SCHEMA

__all__ = ["FILES", "Params", "Session"]

Params = Sequence[object] | Mapping[str, object] | None

FILES: Final = "read_parquet(?, hive_partitioning = false)"
"""A scan of the Parquet files bound as the first parameter; values come from the files."""
_COLUMN_LIST: Final = ", ".join(COLUMNS)
_STREAMS_VIEW: Final = """
CREATE OR REPLACE VIEW streams AS
SELECT aggregate_type, aggregate_id,
       max(version) AS last_version,
       count(*) AS event_count,
       min(recorded_at) AS first_recorded_at,
       max(recorded_at) AS last_recorded_at
FROM events
GROUP BY aggregate_type, aggregate_id
"""


def _literal(text: str) -> str:
    """Quotes a file path (ours, never a user value) as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def translate(exc: duckdb.Error, query: str) -> QueryError:
    """Turns a DuckDB error into a QueryError that shows the query and DuckDB's message.

    Examples:
        >>> import duckdb
        >>> try:
        ...     duckdb.sql("select nope")
        ... except duckdb.Error as exc:
        ...     print(type(translate(exc, "select nope")).__name__)
        QueryError
    """
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return QueryError(
        f"DuckDB refused the query: {first}\n  query: {query.strip()}\n"
        "Hint: the views are events and streams; pass values as parameters (?), not in the text",
        query=query,
    )


class Session:
    """One DuckDB connection with the views ``events`` and ``streams``.

    Examples:
        >>> s = Session()
        >>> s.bind([])
        >>> s.sql("select count(*) from events").fetchall()
        [(0,)]
    """

    def __init__(self, *, threads: int | None = None) -> None:
        self.connection = duckdb.connect()
        self.connection.execute("SET TimeZone = 'UTC'")
        self.connection.execute("SET parquet_metadata_cache = true")
        self.connection.execute("SET enable_progress_bar = false")
        if threads is not None:
            self.connection.execute(f"SET threads = {int(threads)}")
        self._files: tuple[str, ...] | None = None
        self._lock = threading.RLock()
        self.connection.register("_esw_no_events", EVENT_SCHEMA.empty_table())
        self.connection.register("_esw_no_snapshots", SNAPSHOT_SCHEMA.empty_table())
        self._snapshot_files: tuple[str, ...] | None = None
        # Set by esworkbench.snapshots: lists the snapshots table's files, so that a query
        # naming the view sees the newest commit.
        self.snapshot_files: Callable[[], Sequence[str]] | None = None
        self.bind_snapshots([])

    def bind(self, files: Sequence[str]) -> None:
        """Points the views at exactly these Parquet files (absolute paths)."""
        key = tuple(files)
        with self._lock:
            if key == self._files:
                return
            if key:
                listing = ", ".join(_literal(f) for f in key)
                source = f"read_parquet([{listing}], hive_partitioning = false)"
            else:
                source = "_esw_no_events"
            self.connection.execute(
                f"CREATE OR REPLACE VIEW events AS SELECT {_COLUMN_LIST} FROM {source}"
            )
            self.connection.execute(_STREAMS_VIEW)
            self._files = key

    def bind_snapshots(self, files: Sequence[str]) -> None:
        """Points the ``snapshots`` view at exactly these Parquet files (absolute paths).

        Examples:
            >>> s = Session()
            >>> s.sql("select count(*) from snapshots").fetchall()
            [(0,)]
        """
        key = tuple(files)
        with self._lock:
            if key == self._snapshot_files:
                return
            if key:
                listing = ", ".join(_literal(f) for f in key)
                source = f"read_parquet([{listing}], hive_partitioning = false)"
            else:
                source = "_esw_no_snapshots"
            names = ", ".join(SNAPSHOT_SCHEMA.names)
            self.connection.execute(
                f"CREATE OR REPLACE VIEW snapshots AS SELECT {names} FROM {source}"
            )
            self._snapshot_files = key

    def sql(self, query: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        """Runs a query over the views and returns a DuckDB relation.

        Raises:
            QueryError: when DuckDB refuses the query, with the query and DuckDB's message.
        """
        if self.snapshot_files is not None and "snapshots" in query.lower():
            self.bind_snapshots(self.snapshot_files())
        with self._lock:
            try:
                relation = self.connection.sql(query, params=params)
            except duckdb.Error as exc:
                raise translate(exc, query) from exc
        if relation is None:
            # A statement with no result (SET, CREATE TEMP TABLE ...): answer with an empty one.
            return self.connection.sql("SELECT 'ok' AS status WHERE false")
        return relation

    def execute(self, query: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Runs an internal query and fetches every row; errors are translated."""
        with self._lock:
            try:
                return self.connection.execute(query, params).fetchall()
            except duckdb.Error as exc:
                raise translate(exc, query) from exc

    def close(self) -> None:
        """Closes the connection."""
        self.connection.close()
