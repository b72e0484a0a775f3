"""Sources: bring event histories into a store exactly, and take them out again.

``import_events`` reads a file, a PostgreSQL table in the common schema, the eventsourcing
library's recorder tables, or Marten's ``mt_events``, and commits the events in one transaction
with the source's checkpoint, so re-running it brings only what is new. The exporters write a
store's events as JSON Lines, Parquet or CSV.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources import _sql
from esworkbench.sources._urls import redact, split_table
from esworkbench.sources.export import export_csv, export_jsonl, export_parquet
from esworkbench.sources.imports import ImportResult, OnError, SourceRewrittenError, run_import
from esworkbench.store import Store

__all__ = [
    "Format",
    "ImportResult",
    "SourceRewrittenError",
    "export_csv",
    "export_jsonl",
    "export_parquet",
    "import_events",
]

Format = Literal["common", "eventsourcing", "marten"]
_DATABASE = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class _Reader:
    """A source as the import driver sees it: a key, batches past a position, an id lookup,
    and for a database, how it hashes its rows and their sums up to positions (see
    ``sources._checkpoints.Reader``)."""

    key: str
    read: Callable[[int, int], Iterator[pa.Table]]
    lookup: Callable[[int], str | None]
    scheme: str | None = None
    sums: Callable[[Sequence[int]], list[tuple[int, int]]] | None = None

    def batches(self, *, after: int, batch_size: int) -> Iterator[pa.Table]:
        return self.read(after, batch_size)

    def event_at(self, position: int) -> str | None:
        return self.lookup(position)

    def digest(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        if self.sums is None:
            raise EsWorkbenchError(f"source {self.key} keeps no hashes of its rows")
        return self.sums(positions)


@dataclass(frozen=True)
class _FileSource:
    """A file read from the start each time; rows up to ``after`` are passed over."""

    path: Path
    reader: Callable[..., Iterator[pa.Table]]
    options: dict[str, Any] = field(default_factory=dict)

    def read(self, after: int, batch_size: int) -> Iterator[pa.Table]:
        for batch in self.reader(self.path, batch_size=batch_size, **self.options):
            if batch.num_rows and pc.max(batch["source_position"]).as_py() <= after:
                continue
            yield batch.filter(pc.greater(batch["source_position"], after))

    def lookup(self, position: int) -> str | None:
        for batch in self.reader(self.path, **self.options):
            found = batch.filter(pc.equal(batch["source_position"], position))
            if found.num_rows:
                value = found["event_id"][0].as_py()
                return None if value is None else str(value)
        return None


def _file_reader(path: Path, columns: Mapping[str, str] | None, tz: str | None) -> _Reader:
    from esworkbench.sources import files

    if not path.is_file():
        raise EsWorkbenchError(
            f"the source {path} is not a file. Hint: pass a JSON Lines, JSON, CSV, Parquet or "
            "Arrow file, a postgresql:// URL or a sqlite:/// URL"
        )
    suffixes = [s.lower() for s in path.suffixes]
    options: dict[str, Any] = {"tz": tz}
    reader: Callable[..., Iterator[pa.Table]]
    if ".csv" in suffixes:
        reader, options["columns"] = files.read_csv, columns
    elif {".parquet", ".arrow", ".feather", ".ipc"} & set(suffixes):
        reader, options["columns"] = files.read_table, columns
    else:
        reader = files.read_json
    source = _FileSource(path, reader, options)
    return _Reader(f"file:{path.resolve()}", source.read, source.lookup)


def _database_reader(
    source: str,
    format: Format,
    table: str | None,
    columns: Mapping[str, str] | None,
    default_aggregate_type: str | None,
) -> _Reader:
    from esworkbench.sources import _digest_sql

    if not source.startswith("sqlite:///"):
        _sql.require_postgres()
    shown = redact(source)  # the key is remembered in the store: never a password in it
    schema, name = split_table(table)
    if format == "common":
        from esworkbench.sources.postgres import postgres_digest, postgres_event_at, read_postgres

        name = name or "events"
        where: dict[str, Any] = {"table": name, "schema": schema, "columns": columns}
        return _Reader(
            f"postgres:{shown}#{table or name}",
            lambda after, size: read_postgres(
                source, after=after, batch_size=size, row_hashes=True, **where
            ),
            lambda position: postgres_event_at(source, position, **where),
            _digest_sql.SCHEME,
            lambda positions: postgres_digest(source, positions, **where),
        )
    if format == "eventsourcing":
        from esworkbench.sources import _recorder_hashes
        from esworkbench.sources._recorders import find_app
        from esworkbench.sources.eventsourcing import (
            eventsourcing_digest,
            eventsourcing_event_at,
            read_eventsourcing,
        )

        schema, app = find_app(source, name, schema)
        return _Reader(
            f"eventsourcing:{shown}#{schema + '.' if schema else ''}{app}",
            lambda after, size: read_eventsourcing(
                source, app=app, schema=schema, after=after, batch_size=size, row_hashes=True
            ),
            lambda position: eventsourcing_event_at(source, position, app=app, schema=schema),
            _recorder_hashes.SCHEME,
            lambda positions: eventsourcing_digest(source, positions, app=app, schema=schema),
        )
    from esworkbench.sources.marten import marten_digest, marten_event_at, read_marten

    marten_schema = table or "public"
    return _Reader(
        f"marten:{shown}#{marten_schema}",
        lambda after, size: read_marten(
            source,
            schema=marten_schema,
            after=after,
            batch_size=size,
            default_aggregate_type=default_aggregate_type,
            row_hashes=True,
        ),
        lambda position: marten_event_at(source, position, schema=marten_schema),
        _digest_sql.SCHEME,
        lambda positions: marten_digest(source, positions, schema=marten_schema),
    )


def _check_writable(store: object) -> None:
    """Refuses an attached lake (read-only) or anything else that is not a store."""
    if isinstance(store, Store):
        return
    from esworkbench.attach import AttachedLake

    if isinstance(store, AttachedLake):
        store._refuse("import into")
    raise EsWorkbenchError(
        f"import_events writes to a store, not to {type(store).__name__}. Hint: pass "
        "esw.open_store(path)"
    )


def import_events(
    store: Store,
    source: str | os.PathLike[str],
    *,
    format: Format = "common",
    on_error: OnError = "fail",
    table: str | None = None,
    columns: Mapping[str, str] | None = None,
    tz: str | None = None,
    batch_size: int = 100_000,
    quarantine: str | os.PathLike[str] | None = None,
    default_aggregate_type: str | None = None,
) -> ImportResult:
    """Imports a source's events into the store, exactly and incrementally.

    Args:
        store: the store to import into.
        source: a file (JSON Lines, JSON array, CSV, Parquet, Arrow; plain, gzip or zstd), a
            ``postgresql://`` URL, or a ``sqlite:///path.db`` URL (the eventsourcing library).
        format: ``"common"`` (the common event shape or an ``events`` table),
            ``"eventsourcing"`` (the library's recorder tables) or ``"marten"`` (``mt_events``).
        on_error: ``"fail"`` stops at the first bad row and commits nothing; ``"quarantine"``
            writes bad rows with their reasons to a JSON Lines file and imports the rest.
        table: the events table (common), the application name (eventsourcing: its tables are
            ``<name>_events`` and ``<name>_snapshots``; found on its own when the database holds
            one application) or the schema (marten). ``"schema.name"`` names a schema for the
            first two.
        columns: for files and tables, canonical column name -> the source's column name.
        tz: IANA zone for naive timestamps; without it they are bad rows.
        batch_size: rows read and checked at a time (memory stays bounded by it).
        quarantine: where bad rows go (default: ``<store>/quarantine/<source>-<time>.jsonl``).
        default_aggregate_type: marten: the aggregate_type of streams that Marten stored
            without a type (started without one).

    Returns:
        :class:`ImportResult` with ``imported``, ``quarantined`` and ``last_position``.

    Raises:
        SourceRewrittenError: a row at or before the last imported position changed, went or
            came since it was read (its ``first`` and ``last`` bracket the first change);
            nothing is imported.

    Examples:
        >>> import json, tempfile, pathlib, esworkbench as esw
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> source = folder / "events.jsonl"
        >>> _ = source.write_text(json.dumps({"eventType": "AccountOpened", "aggregateId": "a",
        ...     "aggregateType": "Account", "version": 1, "data": {"owner": "Ann"},
        ...     "timestamp": "2024-01-01T00:00:00Z"}) + "\\n")
        >>> result = esw.import_events(esw.open_store(folder / "store"), source)
        >>> (result.imported, result.quarantined, result.last_position)
        (1, 0, 1)
    """
    _check_writable(store)
    if format not in ("common", "eventsourcing", "marten"):
        raise EsWorkbenchError(
            f"unknown format {format!r}. Hint: use 'common', 'eventsourcing' or 'marten'"
        )
    text = os.fspath(source)
    if text.startswith(_DATABASE):
        reader = _database_reader(text, format, table, columns, default_aggregate_type)
    elif text.startswith("sqlite:///"):
        if format == "marten":
            raise EsWorkbenchError(
                f"format 'marten' reads PostgreSQL, but {text} is a SQLite file. Hint: pass the "
                "postgresql:// URL of Marten's database"
            )
        # The one SQLite history esworkbench reads is the eventsourcing library's recorder.
        reader = _database_reader(text, "eventsourcing", table, columns, None)
    elif format != "common":
        raise EsWorkbenchError(
            f"format {format!r} reads a database, but {text} is not a postgresql:// or "
            "sqlite:/// URL. Hint: pass the database URL, or format='common' for a file"
        )
    else:
        reader = _file_reader(Path(text), columns, tz)
    return run_import(
        store, reader, on_error=on_error, batch_size=batch_size, quarantine=quarantine
    )
