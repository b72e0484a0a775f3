"""Snapshots: states cached at versions, so a replay folds only the tail after the nearest one.

The snapshots table is a Delta table at ``<store>/snapshots`` (:data:`SNAPSHOT_SCHEMA`), created
on the first write. Every write is one Delta commit under the store's writer lock, of Parquet
files flushed to disk before the commit names them, as for events. A snapshot is keyed by
``fold_key``, the aggregate's :attr:`~esworkbench.Aggregate.identity` (a digest of the fold's code,
options and upcasters), so a changed fold or upcaster never meets a stale snapshot: it simply
finds none. States are stored as exact JSON (:mod:`esworkbench._statejson`).

``esw.replay(..., snapshots=True)`` loads the nearest snapshot at or before the target and folds
the rest. For ``at=T`` the snapshot must lie within the events recorded by T: its version is at
most the last version of the unbroken run 1, 2, ... of events recorded by T. Bitemporal questions
(``valid_at``) never use snapshots, since they leave out events in the middle of a stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench._advice import snapshot_advice
from esworkbench._snapshot_table import (
    Writer,
    bind_view,
    commit,
    compact,
    query,
    table_path,
    writable,
)
from esworkbench._statejson import SNAPSHOT_SCHEMA, StateError, loads_state
from esworkbench.aggregates import Aggregate, plain_number
from esworkbench.engine import SELECT_COLUMNS, Cursor, Folder, Source, _whole_streams, decode_events
from esworkbench.errors import EsWorkbenchError
from esworkbench.sources._urls import redact, split_table
from esworkbench.store import Store

__all__ = [
    "SNAPSHOT_SCHEMA",
    "SnapshotImport",
    "StateError",
    "bind_view",
    "compact_snapshots",
    "import_snapshots",
    "resume",
    "snapshot",
    "snapshot_advice",
]

# -- taking snapshots --------------------------------------------------------------------------


def _positive(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EsWorkbenchError(f"{name}={value!r} must be a positive integer. Hint: {name}=100")
    return value


def snapshot(
    store: Store,
    aggregate: Aggregate,
    aggregate_id: str | None = None,
    *,
    every: int | None = None,
    version: int | None = None,
    batch_size: int = 32_768,
) -> int:
    """Takes snapshots of one stream, or of every stream of the aggregate's type; one commit.

    Args:
        store: the store.
        aggregate: the fold; snapshots are keyed by its ``identity``.
        aggregate_id: one stream; ``None`` for every stream of ``aggregate.name``, folded from
            sorted batches (memory stays bounded).
        every: store the states at versions ``every``, ``2 * every``, ...; by default only the
            state at the head (or at ``version``).
        version: the last version to fold (a stream shorter than it: its head).
        batch_size: events read at a time when folding every stream.

    Returns:
        How many snapshots were stored (states already stored for this fold are not repeated).

    Raises:
        StateError: when a state cannot be stored exactly (names the stream and version).
        FoldError: when the fold raises.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5})] * 5,
        ...                  aggregate_type="Account")
        >>> account = esw.Aggregate("Account", fields={"total": esw.sum("amount")})
        >>> esw.snapshot(store, account, every=2), esw.snapshot(store, account, "acc-1")
        (2, 1)
        >>> store.sql("select version, state from snapshots order by version").fetchall()
        [(2, '{"total":10}'), (4, '{"total":20}'), (5, '{"total":25}')]
    """
    target = writable(store, "snapshot")
    every = _positive(every, "every")
    version = _positive(version, "version")
    key = aggregate.identity
    taken = {
        (row[0], row[1])
        for row in query(
            target,
            "SELECT aggregate_id, version FROM snapshots WHERE aggregate_type = ? AND "
            "fold_key = ? AND (? IS NULL OR aggregate_id = ?)",
            [aggregate.name, key, aggregate_id, aggregate_id],
        )
    }
    writer = Writer(target, key, aggregate)
    folder = Folder(aggregate)
    try:
        for chunk in _chunks(target, aggregate, aggregate_id, version, batch_size):
            _fold_capturing(folder, chunk, writer, every, taken)
        actions = writer.close()
        commit(target, actions)
    except BaseException:
        writer.abort()
        raise
    return writer.count


def _chunks(
    store: Store, aggregate: Aggregate, aggregate_id: str | None, version: int | None, size: int
) -> Iterator[pa.Table | pa.RecordBatch]:
    if aggregate_id is not None:
        from esworkbench.temporal import read_events

        if version is not None:  # a stream shorter than version: its head
            version = min(version, store.stream_version(aggregate_id))
        yield read_events(cast("Source", store), aggregate, aggregate_id, version=version)
        return
    query = (
        f"SELECT {SELECT_COLUMNS} FROM events WHERE aggregate_type = ? AND version <= ? "
        "ORDER BY aggregate_id, version"
    )
    limit = version if version is not None else 2**62
    yield from _whole_streams(store.sql(query, [aggregate.name, limit]).to_arrow_reader(size))


def _fold_capturing(
    folder: Folder,
    chunk: pa.Table | pa.RecordBatch,
    writer: Writer,
    every: int | None,
    taken: set[tuple[str, int]],
) -> None:
    """Folds whole streams sorted by (aggregate_id, version), keeping the states asked for."""
    events = decode_events(chunk, folder.aggregate)
    declared = bool(folder.pieces)
    cursor: Cursor | None = None
    for i, event in enumerate(events):
        if cursor is None or events[i - 1].aggregate_id != event.aggregate_id:
            cursor = folder.start()
        folder.apply(cursor, event)
        last = i + 1 == len(events) or events[i + 1].aggregate_id != event.aggregate_id
        wanted = event.version % every == 0 if every is not None else last
        if wanted and (event.aggregate_id, event.version) not in taken:
            accumulators = list(cursor.acc) if declared else None
            writer.add(event.aggregate_id, event.version, cursor.state, accumulators)


# -- loading them --------------------------------------------------------------------------------


def resume(
    source: Source, aggregate: Aggregate, table: pa.Table, folder: Folder
) -> tuple[Cursor | None, pa.Table]:
    """The nearest usable snapshot for the rows a replay would fold, and the rows after it.

    ``table`` is one stream's chosen events in version order. A snapshot at version s is usable
    when versions 1..s are all among them and its fold_key is the aggregate's identity. Returns
    (None, table) when there is none.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> from esworkbench.engine import Folder
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> resume(store, esw.generic("A"), store.read_stream("x"), Folder(esw.generic("A")))[0]
    """
    if not isinstance(source, Store) or table.num_rows == 0:
        return None, table
    if not (table_path(source) / "_delta_log").exists():
        return None, table
    versions = table["version"].to_numpy()
    gaps = np.flatnonzero(versions != np.arange(1, len(versions) + 1))
    prefix = int(gaps[0]) if len(gaps) else len(versions)
    if prefix == 0:
        return None, table
    aggregate_id = table["aggregate_id"][0].as_py()
    found = query(
        source,
        "SELECT version, state, accumulators FROM snapshots WHERE aggregate_type = ? AND "
        "aggregate_id = ? AND fold_key = ? AND version <= ? ORDER BY version DESC LIMIT 1",
        [aggregate.name, aggregate_id, aggregate.identity, prefix],
    )
    if not found:
        return None, table
    at, text, accumulators = found[0]
    state = loads_state(text, decimals=aggregate.decimals)
    if accumulators is not None:
        acc = list(loads_state(accumulators, decimals=True))
    else:
        acc = _accumulators(folder, state)
    return Cursor(state, acc), table.slice(int(at))


def _accumulators(folder: Folder, state: Any) -> list[Any]:
    """Declared fields' running values read back from a state (for adopted imported snapshots)."""
    from decimal import Decimal

    acc: list[Any] = []
    for name, piece, _ in folder.pieces:
        value = state.get(name, piece.initial()) if isinstance(state, dict) else piece.initial()
        if piece.kind in ("min", "max") and plain_number(value):
            exact = Decimal(repr(value)) if isinstance(value, float) else value
            value = (exact, value)
        elif piece.kind == "sum" and isinstance(value, float):
            value = Decimal(repr(value))
        acc.append(value)
    return acc


