"""Statistics that profile a store: how many events and streams, of which types, over what time.

Counts come from DuckDB over the ``events`` view; file counts and sizes come from the Delta log,
so nothing here loops over events in Python.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

import pyarrow.compute as pc

if TYPE_CHECKING:
    from esworkbench.store import Store

__all__ = ["StoreInfo", "format_bytes", "store_info"]

_UNITS: Final = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
_TYPE_COUNTS: Final = """
SELECT aggregate_type, count(*) AS events FROM events
GROUP BY aggregate_type ORDER BY events DESC, aggregate_type
"""
_TOTALS: Final = """
SELECT count(*), count(DISTINCT aggregate_id), min(recorded_at), max(recorded_at) FROM events
"""


def format_bytes(size: int) -> str:
    """Writes a size in bytes for people, in binary units.

    Examples:
        >>> format_bytes(512), format_bytes(1536), format_bytes(5 * 1024**3)
        ('512 bytes', '1.5 KiB', '5.0 GiB')
    """
    value, unit = float(size), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size} bytes" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def _instant(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """A profile of a store at one version of its Delta log.

    Attributes:
        path: the store's directory.
        events: how many events the store holds.
        streams: how many streams (distinct aggregate_ids).
        aggregate_types: ``(aggregate_type, events)`` pairs, most events first.
        first_recorded_at: the earliest recorded_at, or None for an empty store.
        last_recorded_at: the latest recorded_at, or None for an empty store.
        files: how many Parquet data files the Delta log lists.
        size_bytes: their total size.
        table_version: the version of the events table's Delta log.

    Examples:
        >>> info = StoreInfo("/tmp/bank", 3, 2, (("Account", 3),), None, None, 1, 2048, 1)
        >>> print(info)  # doctest: +NORMALIZE_WHITESPACE
        store             /tmp/bank
        events            3
        streams           2
        aggregate types   1
          Account         3
        first recorded_at -
        last recorded_at  -
        data files        1
        size              2,048 bytes (2.0 KiB)
        table version     1
    """

    path: str
    events: int
    streams: int
    aggregate_types: tuple[tuple[str, int], ...]
    first_recorded_at: datetime | None
    last_recorded_at: datetime | None
    files: int
    size_bytes: int
    table_version: int

    def to_dict(self) -> dict[str, object]:
        """The profile as plain JSON values: instants as ISO 8601 text, types as an object.

        Examples:
            >>> info = StoreInfo("/s", 1, 1, (("Order", 1),), None, None, 1, 10, 1)
            >>> info.to_dict()["aggregate_types"], info.to_dict()["size"]
            ({'Order': 1}, '10 bytes')
        """
        first, last = self.first_recorded_at, self.last_recorded_at
        return {
            "path": self.path,
            "events": self.events,
            "streams": self.streams,
            "aggregate_types": dict(self.aggregate_types),
            "first_recorded_at": None if first is None else first.isoformat(),
            "last_recorded_at": None if last is None else last.isoformat(),
            "files": self.files,
            "size_bytes": self.size_bytes,
            "size": format_bytes(self.size_bytes),
            "table_version": self.table_version,
        }

    def _rows(self) -> list[tuple[str, str]]:
        rows = [
            ("store", self.path),
            ("events", f"{self.events:,}"),
            ("streams", f"{self.streams:,}"),
            ("aggregate types", f"{len(self.aggregate_types):,}"),
        ]
        rows += [(f"  {name}", f"{count:,}") for name, count in self.aggregate_types]
        return [
            *rows,
            ("first recorded_at", _instant(self.first_recorded_at)),
            ("last recorded_at", _instant(self.last_recorded_at)),
            ("data files", f"{self.files:,}"),
            ("size", f"{self.size_bytes:,} bytes ({format_bytes(self.size_bytes)})"),
            ("table version", str(self.table_version)),
        ]

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label.ljust(width)} {value}" for label, value in rows)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
            f"<td style='text-align:right'>{html.escape(value)}</td></tr>"
            for label, value in self._rows()
        )
        return f"<table class='esw-store-info'>{cells}</table>"


def store_info(store: Store) -> StoreInfo:
    """Profiles a store: events, streams, aggregate types, time range, files and size.

    Examples:
        >>> import tempfile, esworkbench as esw
        >>> store = esw.open_store(tempfile.mkdtemp())
        >>> _ = store.append_batch([
        ...     {"aggregateId": "a", "aggregateType": "Account", "eventType": "AccountOpened",
        ...      "data": {}, "timestamp": "2024-01-01T00:00:00Z"},
        ...     {"aggregateId": "o", "aggregateType": "Order", "eventType": "OrderPlaced",
        ...      "data": {}, "timestamp": "2024-01-02T00:00:00Z"}])
        >>> info = store_info(store)
        >>> info.events, info.streams, info.aggregate_types, info.files
        (2, 2, (('Account', 1), ('Order', 1)), 2)
        >>> info.last_recorded_at.isoformat()
        '2024-01-02T00:00:00+00:00'
    """
    version = store.refresh()
    files = store.files  # the add actions of the Delta log
    size = 0
    if files.num_rows and "size_bytes" in files.column_names:
        size = int(pc.sum(files["size_bytes"]).as_py() or 0)
    types = tuple((str(kind), int(count)) for kind, count in store.sql(_TYPE_COUNTS).fetchall())
    [(events, streams, first, last)] = store.sql(_TOTALS).fetchall()
    return StoreInfo(
        path=str(store.path),
        events=int(events),
        streams=int(streams),
        aggregate_types=types,
        first_recorded_at=first,
        last_recorded_at=last,
        files=files.num_rows,
        size_bytes=size,
        table_version=version,
    )
