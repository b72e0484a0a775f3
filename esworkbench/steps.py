"""Step traces for debugging a fold: each event of a stream with the state before and after it.

The trace runs the real fold one event at a time through :class:`~esworkbench.engine.Folder`,
times each step, and goes on past an event the fold fails on: that step records the error, and
the state stays as it was before the failing event. Upcasting runs inside the step too, so an
upcaster that raises on one event is that step's error, not the end of the trace.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, overload

from esworkbench.aggregates import Aggregate, FoldError
from esworkbench.diffs import changes, html_table, show
from esworkbench.engine import Event, Folder, Source, decode_events
from esworkbench.errors import EsWorkbenchError
from esworkbench.temporal import Output, read_events
from esworkbench.upcasting import UpcastError

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

__all__ = ["Step", "Steps", "steps"]


@dataclass(frozen=True)
class Step:
    """One event of a trace: the state before and after it, what changed, the time, any error.

    ``changes`` maps each changed field to (old, new); ``changed`` lists their names.
    :func:`steps` makes them.
    ``after`` is ``before`` when the fold failed on the event; ``error`` then says why
    (``exception`` holds the :class:`~esworkbench.FoldError` or, when an upcaster raised, the
    :class:`~esworkbench.UpcastError`; its cause is the handler's or the upcaster's own).
    ``event`` is the event as the fold saw it, upcast; as stored when its upcaster failed.
    """

    event: Event
    before: Any
    after: Any
    changes: Mapping[str, tuple[Any, Any]]
    seconds: float
    error: str | None = None
    exception: FoldError | UpcastError | None = field(default=None, repr=False, compare=False)

    @property
    def changed(self) -> tuple[str, ...]:
        """The names of the fields the event changed."""
        return tuple(self.changes)

    @property
    def version(self) -> int:
        """The event's version."""
        return self.event.version

    @property
    def event_type(self) -> str:
        """The event's type."""
        return self.event.event_type

    def __str__(self) -> str:
        head = f"v{self.version} {self.event_type}"
        if self.error is not None:
            return f"{head}  ERROR {self.error}"
        moves = "; ".join(
            f"{name}: {show(old, 30)} → {show(new, 30)}"
            for name, (old, new) in self.changes.items()
        )
        return f"{head}  {moves or 'no change'}  ({self.seconds * 1e3:.3f} ms)"


class Steps(Sequence[Step]):
    """A step trace of one stream: a sequence of :class:`Step`, also as a DataFrame.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> trace = esw.steps(store, esw.generic("Account"), "acc-1")
        >>> len(trace), trace.state, trace.failed
        (1, {'amount': 5}, [])
    """

    def __init__(self, aggregate_id: str, items: list[Step], state: Any) -> None:
        self.aggregate_id = aggregate_id
        self._items = items
        self.state = state
        """The state after the last step (failed steps left it unchanged)."""

    @overload
    def __getitem__(self, index: int) -> Step: ...

    @overload
    def __getitem__(self, index: slice) -> list[Step]: ...

    def __getitem__(self, index: int | slice) -> Step | list[Step]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Step]:
        return iter(self._items)

    @property
    def failed(self) -> list[Step]:
        """The steps the fold failed on."""
        return [s for s in self._items if s.error is not None]

    def frame(self, output: Output = "pandas") -> pd.DataFrame | pl.DataFrame:
        """The trace as a frame: version, event_type, event_id, recorded_at, changed, before,
        after, seconds, error."""
        columns: dict[str, list[Any]] = {
            "version": [s.version for s in self._items],
            "event_type": [s.event_type for s in self._items],
            "event_id": [s.event.event_id for s in self._items],
            "recorded_at": [s.event.recorded_at for s in self._items],
            "changed": [list(s.changed) for s in self._items],
            "before": [s.before for s in self._items],
            "after": [s.after for s in self._items],
            "seconds": [s.seconds for s in self._items],
            "error": [s.error for s in self._items],
        }
        if output == "polars":
            import polars as pl

            objects = ("before", "after")
            return pl.DataFrame(
                [pl.Series(n, v, pl.Object if n in objects else None) for n, v in columns.items()]
            )
        if output != "pandas":
            raise EsWorkbenchError(f"output={output!r} is not one of 'pandas', 'polars'")
        import pandas as pd

        result = pd.DataFrame({n: pd.Series(v, dtype=object) for n, v in columns.items()})
        result["version"] = result["version"].astype("int64")
        result["recorded_at"] = pd.to_datetime(result["recorded_at"], utc=True)
        result["seconds"] = result["seconds"].astype("float64")
        return result

    @property
    def df(self) -> pd.DataFrame:
        """The trace as a pandas DataFrame."""
        return self.frame()  # type: ignore[return-value]

    def __str__(self) -> str:
        failed = len(self.failed)
        title = f"{self.aggregate_id}: {len(self)} steps, {failed} failed"
        return "\n".join([title, *(f"  {step}" for step in self._items)])

    def __repr__(self) -> str:
        return f"<Steps {self.aggregate_id!r}: {len(self)} steps, {len(self.failed)} failed>"

    def _repr_html_(self) -> str:
        rows = [
            (
                s.version,
                s.event_type,
                ", ".join(s.changed),
                s.before,
                s.after,
                f"{s.seconds * 1e3:.3f} ms",
                s.error or "",
            )
            for s in self._items
        ]
        headers = ("version", "event_type", "changed", "before", "after", "time", "error")
        return html_table(repr(self)[1:-1], headers, rows)


