"""Fold definitions: an aggregate is an initial state and one function per event type.

An :class:`Aggregate` is what replay runs. Its fold comes in two forms that mix freely:

- handlers, ``on={"MoneyDeposited": lambda state, event: {...}}``: any Python, run by the Python
  engine, in a notebook cell, a lambda or a closure;
- declared fields, ``fields={"balance": esw.last("balanceAfter")}``: standard pieces (the last
  value of a data field, a count, a sum, a min or max, a status set by event type, the first or
  last instant). They run in Python too, and also compile to DuckDB SQL (``_foldsql.py``), so
  every aggregate of a type as of any instant comes from one query.

For each event the declared fields update first, then the event type's handler (if any) receives
that state and returns the next one. A handler never mutates the state it receives in place: the
engines keep earlier states for timelines and step traces.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from esworkbench.errors import EsWorkbenchError

if TYPE_CHECKING:
    from esworkbench.engine import Event
    from esworkbench.upcasting import Upcasters

__all__ = [
    "Aggregate",
    "FoldError",
    "Piece",
    "aggregate",
    "count",
    "first_at",
    "generic",
    "last",
    "last_at",
    "maximum",
    "minimum",
    "status",
    "total",
]

Handler = Callable[[Any, "Event"], Any]
Unknown = Literal["ignore", "error"]
Instant = Literal["recorded_at", "occurred_at"]


class FoldError(EsWorkbenchError):
    """A fold failed on an event: a handler raised, or an event type is unknown.

    Examples:
        >>> FoldError("boom", aggregate_id="acc-1", version=3).version
        3
    """

    def __init__(self, message: str, *, aggregate_id: str, version: int) -> None:
        super().__init__(message)
        self.aggregate_id = aggregate_id
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses from a worker process to the parent; keyword-only fields need saying so.
        return (_fold_error, (str(self), self.aggregate_id, self.version))


def _fold_error(message: str, aggregate_id: str, version: int) -> FoldError:
    return FoldError(message, aggregate_id=aggregate_id, version=version)


# -- declared pieces ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """A declared field: a standard fold step that also compiles to SQL.

    Build one with :func:`last`, :func:`count`, :func:`total`, :func:`minimum`,
    :func:`maximum`, :func:`status`, :func:`first_at` or :func:`last_at`.

    Examples:
        >>> last("owner").kind, last("owner").field
        ('last', 'owner')
    """

    kind: Literal["last", "count", "sum", "min", "max", "status", "first_at", "last_at"]
    field: str | None = None
    types: frozenset[str] | None = None
    statuses: tuple[tuple[str, Any], ...] = ()
    default: Any = None
    instant: Instant = "recorded_at"

    def initial(self) -> Any:
        """The value before any event: 0 for count and sum, else the default (None)."""
        return 0 if self.kind in ("count", "sum") else self.default

    def matches(self, event_type: str) -> bool:
        """Whether an event of this type feeds the piece."""
        if self.kind == "status":
            return any(t == event_type for t, _ in self.statuses)
        return self.types is None or event_type in self.types


def _types(types: str | Iterable[str] | None) -> frozenset[str] | None:
    if types is None:
        return None
    chosen = frozenset([types] if isinstance(types, str) else types)
    if not chosen or not all(isinstance(t, str) and t for t in chosen):
        raise EsWorkbenchError(
            f"types={sorted(map(repr, chosen))} is not a list of event types. "
            "Hint: pass event type names, e.g. types=['MoneyDeposited']"
        )
    return chosen


def _field(name: object, piece: str) -> str:
    if not isinstance(name, str) or not name:
        raise EsWorkbenchError(
            f"esw.{piece}() needs the name of a data field, got {name!r}. "
            f'Hint: esw.{piece}("amount")'
        )
    return name


def last(field: str, *, types: str | Iterable[str] | None = None, default: Any = None) -> Piece:
    """The last value of a data field, from events that carry it (optionally only some types).

    Examples:
        >>> last("balanceAfter", types=["MoneyDeposited", "MoneyWithdrawn"]).types == {
        ...     "MoneyDeposited", "MoneyWithdrawn"}
        True
    """
    return Piece("last", _field(field, "last"), _types(types), default=default)


def count(field: str | None = None, *, types: str | Iterable[str] | None = None) -> Piece:
    """How many events (of ``types``; carrying ``field`` if given) the stream has had.

    Examples:
        >>> count(types="MoneyDeposited").kind
        'count'
    """
    return Piece("count", None if field is None else _field(field, "count"), _types(types))


def total(field: str, *, types: str | Iterable[str] | None = None) -> Piece:
    """The exact sum of a numeric data field (``esw.sum``); non-numbers are skipped.

    Examples:
        >>> total("amount", types="MoneyDeposited").kind
        'sum'
    """
    return Piece("sum", _field(field, "sum"), _types(types))


def minimum(field: str, *, types: str | Iterable[str] | None = None) -> Piece:
    """The smallest value of a numeric data field so far (``esw.min``).

    Examples:
        >>> minimum("amount").kind
        'min'
    """
    return Piece("min", _field(field, "min"), _types(types))


def maximum(field: str, *, types: str | Iterable[str] | None = None) -> Piece:
    """The largest value of a numeric data field so far (``esw.max``).

    Examples:
        >>> maximum("amount").kind
        'max'
    """
    return Piece("max", _field(field, "max"), _types(types))


def status(statuses: Mapping[str, Any], *, default: Any = None) -> Piece:
    """A status set by event type: the value of the last event whose type is a key.

    Examples:
        >>> status({"AccountOpened": "open", "AccountClosed": "closed"}).statuses[0]
        ('AccountOpened', 'open')
    """
    if not statuses or not all(isinstance(k, str) and k for k in statuses):
        raise EsWorkbenchError(
            f"esw.status() needs a mapping of event types to statuses, got {statuses!r}. "
            'Hint: esw.status({"AccountOpened": "open", "AccountClosed": "closed"})'
        )
    return Piece("status", statuses=tuple(statuses.items()), default=default)


def first_at(
    *, types: str | Iterable[str] | None = None, instant: Instant = "recorded_at"
) -> Piece:
    """The instant of the first event (of ``types``).

    Examples:
        >>> first_at(instant="occurred_at").instant
        'occurred_at'
    """
    return Piece("first_at", None, _types(types), instant=_instant(instant))


def last_at(*, types: str | Iterable[str] | None = None, instant: Instant = "recorded_at") -> Piece:
    """The instant of the last event (of ``types``).

    Examples:
        >>> last_at().kind
        'last_at'
    """
    return Piece("last_at", None, _types(types), instant=_instant(instant))


def _instant(instant: str) -> Instant:
    if instant not in ("recorded_at", "occurred_at"):
        raise EsWorkbenchError(
            f"instant={instant!r} is not an instant column. "
            "Hint: use 'recorded_at' or 'occurred_at'"
        )
    return instant  # type: ignore[return-value]


# -- the aggregate -----------------------------------------------------------------------------


def _merge(state: Any, event: Event) -> Any:
    """The generic fold: the event's data merged onto the state, last writer wins per field."""
    return {**state, **event.data} if isinstance(event.data, dict) else state