def compact_snapshots(
    store: Store, *, keep: Iterable[Aggregate | str] | None = None
) -> tuple[int, int]:
    """Rewrites the snapshots table as one sorted file; with ``keep``, drops other folds' ones.

    Snapshots are caches: each call of :func:`snapshot` adds a file, and a changed fold leaves
    its old snapshots behind, never used again. ``keep`` lists the folds (or fold_keys) whose
    snapshots stay; without it every snapshot stays. Repeated states (the same stream, version
    and fold_key) are kept once. One commit, under the store's writer lock.

    Returns:
        (kept, dropped): how many snapshots the table holds afterwards, and how many left it.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> from esworkbench.snapshots import compact_snapshots
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5})] * 4,
        ...                  aggregate_type="Account")
        >>> old = esw.Aggregate("Account", fields={"n": esw.count()})
        >>> new = esw.Aggregate("Account", fields={"n": esw.count(), "total": esw.sum("amount")})
        >>> esw.snapshot(store, old, every=1), esw.snapshot(store, new, "acc-1")
        (4, 1)
        >>> compact_snapshots(store, keep=[new])
        (1, 4)
    """
    target = writable(store, "compact the snapshots of")
    keys = None
    if keep is not None:
        keys = [k.identity if isinstance(k, Aggregate) else str(k) for k in keep]
    return compact(target, keys)


