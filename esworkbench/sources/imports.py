"""The import driver: bring a source's events into a store exactly, all or nothing, incrementally.

A reader yields batches of source rows (the canonical columns, ``source_position`` and ``error``).
The driver holds the store's lock for the whole import, checks and places each batch against what
is stored plus what this import has staged so far, writes each batch's files, and commits them all
at the end in one Delta transaction together with the source's checkpoint (Delta's application
transaction id). So an import that fails or dies leaves nothing visible, and a re-run reads only
past the last committed source position.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import AddAction
from tqdm.auto import tqdm

from esworkbench import _checks, _writes
from esworkbench.errors import ConcurrencyError, EsWorkbenchError, InvalidEventError
from esworkbench.events import EVENT_SCHEMA
from esworkbench.sources import _streams
from esworkbench.store import Store

__all__ = ["ImportResult", "OnError", "Reader", "SourceRewrittenError", "run_import"]

OnError = Literal["fail", "quarantine"]
_APP_PREFIX = "esworkbench-import:"
_CHECKPOINTS = "imports.json"


class SourceRewrittenError(EsWorkbenchError):
    """A source position imported earlier now holds a different event.

    Examples:
        >>> issubclass(SourceRewrittenError, EsWorkbenchError)
        True
    """


class Reader(Protocol):
    """A source of events, read in order of source position."""

    @property
    def key(self) -> str:
        """Names the source for incremental imports (the same source, the same key)."""
        ...

    def batches(self, *, after: int, batch_size: int) -> Iterator[pa.Table]:
        """Source rows with ``source_position > after``, in order, as Arrow tables."""
        ...

    def event_at(self, position: int) -> str | None:
        """The event_id the source holds at a position now (None if there is none)."""
        ...


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import did. ``imported + quarantined`` is every source row it read.

    Examples:
        >>> print(ImportResult("x.jsonl", imported=3, quarantined=1, last_position=4,
        ...                    quarantine_path="q.jsonl"))
        Imported 3 events from x.jsonl; 1 bad row quarantined in q.jsonl
    """

    source: str
    imported: int
    quarantined: int
    last_position: int | None
    quarantine_path: str | None = None

    def __str__(self) -> str:
        def count(n: int, noun: str) -> str:
            return f"{n:,} {noun}{'' if n == 1 else 's'}"

        text = f"Imported {count(self.imported, 'event')} from {self.source}"
        if self.quarantined:
            text += f"; {count(self.quarantined, 'bad row')} quarantined in {self.quarantine_path}"
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


