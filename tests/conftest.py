"""Shared fixtures of the test suite."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import esworkbench as esw

# -- process tests (test_concurrency.py, test_crash.py) ------------------------------------

Rows = list[dict[str, Any]]


def _audit(store_path: Path) -> Rows:
    """Opens the store afresh and checks what every reader sees; returns the rows in position order.

    read_all, SQL over ``events`` and read_stream of every stream must give the same rows; event_ids
    are unique; positions run 1..N; each stream's versions run 1..k; the ``streams`` view agrees.
    """
    store = esw.open_store(store_path)
    try:
        rows = [row for batch in store.read_all(batch_size=97) for row in batch.to_pylist()]
        by_sql = store.sql("select * from events order by position").to_arrow_table().to_pylist()
        assert by_sql == rows, "SQL over events disagrees with read_all"

        positions = [r["position"] for r in rows]
        assert positions == list(range(1, len(rows) + 1)), "positions are not 1..N in order"
        ids = Counter(r["event_id"] for r in rows)
        assert not [i for i, n in ids.items() if n > 1], "an event_id is stored twice"

        streams: dict[str, Rows] = {}
        for row in rows:
            streams.setdefault(row["aggregate_id"], []).append(row)
        for stream, expected in streams.items():
            read = store.read_stream(stream).to_pylist()
            assert read == expected, f"read_stream({stream!r}) disagrees with read_all"
            versions = [r["version"] for r in read]
            assert versions == list(range(1, len(read) + 1)), f"versions of {stream!r} have a gap"

        summary = store.sql(
            "select aggregate_id, last_version, event_count from streams order by aggregate_id"
        ).fetchall()
        assert summary == sorted((s, len(r), len(r)) for s, r in streams.items())
        return rows
    finally:
        store.close()


@pytest.fixture
def audit_store() -> Callable[[Path], Rows]:
    """A function that audits a store directory as every reader sees it (see ``_audit``)."""
    return _audit
