"""The serving benchmark's pieces that need no server: the traces and the numbers of its table."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts import load_script

SLO_MS = 100.0


def _sent(due: float, latency_ms: float | None, depth: float | None, status: int = 200) -> SimpleNamespace:
    return SimpleNamespace(
        due=due, latency=None if latency_ms is None else latency_ms / 1e3, status=status, depth=depth
    )


def test_summary_counts_late_and_dropped_answers_as_wrong() -> None:
    report = load_script("benchmarks/serving_report.py")
    sent = [_sent(0.0, 50, 1.0), _sent(0.5, 90, 0.5), _sent(1.0, 150, 0.25), _sent(1.5, None, None, 0)]
    before = {'adaptive_depth_batches_total{scaling_factor="1"}': 2.0, "adaptive_depth_batch_seconds_sum": 1.0}
    after = {'adaptive_depth_batches_total{scaling_factor="1"}': 3.0,
             'adaptive_depth_batches_total{scaling_factor="0.5"}': 1.0,
             "adaptive_depth_batch_seconds_sum": 1.5, "adaptive_depth_controller_seconds_sum": 0.001,
             "adaptive_depth_batch_size_sum": 3.0}  # fmt: skip
    accuracy = {1.0: 98.0, 0.5: 96.0, 0.25: 90.0}
    row = report.summarise("adaptive", "ramp", sent, 2.0, SLO_MS, accuracy, before, after)["summary"]
    assert row["requests"] == 4 and row["late"] == 1 and row["dropped"] == 1
    assert row["slo_attainment"] == 0.5 and row["goodput_rps"] == 1.0
    assert row["effective_accuracy"] == pytest.approx((98.0 + 96.0) / 4)  # the late and the dropped count 0
    assert row["batches"] == 2 and row["batches_at_full_depth"] == 0.5 and row["mean_batch_size"] == 1.5
    assert row["controller_overhead"] == pytest.approx(0.002) and row["worker_busy"] == pytest.approx(0.25)
    assert row["p50_ms"] == pytest.approx(90.0)


def test_the_table_checks_the_targets(tmp_path: Path) -> None:
    report = load_script("benchmarks/serving_report.py")
    results = []
    for trace, rows in {
        "light": {"s=1": [20] * 10, "s=0.25": [10] * 10, "adaptive": [20] * 10},
        "ramp": {"s=1": [20] * 7 + [500] * 3, "s=0.25": [10] * 10, "adaptive": [20] * 10},
        "burst": {"s=1": [20] * 10, "s=0.25": [10] * 10, "adaptive": [20] * 10},
    }.items():
        for policy, latencies in rows.items():
            depth = {"s=1": 1.0, "s=0.25": 0.25, "adaptive": 0.5}[policy]
            sent = [_sent(i / 10, ms, depth) for i, ms in enumerate(latencies)]
            metrics = {f'adaptive_depth_batches_total{{scaling_factor="{depth:g}"}}': 10.0}
            results.append(
                report.summarise(policy, trace, sent, 1.0, SLO_MS, {1.0: 98, 0.5: 97, 0.25: 90}, {}, metrics)
            )
    data = {"results": results, "durations": {"light": 1.0, "ramp": 1.0, "burst": 1.0}, "capacity_rps": 10.0,
            "slo_ms": SLO_MS, "model": "test"}  # fmt: skip
    table = report.markdown(data)
    assert "| ramp | s=1 | 70.0% |" in table and "| ramp | adaptive | 100.0% |" in table
    assert "SLO attainment adaptive 100.0% (target >= 99%), s = 1 70.0% (target < 80%): **met**" in table
    assert "effective accuracy adaptive 97.00 against s = 1 68.60 and s=0.25 90.00: **met**" in table
    assert "0.0% of the adaptive batches at s = 1 (target >= 95%): **not met**" in table
    assert report.plot(data, tmp_path / "plot.png").stat().st_size > 10_000
    # a run of a subset of the policies (`--policies adaptive smallest`) is tabled, its targets not judged
    subset = {**data, "results": [r for r in results if r["summary"]["policy"] != "s=1"]}
    assert report.targets(subset) == ["- targets: not judged (the run compared a subset of the policies)"]
    assert "| ramp | adaptive | 100.0% |" in report.markdown(subset)


def test_the_traces_are_seeded_bounded_and_follow_their_rate() -> None:
    pytest.importorskip("aiohttp")  # the bench extra
    bench = load_script("benchmarks/serving.py")
    ramp = bench.rate_of("ramp", 10.0, 100.0)
    assert [ramp(t) for t in (0.0, 50.0, 100.0)] == [5.0, 20.0, 5.0]
    burst = bench.rate_of("burst", 10.0, 100.0)
    assert [burst(t) for t in (10.0, 45.0, 60.0)] == [5.0, 40.0, 5.0]
    due = bench.arrivals(ramp, 40.0, 100.0, seed=1, limit=10_000)
    assert due == bench.arrivals(ramp, 40.0, 100.0, seed=1, limit=10_000) and due == sorted(due)
    assert 0.9 * 1250 < len(due) < 1.1 * 1250  # the integral of the ramp: 12.5 requests/s on average
    middle = sum(1 for t in due if 40 <= t < 60) / 20
    assert middle > 2.5 * sum(1 for t in due if t < 10) / 10  # about 18.5 against 6.5 requests/s
    assert len(bench.arrivals(ramp, 40.0, 100.0, seed=1, limit=100)) == 100


def test_repeats_rotate_the_servers_order_and_the_table_shows_their_mean_and_range() -> None:
    pytest.importorskip("aiohttp")  # the bench extra
    bench = load_script("benchmarks/serving.py")
    names = ["s=1", "s=0.25", "set_budget", "adaptive"]
    orders = [bench.rotated(names, r) for r in range(4)]
    assert all(sorted(order) == sorted(names) for order in orders)
    assert sorted(order.index("adaptive") for order in orders) == [0, 1, 2, 3]  # every place once in four repeats
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    report = load_script("benchmarks/serving_report.py")
    results = []
    for repeat, on_time in enumerate((10, 6)):  # the adaptive server met 100% of deadlines, then 60%
        for trace in ("light", "ramp", "burst"):
            sent = [_sent(i / 10, 20 if i < on_time else 500, 0.5) for i in range(10)]
            row = report.summarise("adaptive", trace, sent, 1.0, SLO_MS, {0.5: 97.0}, {}, {})
            row["summary"] |= {"repeat": repeat, "position": repeat}
            results.append(row)
    combined = report.combine(results)
    assert [(r["trace"], r["runs"]) for r in combined] == [("light", 2), ("ramp", 2), ("burst", 2)]
    assert combined[1]["slo_attainment"] == pytest.approx(0.8) and combined[1]["slo_attainment_range"] == (0.6, 1.0)
    assert combined[1]["effective_accuracy"] == pytest.approx(0.8 * 97.0) and combined[1]["late"] == 2
    table = report.markdown({"results": results, "repeats": 2})
    assert "| ramp | adaptive | 80.0% (60.0-100.0) |" in table and "mean of 2 repeats" in table
