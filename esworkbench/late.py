"""Late events, and how they restated the past.

An event is late when it took effect before something the store already knew: its
``occurred_at`` is earlier than the ``occurred_at`` of an event recorded strictly before it
(``recorded_at`` earlier). Events recorded at the same instant are never late to each other: no
one could have known one without the other. "Before" is counted within the event's stream
(``scope="stream"``, the default: the stream's own past was restated) or across the whole store
(``scope="store"``: the event arrived after the store had already heard of later things, as a
consumer reading the store in recorded order would see it).

A restatement is what a late event changed in the bitemporal record: the state valid at its
``occurred_at``, as known just before it was recorded, against as known once it was.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from esworkbench.aggregates import Aggregate
from esworkbench.diffs import changes, fetch
from esworkbench.engine import EPOCH, Folder, Source, decode_events, fold_events
from esworkbench.errors import EsWorkbenchError
from esworkbench.temporal import Output, instant, read_events

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

__all__ = ["late_events", "restatement"]

Scope = Literal["stream", "store"]

_LATE = """
WITH seen AS (
    SELECT position, aggregate_type, aggregate_id, version, event_type, event_id, occurred_at,
           recorded_at,
           max(occurred_at) OVER earlier AS ahead_occurred_at,
           arg_max(event_id, occurred_at) OVER earlier AS ahead_event_id
    FROM events {inner}
    WINDOW earlier AS ({partition} ORDER BY recorded_at
                       RANGE BETWEEN UNBOUNDED PRECEDING AND INTERVAL 1 MICROSECOND PRECEDING)
)
SELECT position, aggregate_type, aggregate_id, version, event_type, event_id, occurred_at,
       recorded_at, ahead_occurred_at, ahead_event_id,
       epoch_us(ahead_occurred_at) - epoch_us(occurred_at) AS late_by
