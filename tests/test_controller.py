"""The depth controller: the slack rule, hysteresis, learning from observed latency, thread safety."""

from __future__ import annotations

import random
import threading

import pytest
import timm
import torch

from adaptive_depth import AdaptiveDepth, ConfigError, LatencyProfile
from adaptive_depth.serving import DepthController, FixedDepth

# ms per batch: batch size -> depth -> ms
TABLE = {
    "1": {"0.25": 4.0, "0.5": 6.0, "0.75": 8.0, "1.0": 10.0},
    "4": {"0.25": 8.0, "0.5": 12.0, "0.75": 16.0, "1.0": 20.0},
    "8": {"0.25": 12.0, "0.5": 18.0, "0.75": 24.0, "1.0": 30.0},
}
PROFILE = LatencyProfile(device="cpu: test", input_size=[3, 32, 32], dtype="float32", latency_ms=TABLE)
NOW = 100.0


def _waiting(n: int, oldest_ms: float) -> list[float]:
    """Arrival times of ``n`` requests, the oldest ``oldest_ms`` before NOW, the others just after it."""
    return [NOW - oldest_ms / 1e3] + [NOW - oldest_ms / 2e3] * (n - 1)


@pytest.mark.parametrize(
    ("n", "oldest_ms", "margin_ms", "expected"),
    [
        (1, 0.0, 0.0, (1.0, 1, 10.0)),  # slack 50: the full network
        (1, 43.0, 0.0, (0.5, 1, 6.0)),  # slack 7: 0.75 takes 8, 0.5 takes 6
        (4, 29.5, 0.0, (1.0, 4, 20.0)),  # slack 20.5 at batch 4
        (4, 35.0, 0.0, (0.5, 4, 12.0)),  # slack 15 at batch 4
        (6, 29.5, 0.0, (0.75, 6, 20.0)),  # batch 6 between the profiled 4 and 8: 0.75 interpolates to 20
        (20, 0.0, 0.0, (0.5, 8, 18.0)),  # batches of 8, 8, 4: at 0.5 the last answers at 18 + 18 + 12 = 48 ms
        (1, 35.0, 10.0, (0.25, 1, 4.0)),  # the margin comes off the slack: 5 left
    ],
)
def test_the_largest_depth_that_meets_the_waiting_requests_slack(n, oldest_ms, margin_ms, expected) -> None:
    controller = DepthController(PROFILE, slo_ms=50, margin_ms=margin_ms)
    decision = controller.decide(_waiting(n, oldest_ms), now=NOW)
    assert (decision.scaling_factor, decision.batch_size, decision.predicted_ms) == pytest.approx(expected)
    assert decision.slack_ms == pytest.approx(50 - oldest_ms - margin_ms)
    assert decision.on_time


def test_the_oldest_request_sets_the_slack_and_a_lost_cause_gets_the_fastest_depth() -> None:
    controller = DepthController(PROFILE, slo_ms=50)
    # arrival order does not matter: the oldest (43 ms ago) leaves 7 ms
    assert controller.decide([NOW - 0.001, NOW - 0.043], now=NOW).scaling_factor == 0.25  # batch 2 at 0.5: 8 ms
    late = controller.decide(_waiting(1, 48.0), now=NOW)  # 2 ms left: nothing fits
    assert late.scaling_factor == 0.25 and not late.on_time
    stats = controller.stats()
    assert stats.decisions == 2 and stats.predicted_late == 1 and stats.batches == {0.25: 2}
    assert stats.requests == {0.25: 3}


def test_the_backlog_behind_the_batch_lowers_the_depth_before_its_requests_are_lost() -> None:
    controller = DepthController(PROFILE, slo_ms=50, max_batch_size=4)
    alone = controller.decide([NOW - 0.010] * 4, now=NOW)  # 40 ms left: one batch of 4 at s = 1 takes 20
    assert (alone.scaling_factor, alone.batch_size) == (1.0, 4)
    controller = DepthController(PROFILE, slo_ms=50, max_batch_size=4)
    backlog = controller.decide([NOW - 0.010] * 4 + [NOW - 0.005] * 8, now=NOW)  # two more batches behind it
    # at s = 1 the third batch answers at 60 ms, past the 45 ms its requests have; at 0.5 at 36
    assert (backlog.scaling_factor, backlog.batch_size) == (0.5, 4)
    assert backlog.on_time and backlog.slack_ms == pytest.approx(40.0)  # the oldest request's slack, as before


