"""The straggler summary from gathered per-rank windows."""

import pytest

from distrib.train.stragglers import summarize


def test_lagging_rank_is_flagged_and_fast_ones_are_not() -> None:
    windows = [
        {"rank": 0, "host": "a", "ready": [10.0, 11.0, 12.0], "step_s": [1.0, 1.0, 1.0]},
        {"rank": 1, "host": "b", "ready": [10.5, 11.5, 12.5], "step_s": [1.0, 1.0, 1.0]},
        {"rank": 2, "host": "c", "ready": [10.05, 11.0, 12.1], "step_s": [1.0, 1.0, 1.0]},
    ]
    summary = summarize(windows, threshold=0.2)
    assert summary["median_step_s"] == 1.0
    assert summary["max_lag_s"] == pytest.approx(0.5)
    assert [(s["rank"], s["host"]) for s in summary["stragglers"]] == [(1, "b")]
    assert summary["stragglers"][0]["slowdown"] == pytest.approx(0.5)


def test_nobody_flagged_when_ranks_keep_pace() -> None:
    windows = [
        {"rank": r, "host": "h", "ready": [1.0 + 0.01 * r], "step_s": [1.0]} for r in range(4)
    ]
    assert summarize(windows, threshold=0.2)["stragglers"] == []