# -- importing them -----------------------------------------------------------------------------

ImportFormat = Literal["common", "eventsourcing"]


def _origin(source: str, format: str, table: str | None) -> str:
    """Names a source for a fold_key, without any password in it."""
    return f"import:{format}:{redact(source)}" + (f"#{table}" if table else "")


@dataclass(frozen=True, slots=True)
class SnapshotImport:
    """What :func:`import_snapshots` stored, and under which fold_key.

    Examples:
        >>> SnapshotImport(imported=2, skipped=0, fold_key="import:common:x").imported
        2
    """

    imported: int
    skipped: int
    fold_key: str


def _source_batches(
    source: str | os.PathLike[str], format: ImportFormat, table: str | None, batch_size: int
) -> Iterator[pa.Table]:
    if format == "common":
        from esworkbench.sources._sql import require_postgres

        require_postgres()
        from esworkbench.sources.postgres import read_postgres_snapshots

        schema, name = split_table(table)
        return read_postgres_snapshots(
            os.fspath(source), table=name or "snapshots", schema=schema, batch_size=batch_size
        )
    if format == "eventsourcing":
        from esworkbench.sources._recorders import find_app
        from esworkbench.sources.eventsourcing import read_eventsourcing_snapshots

        schema, name = split_table(table)
        schema, app = find_app(os.fspath(source), name, schema)
        return read_eventsourcing_snapshots(source, app=app, schema=schema, batch_size=batch_size)
    raise EsWorkbenchError(
        f"unknown snapshot format {format!r}. Hint: use 'common' (a PostgreSQL snapshots "
        "table) or 'eventsourcing' (the library's stored_snapshots or <app>_snapshots)"
    )


def import_snapshots(
    store: Store,
    source: str | os.PathLike[str],
    *,
    format: ImportFormat = "common",
    fold_key: str | None = None,
    table: str | None = None,
    aggregate_type: str | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    batch_size: int = 100_000,
) -> SnapshotImport:
    """Imports another system's snapshots into the store's snapshots table, in one commit.

    Their fold is not ours, so by default they get the fold_key ``import:<format>:<source>``
    (without any password), and no replay uses them. To adopt them for a fold whose state
    has the same shape, import them with ``fold_key=aggregate.identity`` (you vouch that the
    fold gives those states), or give the aggregate ``key=`` the imported fold_key.

    Args:
        store: the store.
        source: ``format="common"``: a PostgreSQL URL whose ``snapshots(aggregate_id,
            version, data, timestamp)`` table is read; ``"eventsourcing"``: the library's
            database (``sqlite:///path.db`` or a PostgreSQL URL).
        format: ``"common"`` or ``"eventsourcing"``.
        fold_key: the key the snapshots are stored under (see above).
        table: the snapshots table (common), or the application name (eventsourcing).
        aggregate_type: for rows that do not name one (the common table has no column for it):
            by default the type of the stream with that aggregate_id in the store.
        on_error: ``"fail"`` stops at the first unreadable row, storing nothing; ``"skip"``
            leaves such rows out and counts them.
        batch_size: rows read at a time.

    Examples:
        >>> import json, sqlite3, tempfile, esworkbench as esw
        >>> folder = tempfile.mkdtemp()
        >>> db = sqlite3.connect(f"{folder}/bank.db")  # as the eventsourcing library writes it
        >>> _ = db.execute("CREATE TABLE stored_snapshots (originator_id TEXT, "
        ...                "originator_version INTEGER, topic TEXT, state BLOB)")
        >>> state = {"topic": "bank:Account", "state": {"balance": {
        ...     "_type_": "decimal_str", "_data_": "10.10"}}, "timestamp": {
        ...     "_type_": "datetime_iso", "_data_": "2024-03-01T12:00:00+00:00"}}
        >>> _ = db.execute("INSERT INTO stored_snapshots VALUES (?, 2, ?, ?)", (
        ...     "0f8fad5bd9cb469fa16570867728950e", "eventsourcing.domain:Snapshot",
        ...     json.dumps(state).encode()))
        >>> db.commit()
        >>> store = esw.open_store(f"{folder}/store")
        >>> result = esw.import_snapshots(store, f"sqlite:///{folder}/bank.db",
        ...                               format="eventsourcing")
        >>> result.imported, result.fold_key.startswith("import:eventsourcing:sqlite:///")
        (1, True)
        >>> store.sql("select aggregate_type, aggregate_id, version, state "
        ...           "from snapshots").fetchall()
        [('Account', '0f8fad5b-d9cb-469f-a165-70867728950e', 2, '{"balance":10.10}')]
    """
    target = writable(store, "import snapshots into")
    if on_error not in ("fail", "skip"):
        raise EsWorkbenchError(f"on_error={on_error!r} is not one of 'fail', 'skip'")
    key = fold_key or _origin(os.fspath(source), format, table)
    batches = _source_batches(source, format, table, batch_size)
    writer = Writer(target, key)
    skipped = 0
    try:
        for batch in batches:
            good, bad = _checked_import(target, batch, aggregate_type)
            if bad and on_error == "fail":
                raise EsWorkbenchError(
                    f"snapshot {bad[0]} of {os.fspath(source)!r} cannot be imported. Hint: fix "
                    "the row, or pass on_error='skip' to leave such rows out"
                )
            skipped += len(bad)
            taken = _taken(target, key, good)
            if taken:
                pairs = pa.array([f"{a}\x00{v}" for a, v in taken])
                mine = pc.binary_join_element_wise(
                    good["aggregate_id"], pc.cast(good["version"], pa.string()), "\x00"
                )
                good = good.filter(pc.invert(pc.is_in(mine, pairs)))
            writer.add_table(
                good.append_column("fold_key", pa.array([key] * good.num_rows, pa.string()))
                .append_column("accumulators", pa.nulls(good.num_rows, pa.string()))
                .select(SNAPSHOT_SCHEMA.names)
            )
        commit(target, writer.close())
    except BaseException:
        writer.abort()
        raise
    return SnapshotImport(writer.count, skipped, key)