def test_requests_late_at_every_depth_do_not_hold_the_depth_down() -> None:
    # batches of 8: the first has 20 ms left, the second and third (22 ms) are late even at the smallest depth
    # (its answers come at 24 and 28 ms): the first batch gets the largest depth that keeps it on time
    controller = DepthController(PROFILE, slo_ms=50)
    decision = controller.decide([NOW - 0.030] * 8 + [NOW - 0.028] * 9, now=NOW)
    assert decision.scaling_factor == 0.5 and decision.on_time  # 18 ms; 0.75 takes 24
    assert controller.stats().predicted_late == 0


def test_a_load_above_a_depths_capacity_lowers_the_depth_before_a_backlog_forms() -> None:
    # one request at a time, each with the whole SLO left: the slack rule alone would keep s = 1 at any load.
    # Capacity (best batch of the profile): s = 1 serves 8 / 30 ms = 267 a second, 0.75 333, 0.5 444.
    now = [NOW]
    controller = DepthController(PROFILE, slo_ms=50, patience=3, headroom=0.2, clock=lambda: now[0])
    assert controller.capacity(1.0) == pytest.approx(266.67, rel=1e-3)

    def run(rate: float, seconds: float, start: float) -> list[float]:
        depths = []
        for i in range(int(rate * seconds)):
            now[0] = start + i / rate
            depths.append(controller.decide([now[0]]).scaling_factor)
        return depths

    light = run(100, 1.0, NOW)  # well inside the full depth's capacity
    assert set(light) == {1.0}
    heavy = run(300, 1.0, NOW + 1.0)  # above s = 1's capacity, inside 0.75's
    assert heavy[-1] == 0.75 and set(heavy) == {1.0, 0.75}
    assert controller.stats().arrival_rate == pytest.approx(300, abs=1)
    back = run(100, 1.5, NOW + 2.0)  # the load falls: back up once the full depth serves it with headroom
    assert back[-1] == 1.0 and controller.stats().arrival_rate == pytest.approx(100, abs=1)


def test_a_backlog_is_served_in_the_batches_that_serve_the_most_requests_a_second() -> None:
    # batch 8 takes more than twice batch 4 here (a CPU whose caches a large batch overflows): 4 is the best batch
    table = {"1": {"0.5": 5.0, "1.0": 10.0}, "4": {"0.5": 10.0, "1.0": 20.0}, "8": {"0.5": 25.0, "1.0": 50.0}}
    profile = LatencyProfile(device="cpu: test", input_size=[3, 32, 32], dtype="float32", latency_ms=table)
    controller = DepthController(profile, slo_ms=200)
    assert controller.capacity(1.0) == pytest.approx(200.0)  # 4 / 20 ms, not 8 / 50 ms
    decision = controller.decide([NOW] * 10, now=NOW)
    assert (decision.scaling_factor, decision.batch_size, decision.predicted_ms) == (1.0, 4, 20.0)
    assert controller.decide([NOW] * 3, now=NOW).batch_size == 3  # fewer waiting: all of them
    fixed = FixedDepth(profile, slo_ms=200, scaling_factor=0.5)  # the same batching for a fixed depth
    assert fixed.decide([NOW] * 10, now=NOW).batch_size == 4