def _split_errors(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    bad = pc.is_valid(batch["error"])
    return batch.filter(pc.invert(bad)), batch.filter(bad)


def _checked(store: Store, rows: pa.Table, tz: str | None) -> tuple[pa.Table, pa.Table, list[str]]:
    """Splits reader-good rows into store-good rows and rows the store's checks refuse."""
    events = rows.drop_columns(["source_position", "error"])
    bad = _checks.bad_rows(store._session, events, tz=tz)
    if bad.num_rows == 0:
        return rows, rows.slice(0, 0), []
    mask = pc.is_in(pa.array(range(rows.num_rows)), bad["_row"])
    reasons = [
        f"field {f!r} {r}"
        for f, r in zip(bad["field"].to_pylist(), bad["reason"].to_pylist(), strict=True)
    ]
    return rows.filter(pc.invert(mask)), rows.filter(mask), reasons


def run_import(
    store: Store,
    reader: Reader,
    *,
    on_error: OnError = "fail",
    batch_size: int = 100_000,
    tz: str | None = None,
    quarantine: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Imports every source row past the last checkpoint; see the module docstring.

    Raises:
        InvalidEventError: with ``on_error="fail"``, at the first bad row, naming its source
            position, field and reason; nothing of the import is committed.
        SourceRewrittenError: a position imported before now holds another event.
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
        _check_not_rewritten(store, reader, app_id)
        staged: list[AddAction] = []
        continuity = _streams.Continuity(store._session)
        progress: Any = None
        imported, last = 0, after
        last_event_id: str | None = None
        head = store.head_position()
        try:
            progress = tqdm(
                desc=f"import {reader.key}", unit="event", unit_scale=True, disable=None
            )
            for batch in reader.batches(after=after, batch_size=batch_size):
                progress.update(batch.num_rows)
                if batch.num_rows == 0:
                    continue
                last = int(pc.max(batch["source_position"]).as_py())
                at_last = batch.filter(pc.equal(batch["source_position"], last))["event_id"]
                last_event_id = at_last[0].as_py() if len(at_last) else None
                good, bad = _split_errors(batch)
                good, refused, reasons = _checked(store, good, tz)
                reasons = bad["error"].to_pylist() + reasons
                bad = pa.concat_tables([bad, refused])
                verdict = continuity.judge(good, bad)
                good = verdict.good
                if on_error == "fail" and (bad.num_rows or verdict.refused.num_rows):
                    raise _first_error(reader.key, bad, reasons, verdict)
                if bad.num_rows or verdict.refused.num_rows:
                    quarantined.write(
                        pa.concat_tables([bad, verdict.refused]), reasons + verdict.reasons
                    )
                if good.num_rows == 0:
                    continue
                events, _ = _checks.canonical_batch(
                    good.drop_columns(["source_position", "error"]),
                    store._session,
                    tz=tz,
                    checked=True,
                )
                paths = [str(store.table_path / a.path) for a in staged]
                _writes.find_stored(store._session, events, paths)
                placed = _placed(events, head)
                staged += store._stage(placed)
                head += placed.num_rows
                imported += placed.num_rows
            if last > after:
                store._commit_actions(staged, app=(app_id, last))
        except BaseException:
            for action in staged:
                with contextlib.suppress(OSError):
                    (store.table_path / action.path).unlink()
            raise
        finally:
            continuity.close()
            if progress is not None:
                progress.close()
            quarantined.close()
        if last > after:
            _remember(store, app_id, last, last_event_id)
    return ImportResult(
        reader.key,
        imported=imported,
        quarantined=quarantined.count,
        last_position=last if last else None,
        quarantine_path=str(quarantined.path) if quarantined.count else None,
    )


def _placed(events: pa.Table, head_position: int) -> pa.Table:
    """Gives a batch whose versions continue their streams the next positions, in its order."""
    first = head_position + 1
    positions = pa.array(np.arange(first, first + events.num_rows, dtype=np.int64))
    return events.append_column("position", positions).select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)


def _first_error(
    key: str, bad: pa.Table, reasons: list[str], verdict: _streams.Verdict
) -> InvalidEventError | ConcurrencyError:
    """The error of a failing import: the refused row with the lowest source position."""
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
    return InvalidEventError(message, index=positions[at])


def _safe(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)[-80:]


def _check_not_rewritten(store: Store, reader: Reader, app_id: str) -> None:
    known = _checkpoints(store).get(app_id)
    if not known:
        return
    position, event_id = int(str(known["position"])), known.get("event_id")
    if event_id is None:
        return
    now = reader.event_at(position)
    if now != event_id:
        raise SourceRewrittenError(
            f"source {reader.key} has rewritten its history: position {position} held event "
            f"{event_id} when it was imported, and now holds {now}. Nothing was imported. "
            "Hint: import the rewritten source into a new store, or compare the two histories"
        )


def _checkpoints(store: Store) -> dict[str, dict[str, object]]:
    path = store.path / _CHECKPOINTS
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EsWorkbenchError(f"{path} cannot be read: {exc}. Hint: delete it") from exc
    return body if isinstance(body, dict) else {}


def _remember(store: Store, app_id: str, position: int, event_id: str | None) -> None:
    """Keeps the event_id at the checkpoint, to notice a rewritten source next time."""
    body = _checkpoints(store)
    body[app_id] = {"position": position, "event_id": event_id}
    temporary = store.path / f".{_CHECKPOINTS}.tmp"
    temporary.write_text(json.dumps(body, indent=2) + "\n")
    temporary.replace(store.path / _CHECKPOINTS)
