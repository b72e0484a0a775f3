"""Statistics of a store: counts from SQL, files and size from the Delta log."""

from __future__ import annotations

import dataclasses
import doctest
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

import esworkbench as esw
from esworkbench import stats
from esworkbench.stats import StoreInfo, format_bytes, store_info


def event(aggregate_id: str, aggregate_type: str, day: int) -> dict[str, object]:
    return {
        "aggregateId": aggregate_id,
        "aggregateType": aggregate_type,
        "eventType": "Happened",
        "data": {},
        "timestamp": f"2024-03-{day:02d}T08:00:00Z",
    }


@pytest.fixture
def store(tmp_path: Path) -> esw.Store:
    return esw.open_store(tmp_path / "store")


def test_an_empty_store(store: esw.Store) -> None:
    info = store_info(store)
    assert info == StoreInfo(
        path=str(store.path),
        events=0,
        streams=0,
        aggregate_types=(),
        first_recorded_at=None,
        last_recorded_at=None,
        files=0,
        size_bytes=0,
        table_version=0,
    )
    assert "events            0" in str(info)


def test_counts_types_and_time_range(store: esw.Store) -> None:
    store.append_batch([event("o-1", "Order", 5), event("a-1", "Account", 2)])
    store.append_batch([event("a-2", "Account", 9), event("a-1", "Account", 3)])
    info = store_info(store)
    assert (info.events, info.streams, info.table_version) == (4, 3, 2)
    assert info.aggregate_types == (("Account", 3), ("Order", 1))  # most events first
    assert info.first_recorded_at == datetime(2024, 3, 2, 8, tzinfo=UTC)
    assert info.last_recorded_at == datetime(2024, 3, 9, 8, tzinfo=UTC)


def test_files_and_size_come_from_the_delta_log(store: esw.Store) -> None:
    store.append_batch([event("o-1", "Order", 1), event("a-1", "Account", 1)])
    store.append_batch([event("a-1", "Account", 2)])
    info = store_info(store)
    on_disk = sorted((store.path / "events").rglob("*.parquet"))
    assert info.files == len(on_disk) == 3
    assert info.size_bytes == sum(p.stat().st_size for p in on_disk)


def test_compaction_shows_in_files_not_in_counts(store: esw.Store) -> None:
    for day in range(1, 4):
        store.append_batch([event("a-1", "Account", day)])
    before = store_info(store)
    store.compact()
    after = store_info(store)
    assert (before.files, after.files) == (3, 1)
    assert after.table_version > before.table_version
    assert (after.events, after.streams, after.aggregate_types) == (
        before.events,
        before.streams,
        before.aggregate_types,
    )


def test_info_sees_commits_made_by_another_writer(store: esw.Store) -> None:
    assert store_info(store).events == 0
    esw.open_store(store.path).append_batch([event("a-1", "Account", 1)])
    assert store_info(store).events == 1


def test_terminal_text(store: esw.Store) -> None:
    store.append_batch([event("a-1", "Account", 1), event("o-1", "Order", 2)])
    info = dataclasses.replace(store_info(store), size_bytes=12_345)
    assert str(info) == "\n".join(
        [
            f"store             {store.path}",
            "events            2",
            "streams           2",
            "aggregate types   2",
            "  Account         1",
            "  Order           1",
            "first recorded_at 2024-03-01T08:00:00+00:00",
            "last recorded_at  2024-03-02T08:00:00+00:00",
            "data files        2",
            "size              12,345 bytes (12.1 KiB)",
            "table version     1",
        ]
    )


def test_html_escapes_what_it_shows(store: esw.Store) -> None:
    store.append_batch([event("a-1", "<Acc & Co>", 1)])
    page = store_info(store)._repr_html_()
    assert page.startswith("<table")
    assert page.endswith("</table>")
    assert "&lt;Acc &amp; Co&gt;" in page
    assert "<Acc" not in page


def test_to_dict_is_plain_json(store: esw.Store) -> None:
    store.append_batch([event("a-1", "Account", 1)])
    body = json.loads(json.dumps(store_info(store).to_dict()))
    assert body["aggregate_types"] == {"Account": 1}
    assert body["first_recorded_at"] == "2024-03-01T08:00:00+00:00"
    assert body["size"] == format_bytes(body["size_bytes"])


def test_store_info_is_a_frozen_value(store: esw.Store) -> None:
    info = store_info(store)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.events = 1  # type: ignore[misc]
    assert info == store_info(store)
    assert hash(info) == hash(store_info(store))


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (10 * 1024**2 + 1, "10.0 MiB"),
        (3 * 1024**4, "3.0 TiB"),
        (2048 * 1024**5, "2048.0 PiB"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_the_examples_in_the_docstrings_run() -> None:
    assert doctest.testmod(stats).failed == 0