FROM seen WHERE occurred_at < ahead_occurred_at {outer}
ORDER BY position
"""


def late_events(
    source: Source,
    aggregate_type: str | None = None,
    *,
    scope: Scope = "stream",
    output: Output = "pandas",
) -> pd.DataFrame | pl.DataFrame:
    """The late events: those that took effect before an event recorded earlier (one query).

    Columns: position, aggregate_type, aggregate_id, version, event_type, event_id,
    occurred_at, recorded_at, ``ahead_occurred_at`` (the latest occurred_at among the events
    recorded strictly before, in the stream or the store), ``ahead_event_id`` (an event holding
    it) and ``late_by`` (the gap between the two, a duration). In position order.

    Args:
        source: a store (or an attached lake).
        aggregate_type: only the events of this type. With ``scope="store"`` they are still
            compared with the events of every type.
        scope: ``"stream"``: compared with the events of the same stream; ``"store"``: with all.
        output: ``"pandas"`` or ``"polars"``.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [
        ...     esw.NewEvent("MoneyDeposited", {}, occurred_at="2024-01-05T00:00:00Z",
        ...                  recorded_at="2024-01-05T00:00:00Z"),
        ...     esw.NewEvent("FeeCharged", {}, occurred_at="2024-01-03T00:00:00Z",
        ...                  recorded_at="2024-01-06T00:00:00Z")],
        ...     aggregate_type="Account", expected_version=0)
        >>> late = esw.late_events(store, "Account")
        >>> late[["aggregate_id", "version", "event_type"]].to_dict("records")
        [{'aggregate_id': 'acc-1', 'version': 2, 'event_type': 'FeeCharged'}]
        >>> str(late["late_by"][0])
        '2 days 00:00:00'
    """
    if scope not in ("stream", "store"):
        raise EsWorkbenchError(
            f"scope={scope!r} is not a scope. Hint: 'stream' (compared within each stream) "
            "or 'store' (compared with every event)"
        )
    if output not in ("pandas", "polars"):
        raise EsWorkbenchError(f"output={output!r} is not one of 'pandas', 'polars'")
    if aggregate_type is not None and not isinstance(aggregate_type, str):
        raise EsWorkbenchError(f"aggregate_type must be a string, got {aggregate_type!r}")
    chosen = aggregate_type is not None
    if scope == "stream":
        inner = "WHERE aggregate_type = ?" if chosen else ""
        query = _LATE.format(
            inner=inner, partition="PARTITION BY aggregate_type, aggregate_id", outer=""
        )
    else:
        outer = "AND aggregate_type = ?" if chosen else ""
        query = _LATE.format(inner="", partition="", outer=outer)
    table = fetch(source, query, [aggregate_type] if chosen else [])
    late_by = pc.cast(table.column("late_by"), pa.duration("us"))
    table = table.set_column(table.schema.get_field_index("late_by"), "late_by", late_by)
    if output == "polars":
        import polars as pl

        return pl.DataFrame(table)
    result: pd.DataFrame = table.to_pandas()
    return result


def _late_indices(recorded: list[int], occurred: list[int]) -> list[int]:
    """The late events of one stream (see the module's definition), by index."""
    order = sorted(range(len(recorded)), key=recorded.__getitem__)
    late: list[int] = []
    ahead: int | None = None  # the latest occurred_at among the groups recorded so far
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and recorded[order[end]] == recorded[order[start]]:
            end += 1
        group = order[start:end]
        if ahead is not None:
            late.extend(i for i in group if occurred[i] < ahead)
        top = max(occurred[i] for i in group)
        ahead = top if ahead is None else max(ahead, top)
        start = end
    return late


def restatement(
    source: Source, aggregate: Aggregate, aggregate_id: str, *, at: object = None
) -> pd.DataFrame:
    """How late events restated one stream's past: the state valid at an instant, as known just
    before each late event was recorded and as known once it was (bitemporal replay).

    Without ``at``: one row per late event of the stream (``scope="stream"`` of
    :func:`late_events`), about the state valid at its own occurred_at. With ``at``: one row per
    event that took effect by ``at`` but was recorded after it (each one restated the state valid
    at ``at``). Columns: version, event_type, event_id, occurred_at, recorded_at, valid_at,
    ``changes`` (field → (as known before, as known after)), before, after. "As known before"
    means ``known_at`` = recorded_at - 1 µs; "after" is ``known_at`` = recorded_at, which also
    takes in any other event recorded at that same instant.

    Raises:
        UnknownStreamError: when the stream has no events.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [
        ...     esw.NewEvent("MoneyDeposited", {"amount": 10}, occurred_at="2024-01-05T00:00:00Z",
        ...                  recorded_at="2024-01-05T00:00:00Z"),
        ...     esw.NewEvent("MoneyDeposited", {"amount": 3}, occurred_at="2024-01-03T00:00:00Z",
        ...                  recorded_at="2024-01-06T00:00:00Z")],
        ...     aggregate_type="Account", expected_version=0)
        >>> account = esw.Aggregate("Account", fields={"balance": esw.sum("amount")})
        >>> esw.restatement(store, account, "acc-1")[["version", "changes"]].to_dict("records")
        [{'version': 2, 'changes': {'balance': (0, 3)}}]
    """
    import pandas as pd

    table = read_events(source, aggregate, aggregate_id)
    events = decode_events(table, aggregate)
    recorded = pc.cast(table.column("recorded_at"), pa.int64()).to_pylist()
    occurred = pc.cast(table.column("occurred_at"), pa.int64()).to_pylist()
    valid_at = instant(at, "at")
    if valid_at is None:
        chosen = [(i, occurred[i]) for i in _late_indices(recorded, occurred)]
    else:
        valid = (valid_at - EPOCH) // timedelta(microseconds=1)
        chosen = [(i, valid) for i in range(len(events)) if occurred[i] <= valid < recorded[i]]
    chosen.sort(key=lambda pair: (recorded[pair[0]], pair[0]))
    folder = Folder(aggregate)

    def state(valid: int, known: int) -> Any:
        picked = [e for k, e in enumerate(events) if recorded[k] <= known and occurred[k] <= valid]
        return fold_events(folder, picked).state

    rows: list[dict[str, Any]] = []
    for i, valid in chosen:
        before, after = state(valid, recorded[i] - 1), state(valid, recorded[i])
        event = events[i]
        rows.append(
            {
                "version": event.version,
                "event_type": table.column("event_type")[i].as_py(),
                "event_id": event.event_id,
                "occurred_at": event.occurred_at,
                "recorded_at": event.recorded_at,
                "valid_at": EPOCH + timedelta(microseconds=valid),
                "changes": changes(before, after),
                "before": before,
                "after": after,
            }
        )
    columns = ["version", "event_type", "event_id", "occurred_at", "recorded_at", "valid_at"]
    result = pd.DataFrame(rows, columns=[*columns, "changes", "before", "after"])
    result["version"] = result["version"].astype("int64")
    for name in ("occurred_at", "recorded_at", "valid_at"):
        result[name] = pd.to_datetime(result[name], utc=True)
    return result