def _taken(store: Store, key: str, rows: pa.Table) -> list[tuple[str, int]]:
    if rows.num_rows == 0:
        return []
    return [
        (row[0], row[1])
        for row in query(
            store,
            "SELECT aggregate_id, version FROM snapshots WHERE fold_key = ? AND "
            "aggregate_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
            [key, pc.unique(rows["aggregate_id"]).to_pylist()],
        )
    ]


def _checked_import(
    store: Store, batch: pa.Table, aggregate_type: str | None
) -> tuple[pa.Table, list[str]]:
    """The readable rows (aggregate_type filled in) and a description of each unreadable one."""
    if aggregate_type is not None:
        types = pc.fill_null(batch["aggregate_type"], aggregate_type)
        batch = batch.set_column(0, "aggregate_type", types)
    missing = pc.unique(batch.filter(pc.is_null(batch["aggregate_type"]))["aggregate_id"])
    if len(missing):
        found = dict(
            store.sql(
                "SELECT DISTINCT aggregate_id, aggregate_type FROM events "
                "WHERE aggregate_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
                [missing.to_pylist()],
            ).fetchall()
        )
        ids = batch["aggregate_id"].to_pylist()
        looked_up = pa.array([found.get(a) for a in ids], pa.string())
        types = pc.coalesce(batch["aggregate_type"], looked_up)
        batch = batch.set_column(0, "aggregate_type", types)
    reasons = pc.if_else(
        pc.is_valid(batch["error"]),
        batch["error"],
        pc.if_else(
            pc.is_null(batch["aggregate_type"]),
            "field 'aggregate_type': no stream with this aggregate_id in the store; pass "
            "aggregate_type=",
            pc.if_else(
                pc.match_substring(pc.fill_null(batch["state"], ""), '"$esw"'),
                "field 'state': holds the key \"$esw\", which snapshots reserve",
                pa.scalar(None, pa.string()),
            ),
        ),
    )
    bad = batch.filter(pc.is_valid(reasons))
    described = [
        f"{row['aggregate_id']!r} version {row['version']}: {reason}"
        for row, reason in zip(
            bad.select(["aggregate_id", "version"]).to_pylist(),
            reasons.filter(pc.is_valid(reasons)).to_pylist(),
            strict=True,
        )
    ]
    good = batch.filter(pc.is_null(reasons)).select(
        ["aggregate_type", "aggregate_id", "version", "state", "taken_at"]
    )
    return good, described
