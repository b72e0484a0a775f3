"""The event store: a directory holding a Delta Lake table of events, written atomically.

Writers on one machine are serialised by a lock file; the check against a stream's head and the
commit happen under it. A commit writes sorted Parquet files, flushes them, and then adds them to
the Delta log in one transaction, so a writer that dies mid-append leaves only unreferenced files
that no reader ever sees.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction, RemoveAction

from esworkbench import _checks, _layout, _marker, _writes
from esworkbench._index import RowGroupIndex
from esworkbench._keys import FileKeys, KeyedSession, KeyIndex
from esworkbench.errors import (
    ConcurrencyError,
    CorruptStoreError,
    InvalidEventError,
    StoreError,
)
from esworkbench.events import EVENT_SCHEMA, TIMESTAMP
from esworkbench.query import FILES, Params, Session

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "ExpectedVersion",
    "Store",
    "open_store",
]


class ExpectedVersion(Enum):
    """Markers for ``expected_version`` besides an exact version number."""

    ANY = "any"
    STREAM_EXISTS = "stream_exists"

    def __repr__(self) -> str:
        return f"esworkbench.{self.name}"


ANY: Final = ExpectedVersion.ANY
"""Append whatever the stream's head is."""
STREAM_EXISTS: Final = ExpectedVersion.STREAM_EXISTS
"""Append only to a stream that already has events."""
NO_STREAM: Final = 0
"""Append only to a stream that has no events yet (the same as ``expected_version=0``)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What a batch append committed.

    Examples:
        >>> AppendResult(events=2, streams=1, first_position=1, last_position=2).events
        2
    """

    events: int
    streams: int
    first_position: int | None
    last_position: int | None