@dataclass(frozen=True, eq=False)
class Aggregate:
    """A fold: an aggregate type's initial state and what each event type does to it.

    Args:
        name: the aggregate_type whose streams it folds.
        initial: the state before the first event (copied for every stream).
        on: one handler per event type, ``(state, event) -> new state``.
        fields: declared fields, e.g. ``{"balance": esw.last("balanceAfter")}``.
        unknown: ``"ignore"`` (default) or ``"error"`` for events no handler or field names.
        decimals: numbers with a fraction in data arrive as ``Decimal`` (exact), not float.
        upcasters: applied to every event before the fold (see :mod:`esworkbench.upcasting`).
        key: an explicit identity for snapshots; by default derived from the fold's code.

    Examples:
        >>> import esworkbench as esw
        >>> deposit = lambda s, e: {**s, "balance": s["balance"] + e.data["amount"]}
        >>> account = esw.Aggregate("Account", initial={"balance": 0},
        ...                         on={"MoneyDeposited": deposit})
        >>> account.handles("MoneyDeposited"), account.handles("AccountFrozen")
        (True, False)
    """

    name: str
    initial: Any = None
    on: Mapping[str, Handler] = field(default_factory=dict)
    fields: Mapping[str, Piece] = field(default_factory=dict)
    unknown: Unknown = "ignore"
    decimals: bool = False
    upcasters: Upcasters | None = None
    key: str | None = None
    merge: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise EsWorkbenchError(
                f"an aggregate needs its aggregate_type as name, got {self.name!r}. "
                'Hint: esw.Aggregate("Account", ...)'
            )
        if self.unknown not in ("ignore", "error"):
            raise EsWorkbenchError(
                f"unknown={self.unknown!r} is not an option. Hint: use 'ignore' or 'error'"
            )
        for event_type, handler in self.on.items():
            if not callable(handler):
                raise EsWorkbenchError(
                    f"the handler for {event_type!r} of aggregate {self.name!r} is not callable. "
                    "Hint: pass a function (state, event) -> new state"
                )
        for name, piece in self.fields.items():
            if not isinstance(piece, Piece):
                raise EsWorkbenchError(
                    f"field {name!r} of aggregate {self.name!r} is {piece!r}, not a declared "
                    "piece. Hint: use esw.last, esw.count, esw.sum, esw.min, esw.max, "
                    "esw.status, esw.first_at or esw.last_at"
                )
        if self.fields and self.initial is not None and not isinstance(self.initial, dict):
            raise EsWorkbenchError(
                f"aggregate {self.name!r} declares fields, so its initial state must be a dict, "
                f"not {type(self.initial).__name__}. Hint: initial={{}}"
            )

    @property
    def declared(self) -> bool:
        """True when the whole fold is declared, so the SQL engine can answer it alone."""
        return bool(self.fields) and not self.on and not self.merge

    def handles(self, event_type: str) -> bool:
        """Whether any handler or declared field takes events of this type."""
        if self.merge or event_type in self.on:
            return True
        return any(p.matches(event_type) for p in self.fields.values())

    def start(self) -> Any:
        """A fresh initial state (a shallow copy per stream, with declared fields at rest)."""
        state = self.initial
        if isinstance(state, dict):
            state = dict(state)
        elif isinstance(state, list | set):
            state = state.copy()
        if self.fields:
            state = {**(state or {}), **{n: p.initial() for n, p in self.fields.items()}}
        elif state is None and self.merge:
            state = {}
        return state

    @property
    def identity(self) -> str:
        """A digest of the fold (handlers' code, fields, options, upcasters): keys snapshots."""
        if self.key is not None:
            return self.key
        digest = hashlib.sha256()
        parts: list[object] = [
            self.name,
            repr(self.initial),
            sorted((n, repr(p)) for n, p in self.fields.items()),
            self.unknown,
            self.decimals,
            self.merge,
        ]
        for event_type in sorted(self.on):
            parts.append((event_type, _code_identity(self.on[event_type])))
        digest.update(repr(parts).encode())
        if self.upcasters is not None:
            digest.update(self.upcasters.identity.encode())
        return digest.hexdigest()[:16]


