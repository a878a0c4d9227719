"""Budget-aware depth: the selection rule, latency profiles, their persistence and the model card."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from adaptive_depth import AdaptiveDepth, BudgetError, ConfigError, LatencyProfile
from adaptive_depth.budget import choose_scaling_factor, describe_device

FLOPS = {0.25: 1.0e9, 0.5: 2.0e9, 0.75: 3.0e9, 1.0: 4.0e9}
LATENCY = {0.25: 5.0, 0.5: 9.0, 0.75: 14.0, 1.0: 20.0}


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"max_flops": 4.0e9}, 1.0),
        ({"max_flops": 2.5e9}, 0.5),
        ({"max_flops": 1.0e9}, 0.25),  # a bound is inclusive
        ({"max_latency_ms": 15.0}, 0.75),
        ({"max_latency_ms": 8.0}, 0.25),
        ({"max_flops": 3.5e9, "max_latency_ms": 10.0}, 0.5),  # both must fit: latency is the tighter one
        ({"max_flops": 1.5e9, "max_latency_ms": 100.0}, 0.25),  # FLOPs is the tighter one
    ],
)
def test_the_largest_depth_that_fits_is_chosen(budget: dict, expected: float) -> None:
    assert choose_scaling_factor(FLOPS, LATENCY, **budget) == expected


def test_budget_errors_say_what_is_wrong() -> None:
    with pytest.raises(BudgetError, match="smallest, s=0.25, costs 1 GFLOPs"):
        choose_scaling_factor(FLOPS, LATENCY, max_flops=0.5e9)
    with pytest.raises(BudgetError, match="5 ms"):
        choose_scaling_factor(FLOPS, LATENCY, max_latency_ms=1.0)
    with pytest.raises(BudgetError, match="needs max_flops"):
        choose_scaling_factor(FLOPS, LATENCY)
    for bad in (0, -1.0, float("nan"), "1e9", True):
        with pytest.raises(BudgetError, match="positive number"):
            choose_scaling_factor(FLOPS, LATENCY, max_flops=bad)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match=r"model.profile\(example_input, device\)"):
        choose_scaling_factor(FLOPS, None, max_latency_ms=10.0)
    with pytest.raises(BudgetError, match=r"\[0.75\]"):  # a depth trained after the profile was measured
        choose_scaling_factor(FLOPS, {s: v for s, v in LATENCY.items() if s != 0.75}, max_latency_ms=10.0)
    # A FLOPs budget needs no profile.
    assert choose_scaling_factor(FLOPS, None, max_flops=2.0e9) == 0.5


def _model() -> AdaptiveDepth:
    torch.manual_seed(0)
    base = timm.create_model("regnetx_002", num_classes=4)
    return AdaptiveDepth.wrap(base, input_size=[3, 32, 32])


def test_profile_measures_every_trained_depth_and_is_saved_with_the_model(tmp_path) -> None:
    model = _model().train()
    model.set_scaling_factor(0.75)
    measured = model.profile(batch_size=2, warmup=1, repeats=2)
    assert list(measured) == model.config.scaling_factors
    assert all(ms > 0 for ms in measured.values())
    assert model.training and model.scaling_factor == 0.75  # mode and depth are restored
    profile = model.latency_profile
    assert profile is not None and profile.batch_size == 2 and profile.input_size == [3, 32, 32]
    assert profile.device.startswith("cpu") and profile.dtype == "float32"
    assert {float(k): v for k, v in profile.latency_ms["2"].items()} == measured

    model.save_pretrained(tmp_path)
    loaded = AdaptiveDepth.from_pretrained(tmp_path)
    assert loaded.latency_profile == profile
    card = (tmp_path / "README.md").read_text()
    assert "latency (ms, batch 2)" in card and profile.device in card


def test_set_budget_switches_the_model_to_the_chosen_depth() -> None:
    model = _model()
    flops = model.flops_table()
    assert model.set_budget(max_flops=flops[0.5]) == 0.5
    assert model.scaling_factor == 0.5 and model.active_depth == model.depth_for(0.5)
    with pytest.raises(BudgetError, match="profile"):
        model.set_budget(max_latency_ms=5.0)
    # A profile written by hand (as if measured on this device) drives the latency budget.
    model.config.latency_profile = LatencyProfile(
        device=describe_device("cpu"), input_size=[3, 32, 32], dtype="float32",
        latency_ms={"1": {str(s): LATENCY[s] for s in model.config.scaling_factors}},
    ).to_dict()  # fmt: skip
    assert model.set_budget(max_latency_ms=15.0) == 0.75
    assert model.scaling_factor == 0.75
    with pytest.raises(BudgetError, match="no trained depth fits"):
        model.set_budget(max_latency_ms=1.0)
    assert model.scaling_factor == 0.75  # a failed choice leaves the depth alone


def test_a_corrupt_latency_profile_is_a_config_error(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["latency_profile"] = {"device": "cpu", "batch_size": 1, "input_size": [3, 32, 32], "dtype": "float32",
                               "latency_ms": {"0.5": -3.0}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="latency at s=0.5 must be a positive number"):
        AdaptiveDepth.from_pretrained(tmp_path)
