"""Diffs: what changed between two points of a stream, or of a population of streams.

A field "changes" when its value after an event differs (``!=``) from its value before; an event
that sets a field to the value it already had changes nothing. Dict states compare field by field
(a field missing on one side shows as None); any other state compares as a whole, as ``state``.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from numbers import Integral
from typing import TYPE_CHECKING, Any, Literal, cast

import duckdb
import pyarrow as pa

from esworkbench.aggregates import Aggregate
from esworkbench.engine import Folder, Row, Source, decode_events, fold_events
from esworkbench.errors import EsWorkbenchError
from esworkbench.parallel import fold_columns
from esworkbench.query import translate
from esworkbench.temporal import Output, _sql_rows, compiles, instant, read_events, sql_fold

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

__all__ = ["Diff", "PopulationDiff", "changes", "diff", "population_diff"]

Point = int | datetime | str
Changes = Mapping[str, tuple[Any, Any]]


def fetch(source: Source, query: str, params: list[Any]) -> pa.Table:
    """The result of a query as an Arrow table; DuckDB's errors (a relation runs lazily, so they
    come while fetching) become QueryError.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> fetch(esw.open_store(tempfile.mkdtemp()), "select ? as n", [7]).to_pylist()
        [{'n': 7}]
    """
    try:
        return source.sql(query, params).to_arrow_table()
    except duckdb.Error as exc:
        raise translate(exc, query) from exc


def same(old: Any, new: Any) -> bool:
    """Whether two values are equal (values that cannot be compared count as different).

    Examples:
        >>> same(1, 1.0), same("a", "b")
        (True, False)
    """
    if old is new:
        return True
    try:
        return bool(old == new)
    except Exception:  # e.g. arrays, whose == is not a truth value
        return False


def changes(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """The fields that differ between two states, old → new.

    Examples:
        >>> changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None})
        {'b': (2, 3), 'c': (None, None)}
        >>> changes(5, 6)
        {'state': (5, 6)}
    """
    if isinstance(before, dict) and isinstance(after, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for name in {**before, **after}:
            old, new = before.get(name), after.get(name)
            if (name in before) != (name in after) or not same(old, new):
                found[str(name)] = (old, new)
        return found
    return {} if same(before, after) else {"state": (before, after)}


def show(value: Any, width: int = 60) -> str:
    """A value as a short line of text: decimals as written, instants in ISO 8601.

    Examples:
        >>> from decimal import Decimal
        >>> show(Decimal("0.10")), show("open"), show("x" * 99, width=5)
        ('0.10', "'open'", "'xxx…")
    """
    if isinstance(value, Decimal):
        text = str(value)
    elif isinstance(value, datetime):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def html_table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small HTML table of values shown with :func:`show` (everything escaped).

    Examples:
        >>> html_table("t", ["field"], [["<b>"]]).split("<tbody>")[1]
        '<tr><td>&#x27;&lt;b&gt;&#x27;</td></tr></tbody></table>'
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(show(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


# -- one stream ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    """The fields of one stream that differ between two points, old → new.

    ``before`` and ``after`` are the points as asked (a version, or an instant in UTC);
    ``before_version`` and ``after_version`` the versions they reached (0: no event yet).
    :func:`diff` makes one.

    Examples:
        >>> change = Diff("acc-1", 1, 2, 1, 2, {"owner": ("Ann", "Bo")})
        >>> print(change)
        acc-1: version 1 → version 2
          owner: 'Ann' → 'Bo'
        >>> change.frame().to_dict("records")
        [{'field': 'owner', 'before': 'Ann', 'after': 'Bo'}]
    """

    aggregate_id: str
    before: int | datetime
    after: int | datetime
    before_version: int
    after_version: int
    changes: Changes

    def frame(self, output: Output = "pandas") -> pd.DataFrame | pl.DataFrame:
        """The changes as a frame: field, before, after."""
        columns: dict[str, list[Any]] = {
            "field": list(self.changes),
            "before": [old for old, _ in self.changes.values()],
            "after": [new for _, new in self.changes.values()],
        }
        return _frame(columns, output)

    @property
    def df(self) -> pd.DataFrame:
        """The changes as a pandas DataFrame."""
        return self.frame()  # type: ignore[return-value]

    def _label(self, point: int | datetime, version: int) -> str:
        if isinstance(point, datetime):
            return f"{point.isoformat()} (version {version})"
        return f"version {version}"

    def _title(self) -> str:
        return (
            f"{self.aggregate_id}: {self._label(self.before, self.before_version)} → "
            f"{self._label(self.after, self.after_version)}"
        )

    def __str__(self) -> str:
        lines = [self._title()]
        lines += [
            f"  {name}: {show(old)} → {show(new)}" for name, (old, new) in self.changes.items()
        ]
        return "\n".join(lines if self.changes else [*lines, "  no field changed"])

    def _repr_html_(self) -> str:
        rows = [(name, old, new) for name, (old, new) in self.changes.items()]
        return html_table(self._title(), ("field", "before", "after"), rows)


def _at_point(
    source: Source, aggregate: Aggregate, aggregate_id: str, point: object, name: str
) -> tuple[int | datetime, int, Any]:
    """The point as asked, the version it reaches and the state there."""
    if isinstance(point, Integral) and not isinstance(point, bool):  # numpy integers too
        asked: int | datetime = int(point)
        table = read_events(source, aggregate, aggregate_id, version=int(point))
    elif isinstance(point, datetime | str):
        asked = cast(datetime, instant(point, name))  # not None: point is not None
        table = read_events(source, aggregate, aggregate_id, at=asked)
    else:
        raise EsWorkbenchError(
            f"{name}={point!r} is neither a version nor an instant. "
            f"Hint: {name}=3 (a version) or {name}='2024-03-01T14:03:00Z' (an instant)"
        )
    version = int(table["version"][-1].as_py()) if table.num_rows else 0
    state = fold_events(Folder(aggregate), decode_events(table, aggregate)).state
    return asked, version, state


def diff(
    source: Source, aggregate: Aggregate, aggregate_id: str, *, before: Point, after: Point
) -> Diff:
    """The fields of one stream that changed between two points, old → new.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        aggregate_id: the stream.
        before: a version (an integer, numpy's too), or an instant (datetime or ISO text):
            the events recorded by it.
        after: the other point, in the same forms.

    Raises:
        UnknownStreamError: when the stream has no events.
        EsWorkbenchError: when a point is neither a version nor an aware instant.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append("acc-1", [esw.NewEvent("AccountOpened", {"owner": "Ann"}),
        ...                            esw.NewEvent("OwnerChanged", {"owner": "Bo"})],
        ...                  aggregate_type="Account", expected_version=0)
        >>> change = esw.diff(store, esw.generic("Account"), "acc-1", before=1, after=2)
        >>> change.changes
        {'owner': ('Ann', 'Bo')}
        >>> print(change)
        acc-1: version 1 → version 2
          owner: 'Ann' → 'Bo'
    """
    asked_before, before_version, old = _at_point(source, aggregate, aggregate_id, before, "before")
    asked_after, after_version, new = _at_point(source, aggregate, aggregate_id, after, "after")
    return Diff(
        aggregate_id, asked_before, asked_after, before_version, after_version, changes(old, new)
    )


# -- a population ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PopulationDiff:
    """Which streams of a type changed between two instants, and which fields.

    ``appeared``: streams with no event recorded by ``before`` and some by ``after``;
    ``changed``/``unchanged``: streams that existed at ``before`` whose state differs or not at
    ``after``; ``fields``: per field, how many of the changed streams it changed in (most first);
    ``streams``: (aggregate_id, "appeared" or "changed", changed fields) for each stream that
    appeared or changed (an appeared stream lists no fields). :func:`population_diff` makes one.

    Examples:
        >>> from datetime import datetime, UTC
        >>> result = PopulationDiff("Account", datetime(2024, 1, 1, tzinfo=UTC),
        ...     datetime(2024, 2, 1, tzinfo=UTC), 0, 1, 4, {"owner": 1},
        ...     (("acc-1", "changed", ("owner",)),))
        >>> result.frame().to_dict("records")
        [{'aggregate_id': 'acc-1', 'change': 'changed', 'fields': ['owner']}]
    """

    aggregate_type: str
    before: datetime
    after: datetime
    appeared: int
    changed: int
    unchanged: int
    fields: Mapping[str, int]
    streams: tuple[tuple[str, Literal["appeared", "changed"], tuple[str, ...]], ...]

    def frame(self, output: Output = "pandas") -> pd.DataFrame | pl.DataFrame:
        """The streams that appeared or changed: aggregate_id, change, fields."""
        columns: dict[str, list[Any]] = {
            "aggregate_id": [s[0] for s in self.streams],
            "change": [s[1] for s in self.streams],
            "fields": [list(s[2]) for s in self.streams],
        }
        return _frame(columns, output)

    @property
    def df(self) -> pd.DataFrame:
        """The streams that appeared or changed, as a pandas DataFrame."""
        return self.frame()  # type: ignore[return-value]

    def _title(self) -> str:
        return (
            f"{self.aggregate_type} from {self.before.isoformat()} to {self.after.isoformat()}: "
            f"{self.appeared} appeared, {self.changed} changed, {self.unchanged} unchanged"
        )

    def __str__(self) -> str:
        return "\n".join(
            [self._title(), *(f"  {name}: {n} changed" for name, n in self.fields.items())]
        )

    def _repr_html_(self) -> str:
        return html_table(self._title(), ("field", "streams changed"), list(self.fields.items()))


def _rows(source: Source, aggregate: Aggregate, where: str, params: list[Any]) -> list[Row]:
    table = (
        sql_fold(source, aggregate, where, params, fallback=True) if compiles(aggregate) else None
    )
    if table is not None:
        return _sql_rows(aggregate, table)
    return fold_columns(source, aggregate, where, params).rows()


def population_diff(
    source: Source, aggregate: Aggregate, *, before: object, after: object
) -> PopulationDiff:
    """Which streams of the aggregate's type changed between two instants, and which fields.

    Only the streams with events recorded in ``(before, after]`` are folded (twice: as of each
    instant; one SQL query each when the fold is declared); the others count as unchanged.

    Args:
        source: a store (or an attached lake).
        aggregate: the fold.
        before: the earlier instant (datetime or ISO text).
        after: the later instant.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> from datetime import datetime, UTC
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> for i, day in enumerate([1, 1, 2]):
        ...     opened = esw.NewEvent("AccountOpened", {"owner": "Ann"},
        ...                           recorded_at=datetime(2024, 1, day, tzinfo=UTC))
        ...     _ = store.append(f"acc-{i}", [opened], aggregate_type="Account")
        >>> _ = store.append("acc-0", [esw.NewEvent("OwnerChanged", {"owner": "Bo"},
        ...                  recorded_at=datetime(2024, 1, 2, tzinfo=UTC))])
        >>> print(esw.population_diff(store, esw.generic("Account"),
        ...                           before="2024-01-01T00:00:00Z", after="2024-01-02T00:00:00Z"))
        Account from 2024-01-01T00:00:00+00:00 to 2024-01-02T00:00:00+00:00: 1 appeared, \
1 changed, 1 unchanged
          owner: 1 changed
    """
    t1, t2 = instant(before, "before"), instant(after, "after")
    if t1 is None or t2 is None or t1 > t2:
        raise EsWorkbenchError(
            f"population_diff needs two instants, before <= after; got before={before!r}, "
            f"after={after!r}. Hint: before='2024-01-01T00:00:00Z', after='2024-02-01T00:00:00Z'"
        )
    name = aggregate.name
    existing = fetch(
        source,
        "SELECT count(DISTINCT aggregate_id) AS n FROM events "
        "WHERE aggregate_type = ? AND recorded_at <= ?",
        [name, t1],
    )["n"][0].as_py()
    touched = (
        "recorded_at <= ? AND aggregate_id IN (SELECT aggregate_id FROM events "
        "WHERE aggregate_type = ? AND recorded_at > ? AND recorded_at <= ?)"
    )
    old = {row[0]: row[3] for row in _rows(source, aggregate, touched, [t1, name, t1, t2])}
    streams: list[tuple[str, Literal["appeared", "changed"], tuple[str, ...]]] = []
    counts: Counter[str] = Counter()
    for aggregate_id, _, _, state in _rows(source, aggregate, touched, [t2, name, t1, t2]):
        if aggregate_id not in old:
            streams.append((aggregate_id, "appeared", ()))
        elif found := changes(old[aggregate_id], state):
            streams.append((aggregate_id, "changed", tuple(found)))
            counts.update(list(found))
    appeared = sum(1 for s in streams if s[1] == "appeared")
    changed = len(streams) - appeared
    return PopulationDiff(
        name,
        t1,
        t2,
        appeared,
        changed,
        int(existing) - changed,
        dict(counts.most_common()),
        tuple(streams),
    )


def _frame(columns: dict[str, list[Any]], output: Output) -> pd.DataFrame | pl.DataFrame:
    if output == "polars":
        import polars as pl

        return pl.DataFrame(
            {
                n: pl.Series(n, v, pl.Object if n in ("before", "after") else None)
                for n, v in columns.items()
            }
        )
    if output != "pandas":
        raise EsWorkbenchError(f"output={output!r} is not one of 'pandas', 'polars'")
    import pandas as pd

    return pd.DataFrame({n: pd.Series(v, dtype=object) for n, v in columns.items()})
