"""The key index behind batch appends: exact answers about event_ids and stream heads.

The index (``esworkbench._keys``) keeps 64-bit hashes in memory and follows the Delta log. These
tests hold it to the answers a scan of the store gives: across handles and processes that commit
in between, across compaction, with staged files, and with a hash so poor that nearly every key
collides, which only exact confirmation can survive.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import esworkbench as esw
from esworkbench import _checks, _keys, _writes


def batch(streams: dict[str, int], kind: str = "Account") -> list[dict[str, Any]]:
    """``count`` events for each stream, each with its own event_id."""
    return [
        {
            "aggregateId": stream,
            "aggregateType": kind,
            "eventType": "Ticked",
            "eventId": str(uuid.uuid4()),
            "data": {"n": n},
        }
        for stream, count in streams.items()
        for n in range(count)
    ]


def arrow_batch(events: list[dict[str, Any]]) -> pa.Table:
    """The same events as an Arrow table (the column-wise path of append_batch)."""
    return pa.table(
        {
            "event_id": [e["eventId"] for e in events],
            "aggregate_id": [e["aggregateId"] for e in events],
            "aggregate_type": [e["aggregateType"] for e in events],
            "event_type": [e["eventType"] for e in events],
            "data": [f'{{"n": {e["data"]["n"]}}}' for e in events],
        }
    )


def heads_by_sql(store: esw.Store) -> dict[str, int]:
    rows = store.sql("select aggregate_id, last_version from streams").fetchall()
    return dict(rows)


@pytest.fixture(params=["real hash", "colliding hash"])
def hashing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the real hash, and with one that maps all text to three keys."""
    if request.param == "colliding hash":
        real = _keys.hash_text

        def colliding(values: pa.Array | pa.ChunkedArray) -> _keys.Keys:
            return real(values) % np.uint64(3)

        monkeypatch.setattr(_keys, "hash_text", colliding)
    return str(request.param)


def test_a_batch_refuses_an_event_id_another_handle_committed(tmp_path: Path, hashing: str) -> None:
    ours, theirs = esw.open_store(tmp_path / "s"), esw.open_store(tmp_path / "s")
    ours.append_batch(batch({"a": 2, "b": 1}))  # builds our index
    stored = batch({"c": 3})
    theirs.append_batch(stored)  # a commit our index has not seen
    clash = batch({"d": 2})
    clash[1]["eventId"] = stored[2]["eventId"]
    with pytest.raises(esw.DuplicateEventError, match=stored[2]["eventId"]):
        ours.append_batch(arrow_batch(clash))
    assert ours.append_batch(batch({"c": 1})).last_position == 7  # heads include theirs
    assert heads_by_sql(ours) == {"a": 2, "b": 1, "c": 4}


def test_heads_stay_exact_over_many_batches_and_streams(tmp_path: Path, hashing: str) -> None:
    store = esw.open_store(tmp_path / "s")
    expected: dict[str, int] = {}
    rng = np.random.default_rng(7)
    for round_ in range(6):
        streams = {f"s-{int(i)}": int(rng.integers(1, 4)) for i in rng.integers(0, 40, 15)}
        events = batch(streams)
        if round_ % 2:
            store.append_batch(arrow_batch(events))
        else:
            store.append_batch(events)
        for stream, count in streams.items():
            expected[stream] = expected.get(stream, 0) + count
        store.append("s-0", [{"event_type": "Noted", "data": {}}], aggregate_type="Account")
        expected["s-0"] = expected.get("s-0", 0) + 1
    assert heads_by_sql(store) == expected


def test_versions_given_in_a_batch_must_continue_heads_the_index_holds(
    tmp_path: Path, hashing: str
) -> None:
    store = esw.open_store(tmp_path / "s")
    store.append_batch(batch({"a": 3, "b": 1}))
    wrong = arrow_batch(batch({"a": 1, "b": 1})).append_column("version", pa.array([4, 3]))
    with pytest.raises(esw.ConcurrencyError, match="'b'"):
        store.append_batch(wrong)
    right = wrong.set_column(wrong.schema.get_field_index("version"), "version", pa.array([4, 2]))
    assert store.append_batch(right).events == 2
    with pytest.raises(esw.InvalidEventError, match="aggregate_type 'Account', not 'Order'"):
        store.append_batch(batch({"a": 1}, kind="Order"))


