"""The import driver: bring a source's events into a store exactly, all or nothing, incrementally.

A reader yields batches of source rows (the canonical columns, ``source_position`` and ``error``).
The driver holds the store's lock for the whole import, checks and places each batch against what
is stored plus what this import has staged so far, writes each batch's files, and commits them all
at the end in one Delta transaction together with the source's checkpoint (Delta's application
transaction id). So an import that fails or dies leaves nothing visible, and a re-run reads only
past the last committed source position, once it has found the rows up to it as they were when
they were read (see ``sources._checkpoints``). What the import remembers of every event and stream
it has placed spills past a few megabytes to a folder in the store (``.import-*``), removed when
the import ends (or by the next import, after a crash), so memory does not grow with the source.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import AddAction
from tqdm.auto import tqdm

from esworkbench.errors import (
    ConcurrencyError,
    DuplicateEventError,
    EsWorkbenchError,
    InvalidEventError,
)
from esworkbench.events import EVENT_SCHEMA
from esworkbench.sources import _ids, _streams
from esworkbench.sources._checkpoints import Prefix, Reader, SourceRewrittenError
from esworkbench.sources._settled import Unsettled
from esworkbench.store import Store

__all__ = ["ImportResult", "OnError", "Reader", "SourceRewrittenError", "run_import"]

OnError = Literal["fail", "quarantine"]
_APP_PREFIX = "esworkbench-import:"
_SPILL_PREFIX = ".import-"
_REQUIRED = ("event_type", "aggregate_type", "aggregate_id", "data")


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did. ``imported + quarantined`` is every source row it read.

    ``unsettled_after`` is a source position when the rows past it were left for the next run:
    a database source had a gap there that a transaction still running may fill.

    Examples:
        >>> print(ImportResult("x.jsonl", imported=3, quarantined=1, last_position=4,
        ...                    quarantine_path="q.jsonl"))
        Imported 3 events from x.jsonl; 1 bad row quarantined in q.jsonl
        >>> left = ImportResult("db", imported=2, quarantined=0, last_position=7,
        ...                     unsettled_after=7)
        >>> str(left).endswith("rows past source position 7 were left for the next run, "
        ...                    "as a transaction that may still write before them is in progress")
        True
    """

    source: str
    imported: int
    quarantined: int
    last_position: int | None
    quarantine_path: str | None = None
    unsettled_after: int | None = None

    def __str__(self) -> str:
        def count(n: int, noun: str) -> str:
            return f"{n:,} {noun}{'' if n == 1 else 's'}"

        text = f"Imported {count(self.imported, 'event')} from {self.source}"
        if self.quarantined:
            text += f"; {count(self.quarantined, 'bad row')} quarantined in {self.quarantine_path}"
        if self.unsettled_after is not None:
            text += (
                f"; rows past source position {self.unsettled_after} were left for the next "
                "run, as a transaction that may still write before them is in progress"
            )
        return text


class _Quarantine:
    """Bad rows, each with its source position and reason, as JSON Lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file: IO[str] | None = None

    def write(self, rows: pa.Table, reasons: list[str]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        for row, reason in zip(rows.to_pylist(), reasons, strict=True):
            row.pop("error", None)
            line = {"source_position": row.pop("source_position"), "reason": reason, "row": row}
            self._file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self.count += rows.num_rows

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class _Stager:
    """Writes placed batches as staged files in a worker thread, one batch at a time, while the
    next batch is read and checked (sorting and Parquet encoding leave the GIL)."""

    def __init__(self, store: Store) -> None:
        self.done: list[AddAction] = []
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esw-stage")
        self._pending: Future[list[AddAction]] | None = None

    def submit(self, placed: pa.Table) -> None:
        """Stages a batch once the one before it is written (so at most one is held)."""
        self.wait()
        self._pending = self._pool.submit(self._store._stage, placed)

    def wait(self) -> list[AddAction]:
        """Every file staged so far, once the batch being written is written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.done += pending.result()
        return self.done

    def paths(self) -> list[str]:
        """The staged files, as absolute paths."""
        return [str(self._store.table_path / a.path) for a in self.wait()]

    def close(self) -> None:
        """Lets the worker thread go."""
        self._pool.shutdown(wait=True)

    def discard(self) -> None:
        """Removes every staged file (after a failure): none was committed."""
        with contextlib.suppress(BaseException):
            self.wait()
        self._pool.shutdown(wait=True)
        for action in self.done:
            with contextlib.suppress(OSError):
                (self._store.table_path / action.path).unlink()


