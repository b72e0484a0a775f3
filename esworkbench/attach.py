"""Foreign lakes attached read-only: SQL and stream reads over event tables written elsewhere.

A lake is a Delta table (a directory holding ``_delta_log``) or hive-partitioned Parquet (a
directory, read as ``**/*.parquet``, or a glob). Its columns are mapped onto the canonical record
by name (canonical or camelCase) or by ``columns=``, the same mapping the Parquet importer takes,
and an :class:`AttachedLake` then answers ``sql``, ``read_stream`` and ``read_all`` exactly as a
:class:`~esworkbench.Store` does, with the views ``events`` and ``streams`` in the same columns and
types. Nothing is copied: DuckDB reads the lake's Parquet files with its own reader, so filters on
the lake's columns prune row groups.

Where the values come from:

- Delta: the files and their partition values come from the Delta log, never from paths, so any
  partition value reads back exactly; column mapping (physical names unlike logical ones) is
  followed. Tables with deletion vectors are refused.
- Hive Parquet: partition values come from the ``key=value`` directories (URL-decoded); they are
  read as text, never guessed into numbers.
- ``position`` comes from the column ``position`` or a mapped one (``columns={"position":
  "seq"}``). Without one, it
  numbers the rows in file order and then row order within each file: Delta files by the time the
  log says they were written (then path), so events committed later get later positions; Parquet
  files by path. This is deterministic for the same files, but it is storage order, not time
  order: map a column for a meaningful one.
- ``occurred_at`` defaults to ``recorded_at``, ``schema_version`` to 1, ``metadata`` to ``'{}'``,
  ``correlation_id``, ``causation_id`` and ``user_id`` to the metadata's keys (camelCase or
  snake_case), and ``event_id`` to a UUID-shaped md5 of (aggregate_type, aggregate_id, version).

The lake is read as it is: rows are not checked (run the validation rules for that). Writing is
refused with :class:`~esworkbench.ReadOnlyError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Literal, NoReturn
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa

from esworkbench import _checks
from esworkbench.errors import ReadOnlyError, StoreError
from esworkbench.events import EVENT_SCHEMA, TIMESTAMP
from esworkbench.query import _STREAMS_VIEW, Params, Session, translate
from esworkbench.sources import _lake
from esworkbench.sources._rows import zone_of
from esworkbench.sources._stage import check_types
from esworkbench.sources._tabular import resolve

__all__ = ["AttachedLake", "LakeFormat", "attach"]

LakeFormat = Literal["delta", "parquet"]


class AttachedLake:
    """A foreign event lake, read like a store and never written. Use :func:`attach`.

    Examples:
        >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, esworkbench as esw
        >>> from datetime import datetime, UTC
        >>> folder = tempfile.mkdtemp()
        >>> pq.write_table(pa.table({"stream": ["a-1", "a-1"], "type": ["Opened", "Closed"],
        ...     "kind": ["Account"] * 2, "version": [1, 2], "body": ["{}", "{}"],
        ...     "ts": [datetime(2024, 1, 1, tzinfo=UTC)] * 2}), folder + "/part-0.parquet")
        >>> lake = esw.attach(folder, columns={"aggregate_id": "stream", "event_type": "type",
        ...     "aggregate_type": "kind", "data": "body", "recorded_at": "ts"})
        >>> lake.read_stream("a-1").column("event_type").to_pylist()
        ['Opened', 'Closed']
        >>> lake.sql("select last_version from streams").fetchall()
        [(2,)]
    """

    def __init__(
        self,
        path: Path,
        source: str,
        format: LakeFormat,
        columns: Mapping[str, str] | None,
        zone: ZoneInfo | None,
    ) -> None:
        self.path = path
        self.format: LakeFormat = format
        self._source = source
        self._columns = dict(columns or {})
        self._zone = zone
        self._session = Session()
        self._files = _lake.Files([], [], {}, {}, None)
        self._select = ""
        self._mapped_position = False
        self.refresh()

    def __repr__(self) -> str:
        return f"AttachedLake({self._source!r}, format={self.format!r})"

    # -- reading -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reads the lake's file listing again (a Delta table moves to its newest commit).

        A Delta lake does this by itself before each read when its log has moved on; a Parquet
        lake keeps the files it was attached with until this is called.
        """
        files = _lake.delta_files(self.path) if self.format == "delta" else self._parquet_files()
        connection = self._session.connection
        with self._session._lock:
            connection.register("_esw_listing", files.table())
            try:
                connection.execute(f"CREATE OR REPLACE TABLE {_lake.FILES} AS FROM _esw_listing")
            finally:
                connection.unregister("_esw_listing")
            self._files = files
            self._select, self._mapped_position = ("", False)
            if files.paths:
                self._select, self._mapped_position = self._canonical(files)
            self._bind_views(self._events_sql(files.paths))

    def _refresh_if_moved(self) -> None:
        version = self._files.version
        if version is None:
            return
        upcoming = self.path / "_delta_log" / f"{version + 1:020d}.json"
        if upcoming.exists():
            self.refresh()

    def _parquet_files(self) -> _lake.Files:
        pattern = str(self.path / "**" / "*.parquet") if self.path.is_dir() else str(self.path)
        try:
            rows = self._session.connection.execute(
                "SELECT file_name, num_rows FROM parquet_file_metadata(?) ORDER BY file_name",
                [pattern],
            ).fetchall()
        except duckdb.Error as exc:
            raise StoreError(
                f"no Parquet files can be read at {self._source}: {str(exc).splitlines()[0]}. "
                "Hint: pass a directory of hive-partitioned Parquet, a glob such as "
                "'lake/**/*.parquet', or a Delta table's directory"
            ) from exc
        return _lake.Files([r[0] for r in rows], [int(r[1]) for r in rows], {}, {}, None)

    def _scan(self, paths: list[str]) -> str:
        """The lake's rows in its logical column names, with each row's file offset and number."""
        listing = "[" + ", ".join(_lake.literal(p) for p in paths) + "]"
        hive = "false" if self.format == "delta" else "true"
        scan = (
            f"read_parquet({listing}, hive_partitioning = {hive}, hive_types_autocast = false, "
            "union_by_name = true, filename = '_esw_file', file_row_number = true)"
        )
        if self.format == "delta":
            picked = [
                f"f.{_lake.quote('_esw_part_' + name)} AS {_lake.quote(name)}"
                if name in self._files.partitions
                else f"r.{_lake.quote(physical)} AS {_lake.quote(name)}"
                for name, physical in self._files.physical.items()
            ]
            chosen = ", ".join(picked)
        else:
            chosen = "r.* EXCLUDE (_esw_file, file_row_number)"
        return (
            f"SELECT {chosen}, f.{_lake.OFFSET}, r.file_row_number AS {_lake.ROW} "
            f"FROM {scan} r JOIN {_lake.FILES} f ON r._esw_file = f._esw_file"
        )

    def _canonical(self, files: _lake.Files) -> tuple[str, bool]:
        """The SELECT list that makes the lake's columns the canonical record, and whether
        position comes from a column."""
        probe = self._session.connection.sql(self._scan(files.paths[:1]) + " LIMIT 0")
        schema = probe.to_arrow_table().schema
        names = [n for n in schema.names if n not in (_lake.OFFSET, _lake.ROW)]
        columns = dict(self._columns)
        position = columns.pop("position", "position" if "position" in names else None)
        mapping = resolve(names, columns, self.path)
        missing = [f for f in _lake.REQUIRED if f not in mapping]
        if position is not None:
            mapping["position"] = position
            missing += [] if position in names else ["position"]
        if missing:
            raise StoreError(
                f"the lake {self._source} has no column for {missing[0]}. Hint: its columns are "
                f"{', '.join(map(repr, names))}; map one with columns={{{missing[0]!r}: '...'}}"
            )
        types = {field: schema.field(column).type for field, column in mapping.items()}
        check_types({f: t for f, t in types.items() if f != "position"}, self._zone)
        select = ", ".join(
            _lake.expression(n, mapping, types, self._zone) + f" AS {n}" for n in EVENT_SCHEMA.names
        )
        return select, position is not None

    def _events_sql(self, paths: list[str]) -> str:
        if not paths:
            return "SELECT * FROM _esw_no_events"
        return f"SELECT {self._select} FROM ({self._scan(paths)})"

    def _bind_views(self, events: str) -> None:
        self._session.execute(f"CREATE OR REPLACE VIEW events AS {events}")
        self._session.execute(_STREAMS_VIEW)

    def sql(self, query: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        """Runs SQL over the views ``events`` and ``streams``; values go in ``params``.

        Examples:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, esworkbench as esw
            >>> from datetime import datetime, UTC
            >>> folder = tempfile.mkdtemp()
            >>> pq.write_table(pa.table({"aggregate_id": ["a"], "aggregate_type": ["Account"],
            ...     "event_type": ["Opened"], "version": [1], "data": ['{"owner": "Ann"}'],
            ...     "recorded_at": [datetime(2024, 1, 1, tzinfo=UTC)]}), folder + "/0.parquet")
            >>> esw.attach(folder).sql("select position, data->>'owner' from events").fetchall()
            [(1, 'Ann')]
        """
        self._refresh_if_moved()
        return self._session.sql(query, params)

    def read_stream(
        self,
        aggregate_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> pa.Table:
        """Reads one stream in version order, as an Arrow table of canonical columns.

        Args:
            aggregate_id: the stream.
            from_version: first version to return.
            to_version: last version to return (inclusive); ``None`` for the head.
            until: only events with ``recorded_at <= until`` (an aware datetime).

        Examples:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, esworkbench as esw
            >>> from datetime import datetime, UTC
            >>> folder = tempfile.mkdtemp()
            >>> pq.write_table(pa.table({"aggregate_id": ["a", "a"], "version": [2, 1],
            ...     "aggregate_type": ["Account"] * 2, "event_type": ["Closed", "Opened"],
            ...     "data": ["{}"] * 2, "recorded_at": [datetime(2024, 1, 1, tzinfo=UTC)] * 2}),
            ...     folder + "/0.parquet")
            >>> esw.attach(folder).read_stream("a", to_version=1).column("event_type").to_pylist()
            ['Opened']
        """
        _checks.check_bound(until, "until")
        query = "SELECT * FROM events WHERE aggregate_id = ? AND version >= ?"
        params: list[object] = [aggregate_id, from_version]
        if to_version is not None:
            query += " AND version <= ?"
            params.append(to_version)
        if until is not None:
            query += " AND recorded_at <= ?"
            params.append(pa.scalar(until, TIMESTAMP).as_py())
        query += " ORDER BY version"
        try:
            table = self.sql(query, params).to_arrow_table()
        except duckdb.Error as exc:  # a relation runs lazily: a bad value shows only now
            raise translate(exc, query) from exc
        if table.num_rows == 0:
            return EVENT_SCHEMA.empty_table()
        return table.cast(EVENT_SCHEMA)

    def read_all(
        self, *, from_position: int = 0, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Yields every event with ``position > from_position`` in position order, in batches.

        Memory stays bounded: the lake is read one file at a time (positions in file order) or
        one window of positions at a time (a mapped position column).

        Examples:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, esworkbench as esw
            >>> from datetime import datetime, UTC
            >>> folder = tempfile.mkdtemp()
            >>> pq.write_table(pa.table({"aggregate_id": ["a", "b"], "version": [1, 1],
            ...     "aggregate_type": ["Account"] * 2, "event_type": ["Opened"] * 2,
            ...     "data": ["{}"] * 2, "recorded_at": [datetime(2024, 1, 1, tzinfo=UTC)] * 2}),
            ...     folder + "/0.parquet")
            >>> [b.num_rows for b in esw.attach(folder).read_all(from_position=1)]
            [1]
        """
        self._refresh_if_moved()
        if not self._files.paths:
            return
        cursor = self._session.connection.cursor()  # a reader apart from sql() on the session
        try:
            for query, params in self._windows(cursor, from_position):
                try:
                    reader = cursor.sql(query, params=params).to_arrow_reader(batch_size)
                    for batch in reader:
                        yield batch.cast(EVENT_SCHEMA)
                except duckdb.Error as exc:
                    raise translate(exc, query) from exc
        finally:
            cursor.close()

    def _windows(
        self, cursor: duckdb.DuckDBPyConnection, low: int
    ) -> Iterator[tuple[str, list[object]]]:
        """Queries that together return every event past ``low``, each in position order."""
        if not self._mapped_position:
            offset = 0
            for path, count in zip(self._files.paths, self._files.rows, strict=True):
                offset += count
                if offset > low and count:
                    query = f"SELECT * FROM ({self._events_sql([path])}) WHERE position > ?"
                    yield query + " ORDER BY position", [low]
            return
        query = "SELECT * FROM events WHERE position > ? AND position <= ? ORDER BY position"
        window = 1 << 20
        while True:
            found = cursor.execute("SELECT min(position) FROM events WHERE position > ?", [low])
            first = found.fetchall()[0][0]
            if first is None:
                return
            high = int(first) - 1 + window
            yield query, [low, high]
            low = high

    # -- writing is refused ------------------------------------------------------------

    def _refuse(self, verb: str) -> NoReturn:
        raise ReadOnlyError(
            f"cannot {verb} the attached lake {self._source}: an attached lake is read-only. "
            "Hint: import it into a store with esw.import_events, or write to a store"
        )

    def append(self, *_args: object, **_options: object) -> NoReturn:
        """Refused: an attached lake is read-only.

        Examples:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, esworkbench as esw
            >>> folder = tempfile.mkdtemp()
            >>> pq.write_table(pa.table({"aggregate_id": ["a"], "version": [1],
            ...     "aggregate_type": ["T"], "event_type": ["E"], "data": ["{}"],
            ...     "recorded_at": pa.array([0], pa.timestamp("us", "UTC"))}),
            ...     folder + "/0.parquet")
            >>> esw.attach(folder).append("a", [])
            Traceback (most recent call last):
            ...
            esworkbench.errors.ReadOnlyError: cannot append to the attached lake ...
        """
        self._refuse("append to")

    def append_batch(self, *_args: object, **_options: object) -> NoReturn:
        """Refused: an attached lake is read-only (see :meth:`append`)."""
        self._refuse("append to")

    def compact(self) -> NoReturn:
        """Refused: an attached lake is read-only (see :meth:`append`)."""
        self._refuse("compact")

    def close(self) -> None:
        """Closes the DuckDB session."""
        self._session.close()


def attach(
    source: str | os.PathLike[str],
    *,
    columns: Mapping[str, str] | None = None,
    format: LakeFormat | None = None,
    tz: str | None = None,
) -> AttachedLake:
    """Attaches a foreign lake of events, read-only, as an :class:`AttachedLake`.

    Args:
        source: a Delta table's directory, a directory of hive-partitioned Parquet, or a glob of
            Parquet files. An esworkbench store's directory attaches its events table.
        columns: canonical column -> the lake's column, for columns named otherwise, for
            example ``{"aggregate_id": "stream_id", "recorded_at": "ts", "position": "seq"}``.
        format: ``"delta"`` or ``"parquet"``; by default a directory holding ``_delta_log`` is
            Delta and anything else Parquet.
        tz: IANA zone of timestamps written without one; without it they are refused.

    Raises:
        StoreError: the source holds no readable lake, or lacks a column the record needs.
        InvalidEventError: a mapped column has a type its field cannot take.

    Examples:
        >>> import tempfile, pyarrow as pa, esworkbench as esw
        >>> from datetime import datetime, UTC
        >>> from deltalake import write_deltalake
        >>> folder = tempfile.mkdtemp() + "/lake"
        >>> write_deltalake(folder, pa.table({"aggregate_type": ["Account"],
        ...     "aggregate_id": ["a"], "event_type": ["Opened"], "version": [1], "data": ["{}"],
        ...     "recorded_at": [datetime(2024, 1, 1, tzinfo=UTC)]}),
        ...     partition_by=["aggregate_type"])
        >>> lake = esw.attach(folder)
        >>> lake.format, lake.sql("select aggregate_type, metadata from events").fetchall()
        ('delta', [('Account', '{}')])
    """
    text = os.fspath(source)
    path = Path(text).resolve()
    if format is None and (path / "store.json").is_file() and (path / "events").is_dir():
        path = path / "events"  # an esworkbench store: its events table
    if format is None:
        format = "delta" if (path / "_delta_log").is_dir() else "parquet"
    if format not in ("delta", "parquet"):
        raise StoreError(f"unknown lake format {format!r}. Hint: use 'delta' or 'parquet'")
    if format == "delta" and not (path / "_delta_log").is_dir():
        raise StoreError(
            f"{path} is not a Delta table: it has no _delta_log. Hint: leave format= out to read "
            "Parquet files"
        )
    if not path.exists() and not any(ch in text for ch in "*?["):
        raise StoreError(f"{text} does not exist. Hint: check the path")
    zone = zone_of(tz)
    return AttachedLake(path, text, format, columns, zone)