def _code_identity(function: Callable[..., Any]) -> str:
    """What a handler does, as text that is the same in every process.

    Its bytecode and constants, its defaults and closure, and, followed by name, the globals it
    reads: the functions it calls (a helper's change changes the identity too), the values
    (a notebook's ``rate = 2``) and the attributes it names of modules. Objects whose repr is an
    address are known by their type only, so the text does not change between processes.
    """
    return repr(_identity(function, set()))


def _identity(value: object, seen: set[int]) -> object:
    if id(value) in seen:
        return "<recursion>"
    if isinstance(value, types.MethodType):  # the class form: its class's methods and values
        owner = type(value.__self__)
        seen.add(id(value))
        members = sorted(
            (name, _identity(member, seen))
            for name, member in vars(owner).items()
            if not name.startswith("__")
        )
        instance = sorted(
            (k, _identity(v, seen)) for k, v in getattr(value.__self__, "__dict__", {}).items()
        )
        return ("method", owner.__qualname__, members, instance)
    if isinstance(value, types.FunctionType):
        seen.add(id(value))
        code = value.__code__
        names = _names(code)
        known = value.__globals__
        called = sorted(
            (name, _global(known[name], names, seen)) for name in names if name in known
        )
        closure = [_identity(cell.cell_contents, seen) for cell in value.__closure__ or ()]
        defaults = [_identity(d, seen) for d in value.__defaults__ or ()]
        return (_code_text(code), defaults, closure, called)
    if isinstance(value, type):
        return ("class", value.__module__, value.__qualname__)
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def _global(value: object, names: set[str], seen: set[int]) -> object:
    """A global a handler reads: a function or class as :func:`_identity` knows it, a module by
    the attributes the handler names (``fees.rate``), any other value by its repr (a notebook
    cell's ``rate = 2`` is a global: changing it changes the fold)."""
    if isinstance(value, types.ModuleType):
        attributes = sorted(n for n in names if n in vars(value))
        return (
            "module",
            value.__name__,
            [(n, _identity(vars(value)[n], seen)) for n in attributes],
        )
    return _identity(value, seen)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _code_text(code: types.CodeType) -> tuple[object, ...]:
    consts = tuple(
        _code_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts
    )
    return (code.co_code.hex(), consts, code.co_names)


