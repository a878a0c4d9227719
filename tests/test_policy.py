"""Depth policies: the worked examples of docs/concepts.md (ResNet-50, a 12-block ViT) and the edge cases."""

from __future__ import annotations

import pytest

from adaptive_depth.policy import active_mask, keep_count


@pytest.mark.parametrize(
    ("depths", "fixed", "s", "expected"),
    [
        ([3, 4, 6, 3], [1, 1, 1, 1], 0.5, [2, 2, 3, 2]),  # ResNet-50
        ([3, 4, 6, 3], [1, 1, 1, 1], 0.25, [1, 1, 2, 1]),
        ([2, 2, 2, 2], [0, 1, 1, 1], 0.5, [1, 1, 1, 1]),  # ResNet-18
        ([12], [0], 0.5, [6]),  # ViT
        ([12], [0], 1.0, [12]),
        ([10], [0], 0.3, [3]),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3
    ],
)
def test_keep_count_follows_the_design_examples(depths, fixed, s, expected) -> None:
    assert [keep_count(s, n, f) for n, f in zip(depths, fixed)] == expected


def test_last_policy_switches_off_from_the_end_and_keeps_fixed_blocks() -> None:
    assert active_mask([False, True, True, True], 2, "last") == [True, True, False, False]
    assert active_mask([True, True, False, True], 1, "last") == [False, False, True, False]


def test_spread_policy_keeps_evenly_spaced_blocks() -> None:
    assert active_mask([True] * 12, 6, "spread") == [True, False] * 6
    assert active_mask([False, True, True, True, True], 3, "spread") == [True, True, False, True, False]


def test_mask_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="can keep 1..3"):
        active_mask([False, True, True], 0, "last")
    with pytest.raises(ValueError, match="unknown depth policy"):
        active_mask([True, True], 1, "middle")
