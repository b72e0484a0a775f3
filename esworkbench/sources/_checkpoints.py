"""Checkpoints of imports, and the check that the rows an import read are still in its source.

``<store>/imports.json`` holds one entry per source (by its key): the last imported position,
the event_id the source held there, and a digest of every row read up to it (see
:mod:`esworkbench.sources._digest`). Before an import reads past its checkpoint, the rows up to it
are hashed again and compared with the digest (:class:`Prefix`): a change anywhere up to the
checkpoint stops the import with :class:`SourceRewrittenError`, before anything is staged.

The entry is written just before the import's commit, keeping the one it replaces under
``"before"``: the commit may happen or not, and the next import takes the entry whose position is
the store's (Delta's transaction version, committed with the events, is the authority). Entries
of earlier versions have no digest: the event_id at the checkpoint is compared, as they did, and
the rows up to it are hashed as they are now for the next import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.errors import EsWorkbenchError
from esworkbench.sources._digest import (
    HASH_VERSION,
    MAX_MARKS,
    ROW_HASH,
    Digest,
    Mark,
    Tally,
    row_hashes,
)

if TYPE_CHECKING:
    from esworkbench.store import Store

__all__ = ["Checkpoint", "Prefix", "Reader", "SourceRewrittenError", "load", "save"]

ROWS_SCHEME = f"rows-{HASH_VERSION}/2"
"""The scheme of digests the importer makes itself, of the rows a reader yields. A change to what
the file readers yield for the same file must change it: digests of another scheme are not
compared (the event_id at the checkpoint is, as for a checkpoint without digest)."""
_CHECKPOINTS = "imports.json"
# The columns of a source row that its hash covers: all but ``error``, which is replaced by
# whether the row was bad (its reason is wording, not content).
_HASHED = (
    "source_position",
    "event_id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "version",
    "recorded_at",
    "occurred_at",
    "schema_version",
    "data",
    "metadata",
    "correlation_id",
    "causation_id",
    "user_id",
)


class SourceRewrittenError(EsWorkbenchError):
    """Rows a source held at positions already imported have changed since.

    Attributes:
        source: the source's key.
        first: the lowest position where the first change may be.
        last: the highest (the same as ``first`` when the change is pinned to one position).

    Examples:
        >>> err = SourceRewrittenError("changed", source="file:/x.jsonl", first=3, last=3)
        >>> isinstance(err, EsWorkbenchError), err.first
        (True, 3)
    """

    def __init__(self, message: str, *, source: str, first: int, last: int) -> None:
        super().__init__(message)
        self.source = source
        self.first = first
        self.last = last


class Reader(Protocol):
    """A source of events, read in order of source position."""

    @property
    def key(self) -> str:
        """Names the source for incremental imports (the same source, the same key)."""
        ...

    @property
    def scheme(self) -> str | None:
        """How the source hashes its rows itself, or None when it does not: the importer then
        reads it from its start on every import and hashes the rows it yields."""
        ...

    def batches(self, *, after: int, batch_size: int) -> Iterator[pa.Table]:
        """Source rows with ``source_position > after``, in order, as Arrow tables; when the
        source hashes its rows, with their hashes in a column ``_esw_row_hash``."""
        ...

    def event_at(self, position: int) -> str | None:
        """The event_id the source holds at a position now (None if there is none)."""
        ...

    def digest(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        """For each position, how many rows the source holds up to it and the sum of their
        hashes (mod 2**64), as its batches give them. Only asked when ``scheme`` is not None."""
        ...


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where an import of a source ended, what the source held there, and the digest up to it.

    Examples:
        >>> Checkpoint.from_json({"position": 4, "event_id": None})
        Checkpoint(position=4, event_id=None, digest=None)
    """

    position: int
    event_id: str | None
    digest: Digest | None

    def to_json(self) -> dict[str, object]:
        """The entry as ``imports.json`` keeps it."""
        body: dict[str, object] = {"position": self.position, "event_id": self.event_id}
        if self.digest is not None:
            body["digest"] = self.digest.to_json()
        return body

    @staticmethod
    def from_json(body: object) -> Checkpoint | None:
        """The entry :meth:`to_json` (or an earlier version) wrote; None for anything else."""
        if not isinstance(body, Mapping):
            return None
        try:
            position = int(str(body["position"]))
        except (KeyError, ValueError):
            return None
        event_id = body.get("event_id")
        return Checkpoint(
            position,
            None if event_id is None else str(event_id),
            Digest.from_json(body.get("digest")),
        )


