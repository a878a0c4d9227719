"""Latency profiles for serving: several batch sizes, saved and loaded, old profiles, another device refused, and
the profile that evaluation (fine-tuning) measures and keeps."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

from adaptive_depth import AdaptiveDepth, BudgetError, ConfigError, LatencyProfile
from adaptive_depth.budget import describe_device
from adaptive_depth.training.evaluate import measure_costs


def _model() -> AdaptiveDepth:
    torch.manual_seed(0)
    return AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=4), input_size=[3, 32, 32]).eval()


def test_a_profile_of_several_batch_sizes_is_saved_and_loaded(tmp_path) -> None:
    model = _model()
    at_smallest = model.profile(batch_size=[4, 1, 2], warmup=1, repeats=2)
    profile = model.latency_profile
    assert profile is not None and profile.batch_sizes == [1, 2, 4] and profile.batch_size == 1
    depths = model.config.scaling_factors
    assert at_smallest == {s: profile.at(s, 1) for s in depths}
    assert all(profile.at(s, b) > 0 for s in depths for b in (1, 2, 4))
    assert profile.device == describe_device("cpu") and profile.input_size == [3, 32, 32]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["latency_profile"]
    assert set(saved["latency_ms"]) == {"1", "2", "4"}
    assert AdaptiveDepth.from_pretrained(tmp_path).latency_profile == profile
    # an example batch is repeated to each size
    model.profile(torch.randn(1, 3, 32, 32), batch_size=(3,), warmup=0, repeats=1)
    assert model.latency_profile.batch_sizes == [3]
    with pytest.raises(ConfigError, match=r"positive integers, got \[1, 0\]"):
        model.profile(batch_size=[1, 0])


def test_a_profile_saved_before_batch_sizes_loads(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    old = {"0.25": 1.0, "0.5": 1.5, "0.75": 2.0, "1.0": 2.5}
    data["latency_profile"] = {"device": "cpu: x86_64, 2 threads of 2", "batch_size": 8, "input_size": [3, 32, 32],
                               "dtype": "float32", "latency_ms": old}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(data))
    profile = AdaptiveDepth.from_pretrained(tmp_path).latency_profile
    assert profile.batch_sizes == [8] and profile.latency_ms == {"8": old} and profile.at(0.5) == 1.5


def test_estimates_between_and_beyond_the_profiled_batch_sizes() -> None:
    table = {"1": {"1.0": 10.0}, "4": {"1.0": 16.0}, "8": {"1.0": 24.0}}
    profile = LatencyProfile(device="cpu: test", input_size=[3, 8, 8], dtype="float32", latency_ms=table)
    assert [profile.estimate(1.0, b) for b in (1, 2, 4, 6, 8, 16)] == [10.0, 12.0, 16.0, 20.0, 24.0, 48.0]
    assert profile.estimate(0.5, 1) is None
    only_large = LatencyProfile(
        device="cpu: test", input_size=[3, 8, 8], dtype="float32", latency_ms={"8": {"1.0": 24.0}}
    )
    assert only_large.estimate(1.0, 2) == 24.0  # below the smallest profiled batch: no faster than it
    with pytest.raises(ConfigError, match="batch sizes must be positive integers, got 'two'"):
        LatencyProfile(device="cpu", input_size=[3, 8, 8], dtype="float32", latency_ms={"two": {"1.0": 1.0}})


def test_a_latency_budget_refuses_a_profile_of_another_device() -> None:
    model = _model()
    model.profile(batch_size=1, warmup=0, repeats=1)
    here = model.latency_profile
    assert model.set_budget(max_latency_ms=1e6) == 1.0  # measured here: used
    for device, dtype in [("cuda: NVIDIA H100 80GB HBM3", here.dtype), (here.device, "float16")]:
        model.config.latency_profile = LatencyProfile(device, here.input_size, dtype, here.latency_ms).to_dict()
        with pytest.raises(BudgetError, match=r"measured on .* but the model runs on .*model\.profile\(") as err:
            model.set_budget(max_latency_ms=1e6)
        assert device in str(err.value) and "--profile" in str(err.value)
    assert model.set_budget(max_flops=1e12) == 1.0  # a FLOPs budget needs no profile


def test_evaluation_keeps_the_profile_it_measured_with_the_depths_interleaved() -> None:
    model = _model()
    switched: list[float] = []
    switch = model.set_scaling_factor

    def spy(s: float) -> AdaptiveDepth:
        switched.append(s)
        return switch(s)

    model.set_scaling_factor = spy  # type: ignore[method-assign]
    costs = measure_costs(model, model.example_input(1), [0.25, 0.5, 0.75, 1.0])
    profile = model.latency_profile
    assert profile is not None and profile.device == describe_device("cpu") and profile.batch_sizes == [1]
    assert {s: ms for s, (_, ms) in costs.items()} == {s: profile.at(s) for s in costs}
    # the depths were timed in rounds (0.25, 0.5, 0.75, 1, 0.25, ...), not all of one depth and then the next
    timed = switched[1:]  # after the switch that finds the model's device
    rounds = [timed[i : i + 4] for i in range(0, 24, 4)]
    assert len(timed) >= 24 and all(r == [0.25, 0.5, 0.75, 1.0] for r in rounds), timed[:24]
    # a plain model (the Leader) is timed at full depth, in eval mode whatever its mode (BatchNorm at batch 1)
    leader = timm.create_model("regnetx_002", num_classes=4).train()
    (gflops, ms) = measure_costs(leader, model.example_input(1), [0.5, 1.0])[1.0]
    assert gflops > 0 and ms > 0 and leader.training


def test_predict_refuses_another_devices_profile_and_profile_measures_this_one(tmp_path, capsys) -> None:
    from scripts import load_script

    model = _model()
    model.set_labels(["a", "b", "c", "d"])
    model.config.latency_profile = LatencyProfile(
        "cuda: NVIDIA H100 80GB HBM3",
        [3, 32, 32],
        "float32",
        {"1": {str(s): 1.0 for s in model.config.scaling_factors}},
    ).to_dict()
    model.save_pretrained(tmp_path / "model")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "a.png")
    predict = load_script("examples/predict.py")
    argv = [str(tmp_path / "model"), str(tmp_path / "a.png"), "--max-latency-ms", "10000"]
    with pytest.raises(BudgetError, match="measured on 'cuda: NVIDIA H100 80GB HBM3'.*--profile"):
        predict.main(argv)
    assert predict.main([*argv, "--device", "cpu", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "latency on cpu: " in out and out.splitlines()[-1].startswith(f"{tmp_path / 'a.png'}: ")
    saved = AdaptiveDepth.from_pretrained(tmp_path / "model").latency_profile
    assert saved.device == describe_device("cpu")  # saved into the folder: the next run uses it
    assert predict.main(argv) == 0
    with pytest.raises(SystemExit):
        predict.main([*argv, "--device", "gpu"])
    assert "--device 'gpu' is not a torch device" in capsys.readouterr().err