def test_half_the_capacity_in_poisson_arrivals_keeps_the_full_depth() -> None:
    """The rate is counted over enough arrivals that a random half load does not look like an overload."""
    # a slow network (resnet50 on a CPU): 40x the table's times, s = 1 serves 6.7 requests a second; a second's
    # window would count 0 to 8 of 3.3 a second and see an overload in every other one
    slow = {b: {s: 40 * ms for s, ms in row.items()} for b, row in TABLE.items()}
    profile = LatencyProfile(device="cpu: test", input_size=[3, 32, 32], dtype="float32", latency_ms=slow)
    now = [NOW]
    controller = DepthController(profile, slo_ms=6000, clock=lambda: now[0])
    assert controller.capacity(1.0) == pytest.approx(6.67, rel=0.01)
    rng, depths = random.Random(0), []
    for _ in range(1000):  # half of it in Poisson arrivals, one waiting at a time
        now[0] += rng.expovariate(3.33)
        depths.append(controller.decide([now[0]]).scaling_factor)
    assert depths.count(1.0) / len(depths) >= 0.99
    assert controller.stats().arrival_rate == pytest.approx(3.33, rel=0.4)


def test_the_injected_clock_is_the_time_of_the_decision() -> None:
    now = [NOW]
    controller = DepthController(PROFILE, slo_ms=50, clock=lambda: now[0])
    arrivals = [NOW]
    assert controller.decide(arrivals).scaling_factor == 1.0
    now[0] = NOW + 0.043  # the same request, 43 ms later
    assert controller.decide(arrivals).slack_ms == pytest.approx(7.0)


def test_hysteresis_steps_down_at_once_and_up_one_depth_at_a_time_after_patience() -> None:
    controller = DepthController(PROFILE, slo_ms=50, patience=3, headroom=0.2)
    depths = [controller.decide(_waiting(1, 43.0), now=NOW).scaling_factor]  # slack 7: down to 0.5 at once
    depths += [controller.decide(_waiting(1, 0.0), now=NOW).scaling_factor for _ in range(7)]  # slack 50
    assert depths == [0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 1.0, 1.0]
    # a step up waits for `patience` decisions IN A ROW: one tight batch in between starts the count again
    controller = DepthController(PROFILE, slo_ms=50, patience=3)
    controller.decide(_waiting(1, 43.0), now=NOW)
    slacks = [0.0, 0.0, 41.0, 0.0, 0.0, 0.0]  # 41 ms waited: slack 9, 0.75 fits but not with headroom
    assert [controller.decide(_waiting(1, w), now=NOW).scaling_factor for w in slacks] == [0.5] * 5 + [0.75]


def test_a_slack_hovering_at_a_threshold_does_not_make_the_depth_flap() -> None:
    # slack alternates between 9 and 7 ms: 0.75 (8 ms) fits every other batch
    waits = [41.0, 43.0] * 20

    def switches(**kwargs) -> int:
        controller = DepthController(PROFILE, slo_ms=50, **kwargs)
        for w in waits:
            decision = controller.decide(_waiting(1, w), now=NOW)
            assert decision.on_time
        return controller.stats().switches

    assert switches(patience=1, headroom=0.0) >= len(waits) - 1  # no hysteresis: a switch every batch
    assert switches() <= 2  # 1 -> 0.75 -> 0.5, then it stays


def test_observed_latency_corrects_the_predictions_and_the_choice() -> None:
    controller = DepthController(PROFILE, slo_ms=50, learning_rate=0.5)
    assert controller.decide(_waiting(1, 35.0), now=NOW).scaling_factor == 1.0  # slack 15, 10 predicted
    for _ in range(20):  # the machine got twice as slow
        controller.observe(1.0, 1, 20.0)
    assert controller.predict_ms(1.0, 1) == pytest.approx(20.0, rel=0.01)
    assert controller.predict_ms(0.25, 8) == pytest.approx(24.0, rel=0.05)  # the drift reaches unobserved depths
    assert controller.stats().drift == pytest.approx(2.0, rel=0.05)
    assert controller.decide(_waiting(1, 35.0), now=NOW).scaling_factor == 0.5  # 1.0: 20 and 0.75: 16 > 15