def _split_errors(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    errors = batch["error"]
    if errors.null_count == len(errors):  # the usual case: no copy of the batch
        return batch, batch.slice(0, 0)
    bad = pc.is_valid(errors)
    return batch.filter(pc.invert(bad)), batch.filter(bad)


def _incomplete(rows: pa.Table) -> tuple[pa.Table, pa.Table, list[str]]:
    """A last guard behind the readers, which check every field: rows that lack a field the
    store requires. Cheap whole-column tests; the readers' checks are the authority."""
    missing: Any = None
    reasons: list[Any] = []
    for name in _REQUIRED:
        column = rows[name]
        absent = pc.is_null(column)
        if pa.types.is_string(column.type):
            absent = pc.or_kleene(absent, pc.equal(column, ""))
        reasons.append((name, "is missing or empty", absent))
    for name in ("version", "schema_version"):
        reasons.append((name, "must be >= 1", pc.fill_null(pc.less(rows[name], 1), False)))
    for _, _, absent in reasons:
        missing = absent if missing is None else pc.or_(missing, absent)
    if not pc.any(missing).as_py():
        return rows, rows.slice(0, 0), []
    at = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    why = ["; ".join(f"field {n!r}: {r}" for n, r, a in reasons if a[int(i)].as_py()) for i in at]
    return rows.filter(pc.invert(missing)), rows.take(pa.array(at)), why


def _canonical(rows: pa.Table) -> pa.Table:
    """Checked source rows as events: a new event_id and the time of the import where the
    source has none (the readers have promoted ids and defaulted the rest)."""
    ids = rows["event_id"]
    if ids.null_count:
        fresh = pa.array([str(uuid.uuid4()) for _ in range(ids.null_count)], pa.string())
        ids = pc.replace_with_mask(ids.combine_chunks(), pc.is_null(ids).combine_chunks(), fresh)
        rows = rows.set_column(rows.schema.get_field_index("event_id"), "event_id", ids)
    recorded = rows["recorded_at"]
    if recorded.null_count:
        now = pa.scalar(datetime.now(UTC), recorded.type)
        recorded = pc.fill_null(recorded, now)
        occurred = pc.coalesce(rows["occurred_at"], recorded)
        rows = rows.set_column(rows.schema.get_field_index("recorded_at"), "recorded_at", recorded)
        rows = rows.set_column(rows.schema.get_field_index("occurred_at"), "occurred_at", occurred)
    return rows


def run_import(
    store: Store,
    reader: Reader,
    *,
    on_error: OnError = "fail",
    batch_size: int = 100_000,
    quarantine: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Imports every source row past the last checkpoint; see the module docstring.

    Raises:
        InvalidEventError: with ``on_error="fail"``, at the first bad row, naming its source
            position, field and reason; nothing of the import is committed.
        SourceRewrittenError: a row at or before the last imported position changed, went or
            came since it was imported (see ``sources._checkpoints``); nothing is imported.
    """
    if on_error not in ("fail", "quarantine"):
        raise EsWorkbenchError(
            f"on_error must be 'fail' or 'quarantine', got {on_error!r}. Hint: choose one"
        )
    app_id = _APP_PREFIX + reader.key
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    default = store.path / "quarantine" / f"{_safe(reader.key)}-{stamp}.jsonl"
    quarantined = _Quarantine(Path(quarantine) if quarantine else default)
    with store._locked():
        store._bind()
        after = store.app_version(app_id) or 0
        prefix = Prefix(store, app_id, reader, after)
        read_after = prefix.start()  # the rows up to ``after`` are checked before any is staged
        stager = _Stager(store)
        progress: Any = None
        imported, last = 0, after
        last_event_id: str | None = None
        head = store.head_position()
        spill = _spill_folder(store)
        continuity = _streams.Continuity(store._session, stored=head > 0, spill=spill / "streams")
        ids = _ids.EventIds(
            store._session,
            stored=head > 0,
            staged=stager.paths,
            spill=spill / "event_ids",
        )
        try:
            progress = tqdm(
                desc=f"import {reader.key}", unit="event", unit_scale=True, disable=None
            )
            batches = _Batches(reader.batches(after=read_after, batch_size=batch_size))
            for batch in batches:
                batch = prefix.take(batch)  # its rows past the checkpoint
                progress.update(batch.num_rows)
                if batch.num_rows == 0:
                    continue
                last = int(pc.max(batch["source_position"]).as_py())
                at_last = batch.filter(pc.equal(batch["source_position"], last))["event_id"]
                last_event_id = at_last[0].as_py() if len(at_last) else None
                good, bad = _split_errors(batch)
                good, refused, reasons = _incomplete(good)
                good, repeated, repeats = ids.screen(good)
                duplicates = bad.num_rows + refused.num_rows
                reasons = bad["error"].to_pylist() + reasons + repeats
                bad = pa.concat_tables([bad, refused, repeated])
                verdict = continuity.judge(good, bad)
                good = verdict.good
                if on_error == "fail" and (bad.num_rows or verdict.refused.num_rows):
                    raise _first_error(reader.key, bad, reasons, verdict, duplicates)
                if bad.num_rows or verdict.refused.num_rows:
                    quarantined.write(
                        pa.concat_tables([bad, verdict.refused]), reasons + verdict.reasons
                    )
                if good.num_rows == 0:
                    continue
                placed = _placed(_canonical(good), head)
                stager.submit(placed)
                head += placed.num_rows
                imported += placed.num_rows
            prefix.finish()
            staged = stager.wait()
            if last > after or (prefix.changed and last):
                prefix.remember(last, last_event_id)  # before the commit: see _checkpoints
            if last > after:
                store._commit_actions(staged, app=(app_id, last))
        except BaseException:
            stager.discard()
            raise
        finally:
            stager.close()
            prefix.close()
            shutil.rmtree(spill, ignore_errors=True)
            if progress is not None:
                progress.close()
            quarantined.close()
    return ImportResult(
        reader.key,
        imported=imported,
        quarantined=quarantined.count,
        last_position=last if last else None,
        quarantine_path=str(quarantined.path) if quarantined.count else None,
        unsettled_after=batches.unsettled_after,
    )


class _Batches:
    """A reader's batches, keeping what its generator returns: an ``Unsettled`` when it left
    rows past a gap that a running transaction may fill (see ``sources._settled``)."""

    def __init__(self, batches: Iterator[pa.Table]) -> None:
        self._batches = batches
        self.unsettled_after: int | None = None

    def __iter__(self) -> Iterator[pa.Table]:
        # The PostgreSQL readers are generators that return what they left (None: nothing).
        left = yield from cast("Generator[pa.Table, None, object]", self._batches)
        if isinstance(left, Unsettled):
            self.unsettled_after = left.position


def _placed(events: pa.Table, head_position: int) -> pa.Table:
    """Gives a batch whose versions continue their streams the next positions, in its order."""
    first = head_position + 1
    positions = pa.array(np.arange(first, first + events.num_rows, dtype=np.int64))
    return events.append_column("position", positions).select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def _first_error(
    key: str, bad: pa.Table, reasons: list[str], verdict: _streams.Verdict, duplicates: int
) -> EsWorkbenchError:
    """The error of a failing import: the refused row with the lowest source position.

    ``bad`` holds rows with a bad field, then (from row ``duplicates`` on) rows whose event_id
    repeats one; ``verdict.refused`` the rows that cannot continue their streams.
    """
    positions = bad["source_position"].to_pylist() + verdict.refused["source_position"].to_pylist()
    reasons = reasons + verdict.reasons
    heads: list[int | None] = [None] * bad.num_rows
    heads += verdict.heads
    at = min(range(len(positions)), key=positions.__getitem__)
    message = (
        f"source {key}, position {positions[at]}: {reasons[at]}. Nothing of this import was "
        "committed. Hint: fix the row in the source, or import with on_error='quarantine'"
    )
    head = heads[at]
    if head is not None:
        row = verdict.refused.slice(at - bad.num_rows, 1).to_pylist()[0]
        return ConcurrencyError(
            message,
            aggregate_id=str(row["aggregate_id"]),
            expected=int(row["version"]) - 1,
            actual=head,
        )
    if duplicates <= at < bad.num_rows:
        return DuplicateEventError(message, event_id=str(bad["event_id"][at].as_py()))
    return InvalidEventError(message, index=positions[at])


def _spill_folder(store: Store) -> Path:
    """A fresh folder for what the import remembers past a few megabytes (see ``_runs``).

    Under the store's lock no other import runs, so folders left by an import that died are
    removed here.
    """
    for stale in store.path.glob(_SPILL_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=_SPILL_PREFIX, dir=store.path))
    for name in ("streams", "event_ids"):
        (folder / name).mkdir()
    return folder


def _safe(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)[-80:]