def _entries(store: Store) -> dict[str, Any]:
    path = store.path / _CHECKPOINTS
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EsWorkbenchError(f"{path} cannot be read: {exc}. Hint: delete it") from exc
    return body if isinstance(body, dict) else {}


def load(store: Store, app_id: str, position: int) -> Checkpoint | None:
    """The checkpoint of ``app_id`` at the store's ``position``; else the latest one before it
    (an import that committed without writing its entry: an earlier version, a lost file)."""
    entry = _entries(store).get(app_id)
    found = [Checkpoint.from_json(entry)]
    if isinstance(entry, Mapping):
        found.append(Checkpoint.from_json(entry.get("before")))
    usable = [c for c in found if c is not None and c.position <= position]
    return max(usable, key=lambda c: c.position, default=None)


def save(store: Store, app_id: str, checkpoint: Checkpoint, before: Checkpoint | None) -> None:
    """Writes the checkpoint of ``app_id``, keeping ``before`` beside it (see the module)."""
    body = _entries(store)
    entry = checkpoint.to_json()
    if before is not None and before.position != checkpoint.position:
        entry["before"] = before.to_json()
    body[app_id] = entry
    lines = (
        f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}"
        for key, value in body.items()
    )
    temporary = store.path / f".{_CHECKPOINTS}.tmp"
    with temporary.open("w", encoding="utf-8") as file:
        file.write("{\n" + ",\n".join(lines) + "\n}\n")  # one line a source
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(store.path / _CHECKPOINTS)