def test_a_depth_the_profile_got_wrong_is_corrected_on_its_own() -> None:
    controller = DepthController(PROFILE, slo_ms=50, learning_rate=0.2)
    for _ in range(100):  # the profile is right at s = 1 and 3x too optimistic at s = 0.25
        controller.observe(1.0, 1, 10.0)
        controller.observe(0.25, 1, 12.0)
    assert controller.predict_ms(0.25, 1) == pytest.approx(12.0, rel=0.1)
    assert controller.predict_ms(1.0, 1) == pytest.approx(10.0, rel=0.1)
    assert controller.predict_ms(0.25, 4) == pytest.approx(24.0, rel=0.1)  # the depth's correction, batch 4


def test_a_fixed_depth_runs_every_batch_at_its_depth_with_the_same_batching() -> None:
    policy = FixedDepth(PROFILE, slo_ms=50, scaling_factor=1.0, max_batch_size=4)
    decisions = [policy.decide(_waiting(n, w), now=NOW) for n, w in [(1, 0.0), (10, 45.0)]]
    assert [(d.scaling_factor, d.batch_size, d.on_time) for d in decisions] == [(1.0, 1, True), (1.0, 4, False)]
    assert policy.stats().predicted_late == 1 and policy.stats().switches == 0


def test_bad_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ConfigError, match="slo_ms must be a positive number, got 0"):
        DepthController(PROFILE, slo_ms=0)
    with pytest.raises(ConfigError, match="margin_ms"):
        DepthController(PROFILE, slo_ms=50, margin_ms=50)
    with pytest.raises(ConfigError, match="patience"):
        DepthController(PROFILE, slo_ms=50, patience=0)
    with pytest.raises(ConfigError, match="headroom"):
        DepthController(PROFILE, slo_ms=50, headroom=1.0)
    with pytest.raises(ConfigError, match="learning_rate"):
        DepthController(PROFILE, slo_ms=50, learning_rate=0)
    with pytest.raises(ConfigError, match="max_batch_size"):
        DepthController(PROFILE, slo_ms=50, max_batch_size=0)
    with pytest.raises(ConfigError, match=r"no measurement of the depths \[0.125\]"):
        FixedDepth(PROFILE, slo_ms=50, scaling_factor=0.125)
    with pytest.raises(ConfigError, match="at least one waiting request"):
        DepthController(PROFILE, slo_ms=50).decide([])
    with pytest.raises(ConfigError, match="latency_ms must be a positive number, got nan"):
        DepthController(PROFILE, slo_ms=50).observe(1.0, 1, float("nan"))


def test_threads_share_one_controller_and_one_model_through_scaled() -> None:
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("test_convnext", num_classes=3), input_size=[3, 32, 32]).eval()
    depths = model.config.scaling_factors
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = {s: model.set_scaling_factor(s)(x) for s in depths}
    model.set_scaling_factor(1.0)
    table = {"1": {str(s): 1.0 + 4 * s for s in depths}, "2": {str(s): 2.0 + 8 * s for s in depths}}
    profile = LatencyProfile(device="cpu: test", input_size=[3, 32, 32], dtype="float32", latency_ms=table)
    controller = DepthController(profile, slo_ms=10, patience=1, headroom=0.0)
    threads, rounds, errors, sizes = 4, 30, [], []

    def serve(worker: int) -> None:
        for i in range(rounds):
            waited_ms = (7 * i + 3 * worker) % 10  # slack from 10 to 1 ms: every depth gets chosen
            d = controller.decide([NOW - waited_ms / 1e3] * 2, now=NOW)
            with torch.no_grad(), model.scaled(d.scaling_factor):
                out = model(x)
            if not torch.equal(out, expected[d.scaling_factor]):
                errors.append((worker, i, d.scaling_factor))
            sizes.append(d.batch_size)
            controller.observe(d.scaling_factor, d.batch_size, d.predicted_ms)

    pool = [threading.Thread(target=serve, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool)
    assert errors == []  # every thread ran the depth it was given
    stats = controller.stats()
    assert stats.decisions == threads * rounds == sum(stats.batches.values())
    assert sum(stats.requests.values()) == sum(sizes)
    assert set(stats.batches) == set(depths)
    assert model.scaling_factor == 1.0  # scaled() restored the depth
