"""esworkbench: a workbench for the history of event-sourced systems.

Event logs live as Delta Lake tables of Parquet files, DuckDB answers questions over them, and the
events turn back into state. This module is the facade: the verbs and types a notebook needs.

Examples:
    >>> import tempfile, esworkbench as esw
    >>> store = esw.open_store(tempfile.mkdtemp())
    >>> store.append("acc-1", [esw.NewEvent("AccountOpened", {"owner": "Ann"})],
    ...              aggregate_type="Account", expected_version=0)
    1
    >>> store.sql("select event_type from events").fetchall()
    [('AccountOpened',)]
"""

from __future__ import annotations

from esworkbench.aggregates import (
    Aggregate,
    FoldError,
    aggregate,
    count,
    first_at,
    generic,
    last,
    last_at,
    maximum,
    minimum,
    status,
    total,
)

# Declared pieces read best as esw.sum, esw.min and esw.max; nothing in this module needs the
# builtins they shadow.
from esworkbench.aggregates import maximum as max
from esworkbench.aggregates import minimum as min
from esworkbench.aggregates import total as sum
from esworkbench.attach import AttachedLake, attach
from esworkbench.diffs import Diff, PopulationDiff, diff, population_diff
from esworkbench.engine import Event
from esworkbench.errors import (
    ConcurrencyError,
    CorruptStoreError,
    DuplicateEventError,
    EsWorkbenchError,
    InvalidEventError,
    QueryError,
    ReadOnlyError,
    StoreError,
    UnknownStreamError,
)
from esworkbench.events import EVENT_SCHEMA, NewEvent
from esworkbench.history import blame, timeline
from esworkbench.late import late_events, restatement
from esworkbench.snapshots import import_snapshots, snapshot, snapshot_advice
from esworkbench.sources import (
    ImportResult,
    SourceRewrittenError,
    export_csv,
    export_jsonl,
    export_parquet,
    import_events,
)
from esworkbench.steps import Step, Steps, steps
from esworkbench.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    Store,
    open_store,
)
from esworkbench.temporal import as_of, replay
from esworkbench.upcasting import UpcastError, Upcasters

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "EVENT_SCHEMA",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AppendResult",
    "AttachedLake",
    "ConcurrencyError",
    "CorruptStoreError",
    "Diff",
    "DuplicateEventError",
    "EsWorkbenchError",
    "Event",
    "ExpectedVersion",
    "FoldError",
    "ImportResult",
    "InvalidEventError",
    "NewEvent",
    "PopulationDiff",
    "QueryError",
    "ReadOnlyError",
    "SourceRewrittenError",
    "Step",
    "Steps",
    "Store",
    "StoreError",
    "UnknownStreamError",
    "UpcastError",
    "Upcasters",
    "aggregate",
    "as_of",
    "attach",
    "blame",
    "count",
    "diff",
    "export_csv",
    "export_jsonl",
    "export_parquet",
    "first_at",
    "generic",
    "import_events",
    "import_snapshots",
    "last",
    "last_at",
    "late_events",
    "max",
    "maximum",
    "min",
    "minimum",
    "open_store",
    "population_diff",
    "replay",
    "restatement",
    "snapshot",
    "snapshot_advice",
    "status",
    "steps",
    "sum",
    "timeline",
    "total",
]