def generic(name: str, *, decimals: bool = False) -> Aggregate:
    """The generic fold for exploring without code: each event's data merged onto the state.

    Examples:
        >>> generic("Account").handles("AnythingAtAll")
        True
    """
    return Aggregate(name, initial={}, decimals=decimals, merge=True)


def aggregate(cls: type) -> Aggregate:
    """Turns a class with one method per event type into an :class:`Aggregate` (a decorator).

    Methods named like an event type (``MoneyDeposited``), or ``on_<EventType>``, are handlers
    ``(self, state, event) -> new state``. Class attributes ``name`` (default: the class name),
    ``initial``, ``fields``, ``unknown``, ``decimals`` and ``upcasters`` set the options.

    Examples:
        >>> import esworkbench as esw
        >>> @esw.aggregate
        ... class Account:
        ...     initial = {"balance": 0}
        ...     def MoneyDeposited(self, state, event):
        ...         return {**state, "balance": state["balance"] + event.data["amount"]}
        >>> Account.name, sorted(Account.on)
        ('Account', ['MoneyDeposited'])
    """
    instance = cls()
    handlers: dict[str, Handler] = {}
    for attribute, value in inspect.getmembers(instance, callable):
        event_type = attribute[3:] if attribute.startswith("on_") else attribute
        if attribute.startswith("_") or not event_type[:1].isupper():
            continue
        handlers[event_type] = value
    options = {k: getattr(cls, k) for k in ("unknown", "decimals", "upcasters") if hasattr(cls, k)}
    return Aggregate(
        getattr(cls, "name", cls.__name__),
        initial=getattr(cls, "initial", None),
        on=handlers,
        fields=dict(getattr(cls, "fields", {})),
        **options,
    )


def plain_number(value: Any) -> bool:
    """Whether a value counts as a number for sum, min and max (bool does not).

    Examples:
        >>> plain_number(Decimal("1.5")), plain_number(True), plain_number("2")
        (True, False, False)
    """
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)