class Store:
    """An event store in a directory. Use :func:`open_store` to get one.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp() + "/bank")
        >>> store.append("acc-1", [{"event_type": "AccountOpened", "data": {"owner": "Ann"}}],
        ...              aggregate_type="Account", expected_version=0)
        1
        >>> store.read_stream("acc-1").column("event_type").to_pylist()
        ['AccountOpened']
    """

    def __init__(self, path: Path, settings: dict[str, int]) -> None:
        self.path = path
        self.settings = settings
        self.table_path = path / "events"
        self._thread_lock = threading.RLock()
        try:
            self._table = DeltaTable(str(self.table_path))
        except (DeltaError, OSError) as exc:
            raise CorruptStoreError(
                f"the events table of store {path} cannot be read: {exc}. "
                "Hint: the store's events/_delta_log is damaged; restore it from a backup"
            ) from exc
        # Event keys and stream heads for batch appends, built on the first batch.
        self._keys = KeyIndex(self.table_path)
        self._session: Session = KeyedSession(self._keys)
        from esworkbench import _snapshot_table  # imports this module: here, not at the top

        _snapshot_table.watch(self)  # the snapshots view lists its own table when queried
        self._index = RowGroupIndex()
        self._loaded_version = -1
        self._bound_version = -1
        self._files = pa.table({})
        # Stream heads known at version _heads_at of the log: saves a lookup per single append.
        self._heads: dict[str, tuple[int, str]] = {}
        self._heads_at = -1
        self.refresh()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- reading -------------------------------------------------------------------------

    def refresh(self) -> int:
        """Moves to the newest commit of the Delta log; returns its version."""
        with self._thread_lock:
            version: int = self._table.version()
            upcoming = self.table_path / "_delta_log" / f"{version + 1:020d}.json"
            if version == self._loaded_version and not upcoming.exists():
                return version
            try:
                self._table.update_incremental()
            except (DeltaError, OSError) as exc:
                raise CorruptStoreError(
                    f"the Delta log of store {self.path} cannot be read: {exc}. "
                    "Hint: restore events/_delta_log from a backup"
                ) from exc
            version = self._table.version()
            self._files = pa.table(self._table.get_add_actions(flatten=True))
            self._loaded_version = version
            if version != self._heads_at:
                self._heads.clear()
            return version

    @property
    def files(self) -> pa.Table:
        """The data files of the newest commit, from the Delta log (path, size_bytes, stats).

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> esw.open_store(tempfile.mkdtemp()).files.num_rows
            0
        """
        self.refresh()
        return self._files

    def _bind(self) -> None:
        """Points the SQL views at the files of the loaded version (only when SQL needs it)."""
        if self._bound_version != self._loaded_version:
            self._session.bind(self._absolute(self._files["path"].to_pylist()))
            self._bound_version = self._loaded_version

    def _absolute(self, relative: list[str]) -> list[str]:
        # Paths in the Delta log are URI-encoded; the files on disk are not.
        return [str(self.table_path / unquote(p)) for p in relative]

    def _files_for(self, aggregate_id: str) -> list[str]:
        """Files whose aggregate_id range (from the log's stats) can hold the stream."""
        files = self._files
        if files.num_rows == 0:
            return []
        if "min.aggregate_id" not in files.column_names:
            return self._absolute(files["path"].to_pylist())
        lo, hi = files["min.aggregate_id"], files["max.aggregate_id"]
        inside = pc.and_(pc.less_equal(lo, aggregate_id), pc.greater_equal(hi, aggregate_id))
        keep = pc.or_kleene(inside, pc.or_(pc.is_null(lo), pc.is_null(hi)))
        return self._absolute(files.filter(keep)["path"].to_pylist())

    def sql(self, query: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        """Runs SQL over the views ``events`` and ``streams``; values go in ``params``.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> store.sql("select count(*) from events where aggregate_type = ?",
            ...           ["Account"]).fetchall()
            [(0,)]
        """
        with self._thread_lock:
            self.refresh()
            self._bind()
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
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> store.read_stream("nobody").num_rows
            0
        """
        _checks.check_bound(until, "until")
        self.refresh()
        files = self._files_for(aggregate_id)
        if not files:
            return EVENT_SCHEMA.empty_table()
        table = self._index.read(files, aggregate_id, EVENT_SCHEMA.names)
        if table.num_rows == 0:
            return EVENT_SCHEMA.empty_table()
        keep = pc.greater_equal(table["version"], from_version)
        if to_version is not None:
            keep = pc.and_(keep, pc.less_equal(table["version"], to_version))
        if until is not None:
            keep = pc.and_(keep, pc.less_equal(table["recorded_at"], pa.scalar(until, TIMESTAMP)))
        rows = table.filter(keep)
        return rows.take(pc.sort_indices(rows["version"])).cast(EVENT_SCHEMA)

    def read_all(
        self, *, from_position: int = 0, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Yields every event with ``position > from_position`` in position order, in batches.

        Memory stays bounded: the store is read one window of positions at a time.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> sum(b.num_rows for b in store.read_all())
            0
        """
        self.refresh()
        files = self._absolute(self._files["path"].to_pylist())
        if not files:
            return
        last = self.head_position()
        window = max(batch_size * 8, 262_144)
        low = from_position
        while low < last:
            high = low + window
            reader = self._session.connection.sql(
                f"SELECT * FROM {FILES} WHERE position > ? AND position <= ? ORDER BY position",
                params=[files, low, high],
            ).to_arrow_reader(batch_size)
            for batch in reader:
                yield batch.cast(EVENT_SCHEMA)
            low = high

    def head_position(self) -> int:
        """The highest position in the store (0 when it is empty), read from the Delta log."""
        files = self._files
        if files.num_rows == 0:
            return 0
        if "max.position" not in files.column_names:
            self._bind()
            return int(self._session.execute("SELECT coalesce(max(position), 0) FROM events")[0][0])
        return int(pc.max(files["max.position"]).as_py() or 0)

    def stream_version(self, aggregate_id: str) -> int:
        """The stream's current version (0 when it has no events).

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> esw.open_store(tempfile.mkdtemp()).stream_version("acc-1")
            0
        """
        with self._thread_lock:
            version = self.refresh()
            head, kind = self._head(aggregate_id)
            if kind is not None:
                self._remember_head(aggregate_id, head, kind, version)
            return head

    def _remember_head(self, aggregate_id: str, head: int, kind: str, version: int) -> None:
        """Caches a stream's head as of a log version; any other version empties the cache."""
        if version != self._heads_at or len(self._heads) > 100_000:
            self._heads.clear()
            self._heads_at = version
        self._heads[aggregate_id] = (head, kind)

    def _head(self, aggregate_id: str) -> tuple[int, str | None]:
        known = self._heads.get(aggregate_id)
        if known is not None:
            return known
        files = self._files_for(aggregate_id)
        if not files:
            return 0, None
        rows = self._index.read(files, aggregate_id, ["aggregate_id", "version", "aggregate_type"])
        if rows.num_rows == 0:
            return 0, None
        last = pc.index(rows["version"], pc.max(rows["version"])).as_py()
        return int(rows["version"][last].as_py()), str(rows["aggregate_type"][last].as_py())

    # -- writing -------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialises writers: threads by a lock, processes by flock on the store's lock file."""
        with self._thread_lock, (self.path / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self.refresh()
                self._keys.follow(self._files)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(
        self,
        aggregate_id: str,
        events: Iterable[object],
        *,
        aggregate_type: str | None = None,
        expected_version: int | ExpectedVersion = ANY,
        tz: str | None = None,
    ) -> int:
        """Appends events to one stream, all or none, and returns the stream's new version.

        Args:
            aggregate_id: the stream.
            events: dicts (camelCase or snake_case) or :class:`~esworkbench.NewEvent` values.
            aggregate_type: the stream's type; may be left out when the stream exists.
            expected_version: the version the stream must be at (0: no events yet),
                :data:`STREAM_EXISTS` or :data:`ANY`.
            tz: IANA zone for naive datetimes in the events; without it they are refused.

        Raises:
            ConcurrencyError: the stream is not at ``expected_version``.
            DuplicateEventError: an event_id is already stored elsewhere.
            InvalidEventError: an event is malformed (names the event and field).

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> opened = {"eventType": "AccountOpened", "data": {"owner": "Ann"}}
            >>> store.append("acc-1", [opened], aggregate_type="Account", expected_version=0)
            1
            >>> store.append("acc-1", [{"event_type": "AccountClosed", "data": {}}],
            ...              expected_version=esw.STREAM_EXISTS)
            2
        """
        _checks.check_expected(aggregate_id, expected_version)
        with self._locked():
            head, stored_type = self._head(aggregate_id)
            kind = aggregate_type or stored_type
            if kind is None:
                raise InvalidEventError(
                    f"stream {aggregate_id!r} is new, so its aggregate_type must be given. "
                    "Hint: pass aggregate_type='Account' (or the type of your aggregate)",
                    field="aggregate_type",
                )
            table, supplied = _checks.canonical_batch(
                events, self._session, tz=tz, aggregate_id=aggregate_id, aggregate_type=kind
            )
            if table.num_rows == 0:
                _check_head(aggregate_id, expected_version, head)
                return head
            if supplied:
                self._bind()
                if (stored := _writes.find_stored(self._session, table)) is not None:
                    return stored[2]
            if stored_type is not None and kind != stored_type:
                raise InvalidEventError(
                    f"stream {aggregate_id!r} is of aggregate_type {stored_type!r}, not "
                    f"{kind!r}. Hint: a stream keeps one aggregate_type",
                    field="aggregate_type",
                )
            _check_head(aggregate_id, expected_version, head)
            before = self._loaded_version
            self._commit(_writes.place_stream(table, head, self.head_position()))
            if self._loaded_version == before + 1:  # no other writer in between
                self._remember_head(aggregate_id, head + table.num_rows, kind, self._loaded_version)
            return head + int(table.num_rows)

    def append_batch(
        self, events: pa.Table | Iterable[object], *, tz: str | None = None
    ) -> AppendResult:
        """Appends events of many streams in one commit: the fast path for imports.

        Each event names its aggregate_id and aggregate_type. Versions, when given, must
        continue each stream's head with no gap; when absent they are assigned. An Arrow
        table in :data:`~esworkbench.events.EVENT_SCHEMA` (position ignored) is checked
        column-wise, without a Python loop over rows.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> store.append_batch([
            ...     {"aggregateId": "a", "aggregateType": "Account", "eventType": "AccountOpened",
            ...      "data": {}},
            ...     {"aggregateId": "b", "aggregateType": "Account", "eventType": "AccountOpened",
            ...      "data": {}},
            ... ]).events
            2
        """
        table, supplied = _checks.canonical_batch(events, self._session, tz=tz)
        if table.num_rows == 0:
            return AppendResult(0, 0, None, None)
        with self._locked():
            if supplied and (stored := _writes.find_stored(self._session, table)) is not None:
                return AppendResult(table.num_rows, _streams(table), stored[0], stored[1])
            placed = _writes.place(self._session, table, self.head_position())
            self._commit(placed)
            positions = placed["position"]
            return AppendResult(
                placed.num_rows,
                _streams(placed),
                pc.min(positions).as_py(),
                pc.max(positions).as_py(),
            )

    def _stage(self, table: pa.Table) -> list[AddAction]:
        """Writes a placed batch as durable files, one per aggregate_type, not yet committed."""
        row_group_size = self.settings["row_group_size"]
        parts = _layout.partitions(table)

        def write(part: tuple[str, pa.Table]) -> AddAction:
            kind, rows = part
            action = _layout.write_file(
                self.table_path, kind, rows, row_group_size=row_group_size, presorted=True
            )
            if self._keys.built:  # else a build reads the file, and appends skip the work
                self._keys.stage(action.path, FileKeys.of(rows, presorted=True))
            return action

        if len(parts) == 1:
            return [write(parts[0])]
        # Arrow sorts and Parquet encodes outside the GIL: one file per core at a time.
        with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
            return list(pool.map(write, parts))

    def _commit(self, table: pa.Table) -> None:
        self._commit_actions(self._stage(table))

    def _commit_actions(
        self, added: list[AddAction], *, app: tuple[str, int] | None = None
    ) -> None:
        """Commits staged files in one Delta transaction, with an optional app checkpoint.

        ``app`` is (application id, version): Delta's transaction identifier, committed
        atomically with the files, which importers use as their checkpoint.
        """
        actions: list[AddAction | RemoveAction] = list(added)
        properties = None
        if app is not None:
            properties = CommitProperties(
                app_transactions=[Transaction(app[0], app[1], int(time.time() * 1000))]
            )
        try:
            self._table.create_write_transaction(
                actions,
                "append",
                EVENT_SCHEMA,
                partition_by=[_layout.PARTITION_COLUMN],
                commit_properties=properties,
            )
        except (DeltaError, OSError) as exc:
            raise StoreError(
                f"the commit to store {self.path} failed: {exc}. Hint: nothing of this append "
                "is visible; retry it"
            ) from exc
        self.refresh()
        _fsync_commit(self.table_path, self._table.version())
        self._keys.follow(self._files, background=True)  # catches up while the caller goes on

    def app_version(self, app_id: str) -> int | None:
        """The last checkpoint an application (such as an importer) committed, if any.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> esw.open_store(tempfile.mkdtemp()).app_version("import:x") is None
            True
        """
        self.refresh()
        version = self._table.transaction_version(app_id)
        return None if version is None else int(version)

    def compact(self) -> int:
        """Rewrites each partition's files as few files sorted by (aggregate_id, version).

        Readers see the same events before, during and after. Returns the number of files
        that were merged.

        Examples:
            >>> import tempfile, esworkbench as esw
            >>> store = esw.open_store(tempfile.mkdtemp())
            >>> store.compact()
            0
        """
        from esworkbench import _compaction

        with self._locked():
            return _compaction.compact(self, self._table, self._files, self._session)

    def close(self) -> None:
        """Closes the DuckDB session."""
        self._session.close()


def _streams(table: pa.Table) -> int:
    return int(pc.count_distinct(table["aggregate_id"]).as_py())


def _fsync_commit(table_path: Path, version: int) -> None:
    log = table_path / "_delta_log"
    for target in (log / f"{version:020d}.json", log):
        if target.exists():
            _layout.fsync(target)


def _check_head(aggregate_id: str, expected: int | ExpectedVersion, head: int) -> None:
    if expected is ANY:
        return
    if expected is STREAM_EXISTS:
        if head == 0:
            raise ConcurrencyError(
                f"stream {aggregate_id!r} was expected to exist but has no events. "
                "Hint: use expected_version=0 to start a new stream",
                aggregate_id=aggregate_id,
                expected=expected,
                actual=head,
            )
        return
    if head != expected:
        raise ConcurrencyError(
            f"stream {aggregate_id!r} is at version {head}, but the append expected version "
            f"{expected}. Hint: read the stream again, decide again, and retry",
            aggregate_id=aggregate_id,
            expected=expected,
            actual=head,
        )


def open_store(path: str | os.PathLike[str], *, create: bool = True) -> Store:
    """Opens the store at ``path``, creating it if the directory is missing or empty.

    Raises:
        StoreError: the directory holds something that is not a store, or a store written by a
            newer format version.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> esw.open_store(tempfile.mkdtemp() + "/new").stream_version("x")
        0
    """
    root = Path(path).absolute()
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a store. Hint: pass a directory")
    marker = root / _marker.MARKER
    if not marker.exists():
        if not create:
            raise StoreError(f"{root} is not an esworkbench store. Hint: run esw init {root}")
        _marker.create(root, EVENT_SCHEMA)
    settings = _marker.read(marker)
    return Store(root, settings)
