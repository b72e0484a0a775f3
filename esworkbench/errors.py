"""The exception tree of esworkbench.

Every error a user can act on has its own class, and all of them share one root::

    EsWorkbenchError (ValueError)
    ├── InvalidEventError        an event handed in is malformed (names the event and field)
    ├── ConcurrencyError         expected_version did not match the stream's head
    ├── DuplicateEventError      an event_id is already stored somewhere else
    ├── UnknownStreamError       a stream that does not exist was asked for
    ├── StoreError               the store directory is missing, foreign or too new
    │   └── CorruptStoreError    a file of the store cannot be read
    ├── ReadOnlyError            a write to something only for reading (an attached lake)
    └── QueryError               DuckDB refused a query (carries the query text)

Messages say what happened, where, and end with a ``Hint:`` for the fix.
"""

from __future__ import annotations

__all__ = [
    "ConcurrencyError",
    "CorruptStoreError",
    "DuplicateEventError",
    "EsWorkbenchError",
    "InvalidEventError",
    "QueryError",
    "ReadOnlyError",
    "StoreError",
    "UnknownStreamError",
]


class EsWorkbenchError(ValueError):
    """Root of every error esworkbench raises on purpose.

    It subclasses ``ValueError`` so that code catching bad values keeps working.

    Examples:
        >>> issubclass(ConcurrencyError, EsWorkbenchError)
        True
    """


class InvalidEventError(EsWorkbenchError):
    """An event handed to the store is malformed.

    Attributes:
        index: position of the event in the input (0-based), if known.
        field: the offending field, for example ``"version"`` or ``"data.amount"``.

    Examples:
        >>> err = InvalidEventError("bad", index=2, field="version")
        >>> (err.index, err.field)
        (2, 'version')
    """

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        super().__init__(message)
        self.index = index
        self.field = field


class ConcurrencyError(EsWorkbenchError):
    """The stream's head is not where the writer expected it.

    Examples:
        >>> err = ConcurrencyError("conflict", aggregate_id="acc-1", expected=0, actual=3)
        >>> err.actual
        3
    """

    def __init__(self, message: str, *, aggregate_id: str, expected: object, actual: int) -> None:
        super().__init__(message)
        self.aggregate_id = aggregate_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(EsWorkbenchError):
    """An event_id is already stored at another place in the store.

    Examples:
        >>> DuplicateEventError("dup", event_id="e1").event_id
        'e1'
    """

    def __init__(self, message: str, *, event_id: str) -> None:
        super().__init__(message)
        self.event_id = event_id


class UnknownStreamError(EsWorkbenchError):
    """A stream that has no events was asked for where one is required.

    Examples:
        >>> isinstance(UnknownStreamError("no stream"), EsWorkbenchError)
        True
    """


class StoreError(EsWorkbenchError):
    """The store cannot be opened or used as asked.

    Examples:
        >>> isinstance(StoreError("not a store"), ValueError)
        True
    """


class CorruptStoreError(StoreError):
    """A file of the store exists but cannot be read.

    Examples:
        >>> issubclass(CorruptStoreError, StoreError)
        True
    """


class ReadOnlyError(EsWorkbenchError):
    """A write was asked of something that is only read, such as an attached lake.

    Examples:
        >>> isinstance(ReadOnlyError("read-only"), EsWorkbenchError)
        True
    """


class QueryError(EsWorkbenchError):
    """DuckDB refused a query; the message shows the query and DuckDB's reason.

    Examples:
        >>> QueryError("bad", query="select nope").query
        'select nope'
    """

    def __init__(self, message: str, *, query: str) -> None:
        super().__init__(message)
        self.query = query