class Prefix:
    """The rows of a source up to its checkpoint (``after``): checked before an import goes past
    them, and counted on with every row the import reads, for the next import's check.

    A source that hashes its rows itself (a database) is checked at once, by :meth:`start`, in
    one query; the import then reads past the checkpoint. Any other is read from its start
    (:meth:`start` returns 0) and checked as the rows pass through :meth:`take`, which gives back
    only those past the checkpoint, once the rows up to it have been found as they were.
    """

    def __init__(self, store: Store, app_id: str, reader: Reader, after: int) -> None:
        self._store = store
        self._app_id = app_id
        self._reader = reader
        self.after = after
        self.saved = load(store, app_id, after)
        self._scheme = reader.scheme or ROWS_SCHEME
        digest = self.saved.digest if self.saved is not None else None
        self._digest = digest if digest is not None and digest.scheme == self._scheme else None
        self._before: list[Mark] = []  # marks up to ``after``, for a source that hashes its rows
        self._tally = Tally()
        self._checked = False
        self._hasher: duckdb.DuckDBPyConnection | None = None
        self._event_now: str | None = None  # at the saved position, for an entry without digest
        self.changed = self._digest is None or self._digest.position < after  # an entry to write

    def start(self) -> int:
        """Checks what can be checked before reading; returns the position to read after.

        Raises:
            SourceRewrittenError: the source no longer holds the rows imported.
        """
        saved = self.saved
        if self._reader.scheme is None:
            self._hasher = duckdb.connect()
            known = self._digest.marks if self._digest else ()
            self._tally = Tally(wanted=[mark.position for mark in known])
            return 0
        if saved is not None and self._digest is None and saved.event_id is not None:
            self._check_event(self._reader.event_at(saved.position))
        if self.after == 0:
            self._checked = True
            return 0
        marks = list(self._digest.marks) if self._digest else []
        start = marks[-1].position if marks else 0
        # Up to the checkpoint, rows no digest covers yet: counted now, as they are.
        unknown = np.linspace(start, self.after, min(MAX_MARKS, self.after - start) + 1)
        fresh = sorted({int(p) for p in unknown[1:]})
        positions = [mark.position for mark in marks] + fresh
        found = dict(zip(positions, self._reader.digest(positions), strict=True))
        self._compare(marks, found)
        self._checked = True
        self._before = marks + [Mark(p, *found[p]) for p in fresh]
        rows, total = found[self.after]
        self._tally = Tally(rows=rows, total=total)
        return self.after

    def take(self, batch: pa.Table) -> pa.Table:
        """Counts a batch; gives back its rows past the checkpoint (see the class).

        Raises:
            SourceRewrittenError: the rows up to the checkpoint are not those imported.
        """
        positions = np.asarray(batch["source_position"].to_numpy(), np.int64)
        if self._hasher is None:
            self._tally.add(positions, batch[ROW_HASH].to_numpy().astype(np.uint64))
            return batch.drop_columns([ROW_HASH])
        rows = batch.select(_HASHED).append_column("bad", pc.is_valid(batch["error"]))
        self._tally.add(positions, row_hashes(rows, self._hasher))
        watched = self.saved.position if self.saved is not None else None
        if watched is not None and len(positions) and positions[0] <= watched <= positions[-1]:
            self._event_now = self._event_in(batch, watched)
        if not self._checked and self._tally.counted_past(self.after):
            self._verify()
        past = int(np.searchsorted(positions, self.after, side="right"))
        return batch if past == 0 else batch.slice(past)

    def finish(self) -> None:
        """The end of the source: checks the rows up to the checkpoint if they were not yet.

        Raises:
            SourceRewrittenError: the source ended before the rows imported, or they changed.
        """
        self._tally.close()
        if not self._checked:
            self._verify()

    def close(self) -> None:
        """Lets go of what the check holds (however the import ended)."""
        if self._hasher is not None:
            self._hasher.close()

    def remember(self, last: int, event_id: str | None) -> None:
        """Writes the checkpoint at ``last``, with the digest of every row up to it."""
        if last == self.after and self.saved is not None and self.saved.position == last:
            event_id = self.saved.event_id  # nothing read past it: the event there is known
        marks = self._tally.marks(self._before)
        digest = Digest(self._scheme, tuple(marks)) if marks else None
        save(self._store, self._app_id, Checkpoint(last, event_id, digest), self.saved)

    # -- comparing -------------------------------------------------------------------------

    def _verify(self) -> None:
        """For a source read from its start: once every row up to the checkpoint was counted."""
        self._checked = True
        saved = self.saved
        if self._digest is not None:
            self._compare(list(self._digest.marks), self._tally.found)
        elif saved is not None and saved.event_id is not None:
            self._check_event(self._event_now)

    @staticmethod
    def _event_in(batch: pa.Table, position: int) -> str | None:
        at = batch.filter(pc.equal(batch["source_position"], position))["event_id"]
        value = at[0].as_py() if len(at) else None
        return None if value is None else str(value)

    def _check_event(self, now: str | None) -> None:
        saved = self.saved
        assert saved is not None
        if now == saved.event_id:
            return
        key, position = self._reader.key, saved.position
        raise SourceRewrittenError(
            f"source {key} has rewritten its history: position {position} held event "
            f"{saved.event_id} when it was imported, and now holds {now}. Nothing was imported. "
            "Hint: import the rewritten source into a new store, or compare the two histories",
            source=key,
            first=position,
            last=position,
        )

    def _compare(self, marks: Sequence[Mark], found: Mapping[int, tuple[int, int]]) -> None:
        previous = Mark(0, 0, 0)
        for mark in marks:
            rows, total = found[mark.position]
            if (rows, total) != (mark.rows, mark.total):
                raise _rewritten(self._reader.key, previous, mark, rows - previous.rows)
            previous = mark


def _rewritten(key: str, previous: Mark, mark: Mark, now: int) -> SourceRewrittenError:
    """The error for the first mark whose rows differ: the change lies after ``previous``."""
    first, last = previous.position + 1, mark.position
    then = mark.rows - previous.rows
    where = f"position {last}" if first == last else f"positions {first} to {last}"
    return SourceRewrittenError(
        f"source {key} has rewritten its history at {where}: what it holds there is not what was "
        f"imported ({_count(then)} when imported, {_count(now)} now). Nothing was imported. "
        "Hint: import the rewritten source into a new store, or compare the two histories",
        source=key,
        first=first,
        last=last,
    )


def _count(rows: int) -> str:
    return f"{rows:,} row{'' if rows == 1 else 's'}"