def test_a_retry_after_compaction_is_still_a_no_op(tmp_path: Path, hashing: str) -> None:
    store = esw.open_store(tmp_path / "s")
    first = batch({"a": 2, "b": 2})
    answer = store.append_batch(first)
    store.append_batch(batch({"a": 1}, kind="Account"))
    store.append_batch(batch({"o": 1}, kind="Order"))
    assert store.compact() > 0
    assert store.append_batch(first) == answer
    moved = batch({"z": 1})
    moved[0]["eventId"] = first[0]["eventId"]
    with pytest.raises(esw.DuplicateEventError):
        store.append_batch(moved)
    assert store.append_batch(batch({"a": 1})).last_position == 7
    assert heads_by_sql(store) == {"a": 4, "b": 2, "o": 1}


def test_a_large_batch_with_a_repeated_id_is_refused(tmp_path: Path, hashing: str) -> None:
    store = esw.open_store(tmp_path / "s")
    events = batch({f"s-{i}": 1 for i in range(10_001)})
    events[-1]["eventId"] = events[5]["eventId"]
    with pytest.raises(esw.DuplicateEventError, match="more than once"):
        store.append_batch(arrow_batch(events))
    events[-1]["eventId"] = str(uuid.uuid4())
    assert store.append_batch(arrow_batch(events)).events == 10_001


def test_staged_files_count_when_their_paths_are_given(tmp_path: Path, hashing: str) -> None:
    """An import stages several batches before its one commit; ids in them are stored too."""
    store = esw.open_store(tmp_path / "s")
    store.append_batch(batch({"a": 1}))
    with store._locked():
        first, _ = _checks.canonical_batch(arrow_batch(batch({"b": 2})), store._session)
        assert _writes.find_stored(store._session, first) is None
        placed = _writes.place(store._session, first, store.head_position())
        staged = [str(store.table_path / a.path) for a in store._stage(placed)]
        retry = first.slice(1)
        assert _writes.find_stored(store._session, retry, staged) == (3, 3, 2)
        assert _writes.find_stored(store._session, retry) is None  # not committed
        at = retry.schema.get_field_index("aggregate_id")
        moved = retry.set_column(at, "aggregate_id", pa.array(["z"]))
        with pytest.raises(esw.DuplicateEventError):
            _writes.find_stored(store._session, moved, staged)
        later, _ = _checks.canonical_batch(arrow_batch(batch({"b": 1})), store._session)
        moved = _writes.place(store._session, later, store.head_position() + 2, staged)
        assert moved["version"].to_pylist() == [3]


def test_the_index_agrees_with_a_fresh_one_built_from_the_files(
    tmp_path: Path, hashing: str
) -> None:
    store = esw.open_store(tmp_path / "s")
    for n in range(4):
        store.append_batch(batch({f"s-{i}": 1 + (i + n) % 3 for i in range(12)}))
    store.compact()
    store.append_batch(batch({"s-1": 1, "new": 2}))
    fresh = _keys.KeyIndex(store.table_path)
    fresh.follow(store.files)
    ids = pa.array([*sorted(heads_by_sql(store)), "nobody"])
    with store._locked():
        ours = store._keys.heads(ids)
    theirs = fresh.heads(ids)
    assert ours[0].tolist() == theirs[0].tolist()
    assert ours[1].to_pylist() == theirs[1].to_pylist()
    assert dict(zip(ids.to_pylist(), ours[0].tolist(), strict=True)) == {
        **heads_by_sql(store),
        "nobody": 0,
    }


def test_hash_text_gives_equal_keys_for_equal_text() -> None:
    text = pa.chunked_array([["a", "é", "a"], ["", "é"]])
    keys = _keys.hash_text(text)
    assert keys.dtype == np.uint64
    assert keys[0] == keys[2]
    assert keys[1] == keys[4]
    assert len({*keys.tolist()}) == 3


def test_file_numbers_beyond_the_key_bits_name_every_candidate_file() -> None:
    events = _keys._EventKeys()
    key = np.array([12345 << 30], np.uint64)
    wrapped = (1 << _keys._FILE_BITS) + 5
    events.add([(key, 5)])
    events.add([(np.array([99 << 30], np.uint64), wrapped)])
    assert events.files_hit(key) == {5, wrapped}  # 5 and wrapped share their low bits
    assert events.files_hit(np.array([7 << 30], np.uint64)) == set()