def _copy(state: Any) -> Any:
    """A deep copy, so that a handler changing the state in place shows in the trace."""
    try:
        return copy.deepcopy(state)
    except Exception:  # a state that cannot be copied is shown as it is
        return state


def steps(
    source: Source,
    aggregate: Aggregate,
    aggregate_id: str,
    *,
    version: int | None = None,
    at: object = None,
) -> Steps:
    """A step trace of one stream: each event with the state before and after, for debugging.

    Each step has the event, the state before and after, the changed fields, the seconds the
    fold took (with the event's upcasting), and the error if its handler or an upcaster raised.
    The trace goes on past a failing event; the state then stays as it was before that event.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        aggregate_id: the stream.
        version: stop at this version (inclusive).
        at: only the events recorded by this instant.

    Raises:
        UnknownStreamError: when the stream has no events.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("MoneyDeposited", {"amount": 5}),
        ...                            esw.NewEvent("MoneyDeposited", {"amount": "five"}),
        ...                            esw.NewEvent("MoneyDeposited", {"amount": 2})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> deposit = lambda s, e: {**s, "balance": s["balance"] + e.data["amount"]}
        >>> account = esw.Aggregate("Account", initial={"balance": 0},
        ...                         on={"MoneyDeposited": deposit})
        >>> trace = esw.steps(store, account, "acc-1")
        >>> [(s.version, s.changed, s.error) for s in trace]  # doctest: +NORMALIZE_WHITESPACE
        [(1, ('balance',), None),
         (2, (), "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
         (3, ('balance',), None)]
        >>> trace.state
        {'balance': 7}
    """
    table = read_events(source, aggregate, aggregate_id, version=version, at=at)
    folder = Folder(aggregate)
    cursor = folder.start()
    items: list[Step] = []
    before = _copy(cursor.state)  # copies: a handler changing a state in place cannot rewrite them
    upcasters = aggregate.upcasters or None
    # Decoded as stored; each event is upcast in its own step, so one that fails is one error.
    stored = decode_events(table, replace(aggregate, upcasters=None) if upcasters else aggregate)
    for event in stored:
        acc, last = list(cursor.acc), cursor.event
        started = time.perf_counter()
        try:
            if upcasters is not None and upcasters.touches(event.event_type, event.schema_version):
                event.event_type, event._schema_version, event.data = upcasters.upcast(
                    event.event_type, event.schema_version, event.data, where=event
                )
            folder.apply(cursor, event)
        except (FoldError, UpcastError) as exc:
            seconds = time.perf_counter() - started
            cursor.state, cursor.acc, cursor.event = _copy(before), acc, last
            cause = exc.__cause__
            error = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            if isinstance(exc, UpcastError):
                error = f"UpcastError: {error}"
            items.append(Step(event, before, before, {}, seconds, error, exc))
            continue
        seconds = time.perf_counter() - started
        after = _copy(cursor.state)
        items.append(Step(event, before, after, changes(before, after), seconds))
        before = after
    return Steps(aggregate_id, items, cursor.state)
