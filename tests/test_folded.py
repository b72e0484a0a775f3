"""Folded streams as columns: what workers send back, merged in order, equal to the rows."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from esworkbench.parallel import Folded
from esworkbench.temporal import _spread

keys = st.sampled_from(["a", "b", "c"])
states = st.one_of(
    st.dictionaries(keys, st.integers() | st.none(), max_size=3),
    st.integers(),  # a state that is not a dict
)
# Chunks whose states all have the same keys, as most folds make them, in a random order.
alike = st.lists(st.sampled_from(["a", "b", "c"]), unique=True).flatmap(
    lambda names: st.lists(st.fixed_dictionaries({n: st.integers() for n in names}), max_size=4)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(states, max_size=6) | alike, max_size=5), st.booleans())
def test_chunks_merged_give_back_every_row_in_order(chunks: list[list[Any]], dicts: bool) -> None:
    if dicts:  # most folds: every state a dict, keys present or not, in any order
        chunks = [[s if isinstance(s, dict) else {"b": s} for s in chunk] for chunk in chunks]
    rows: list[list[tuple[str, int, int, Any]]] = []
    n = 0
    for chunk in chunks:
        rows.append([(f"s{n + i}", i + 1, i, state) for i, state in enumerate(chunk)])
        n += len(chunk)
    merged = Folded.merge([Folded.of(part) for part in rows])
    every = [row for part in rows for row in part]
    assert merged.rows() == every
    assert merged.ids == [row[0] for row in every]
    if merged.names is not None:  # spread: the columns _spread makes of the same states
        spread = _spread([row[3] for row in every])
        assert dict(zip(merged.names, merged.values or [], strict=True)) == spread


def test_a_chunk_of_unlike_states_keeps_them_whole() -> None:
    folded = Folded.of([("a", 1, 0, {"x": 1}), ("b", 1, 0, {"y": 2})])
    assert folded.names is None
    merged = Folded.merge([Folded.of([("c", 1, 0, {"x": 3})]), folded])
    assert [row[3] for row in merged.rows()] == [{"x": 3}, {"x": 1}, {"y": 2}]


def test_chunks_spread_with_other_keys_are_not_filled_with_none() -> None:
    merged = Folded.merge([Folded.of([("a", 1, 0, {"a": 1})]), Folded.of([("b", 1, 0, {"b": 2})])])
    assert [row[3] for row in merged.rows()] == [{"a": 1}, {"b": 2}]
