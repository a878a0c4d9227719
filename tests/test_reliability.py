"""The model's guarantees under hostile but realistic use: state dicts, float-typed depths, threads, failed saves
and loads, hand-edited configs, and errors that say what is wrong."""

from __future__ import annotations

import copy
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import adaptive_depth.saved.files as saved_files
from adaptive_depth import AdaptiveDepth, AdaptiveDepthError, CheckpointError, ConfigError, UnknownModelError
from adaptive_depth.gates import is_gated
from adaptive_depth.policy import depth_key


def _resnet(scaling_factors=(0.25, 0.5, 0.75, 1.0)) -> AdaptiveDepth:
    torch.manual_seed(0)
    base = timm.create_model("resnet26", num_classes=5, zero_init_last=False)  # [2, 2, 2, 2] bottlenecks
    return AdaptiveDepth.wrap(base, input_size=[3, 32, 32], scaling_factors=list(scaling_factors)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) * 2 + 1 for _ in range(2)]


def _recalibrated(scaling_factors=(0.25, 0.5, 0.75, 1.0)) -> AdaptiveDepth:
    model = _resnet(scaling_factors)
    model.recalibrate_norms(_batches())
    return model


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _is_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


def _half_statistics(model: AdaptiveDepth) -> dict[str, torch.Tensor]:
    """The statistics that run at s = 0.5, read from the base model (which holds the active depth's set)."""
    with model.scaled(0.5):
        return {f"model.{k}": v.clone() for k, v in model.model.state_dict().items() if _is_statistic(k)}


# ---------------------------------------------------------------------- state dicts


def test_state_dict_holds_the_training_statistics_whatever_the_depth() -> None:
    model = _recalibrated()
    trained = _resnet().state_dict()  # the same weights, never recalibrated
    full = model.set_scaling_factor(1.0)(X)
    model.set_scaling_factor(0.5)
    sd = model.state_dict()
    for key in ("model.layer4.1.bn1.running_mean", "model.layer4.1.bn1.running_var"):
        torch.testing.assert_close(sd[key], trained[key])  # not the 0.5 set
    half = model(X)
    model.set_scaling_factor(1.0)
    model.load_state_dict(sd)  # at full depth: must not overwrite the s = 1 statistics
    assert torch.equal(model(X), full)
    model.set_scaling_factor(0.5).load_state_dict(sd)  # at 0.5: must not overwrite the 0.5 statistics either
    assert torch.equal(model(X), half)
    assert model.scaling_factor == 0.5
    # A fresh wrap loading it gets the training statistics as its default, not those of 0.5 (every layer: those
    # of blocks that run at 0.5 differ between the two sets).
    assert any(not torch.equal(v, trained[k]) for k, v in _half_statistics(model).items())
    fresh = _resnet()
    fresh.load_state_dict(sd)
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items() if _is_statistic(k))
    assert torch.equal(fresh.set_scaling_factor(1.0)(X), _resnet().set_scaling_factor(1.0)(X))


def test_nested_state_dict_of_a_module_holding_the_model_is_depth_independent() -> None:
    model = _recalibrated().set_scaling_factor(0.25)
    holder = nn.ModuleDict({"player": model})
    sd = holder.state_dict()
    trained = _resnet().state_dict()
    for key in (k for k in trained if _is_statistic(k)):  # every layer, those that run at 0.25 included
        torch.testing.assert_close(sd[f"player.{key}"], trained[key])
    quarter = model(X)
    holder.load_state_dict(sd)
    assert torch.equal(model(X), quarter)


# ---------------------------------------------------------------------- float-typed depths


@pytest.mark.parametrize(
    ("value", "depth"),
    [
        (np.float32(0.6), 0.6),
        (0.2 * 3, 0.6),
        (np.linspace(0.1, 1, 10)[2], 0.3),  # 0.30000000000000004
        (torch.tensor(0.3).item(), 0.3),  # 0.30000001192092896
        (0.1 * 3, 0.3),
    ],
    ids=["float32", "0.2*3", "linspace", "tensor.item", "0.1*3"],
)
def test_float_noise_finds_the_depth_and_its_statistics(value: float, depth: float) -> None:
    model = _recalibrated((0.3, 0.6, 1.0))
    reference = model.set_scaling_factor(depth)(X)
    model.set_scaling_factor(1.0)
    assert model.set_scaling_factor(value).scaling_factor == depth
    assert torch.equal(model(X), reference)
    assert model.flops(value) == model.flops_table()[depth]
    assert depth_key(value) == str(depth)  # the one key of every JSON entry and statistics file


def test_numpy_integers_are_block_counts() -> None:
    model = _resnet()
    assert model.set_depth(np.array([1, 2, 1, 2], dtype=np.int64).tolist()).active_depth == [1, 2, 1, 2]
    assert model.set_depth([np.int64(1), np.int32(2), 1, 2]).active_depth == [1, 2, 1, 2]


# ---------------------------------------------------------------------- threads


def test_scaled_is_safe_across_threads() -> None:
    model = _recalibrated()
    expected = {s: model.set_scaling_factor(s)(X) for s in (0.25, 1.0)}
    wrong: list[float] = []

    def serve(s: float) -> None:
        for _ in range(15):
            with torch.no_grad(), model.scaled(s):
                out = model(X)
            if not torch.equal(out, expected[s]):
                wrong.append(s)

    threads = [threading.Thread(target=serve, args=(s,)) for s in (0.25, 1.0, 0.25, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_state_dict_save_and_deepcopy_wait_for_threads_inside_scaled(tmp_path: Path) -> None:
    model = _recalibrated()
    expected = {s: model.set_scaling_factor(s)(X) for s in (0.25, 1.0)}  # ends at s = 1, the model's own depth
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    served, done = [], threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that a missing lock shows within a few calls

    def serve() -> None:
        try:
            for _ in range(15):
                with torch.no_grad(), model.scaled(0.25):
                    served.append(torch.equal(model(X), expected[0.25]))
        finally:
            done.set()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        states, copies, saves = [], [], 0
        while not done.is_set():
            sd = model.state_dict()
            states.append(all(torch.equal(sd[k], v) for k, v in trained.items()))
            with torch.no_grad():
                copies.append(torch.equal(copy.deepcopy(model)(X), expected[1.0]))
            if saves < 3:
                model.save_pretrained(tmp_path)
                saves += 1
    finally:
        thread.join()
        sys.setswitchinterval(interval)
    assert all(served) and all(states) and all(copies), (served.count(False), states.count(False), copies.count(False))
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.scaling_factor == 1.0 and torch.equal(again(X), expected[1.0])


# ---------------------------------------------------------------------- saving and loading


def test_failed_save_leaves_the_previous_save_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _recalibrated()
    first.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved_files, "save_model", full_disk)
    second = _resnet((0.5, 1.0))
    with pytest.raises(OSError, match="No space"):
        second.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing changed, nothing left over
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert torch.equal(again.set_scaling_factor(0.25)(X), first.set_scaling_factor(0.25)(X))


def test_save_to_a_file_path_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_text("mine")
    with pytest.raises(CheckpointError, match="is a file"):
        _resnet().save_pretrained(path)
    assert path.read_text() == "mine"


class _Net(nn.Module):
    """A custom module: a stem and four residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[_Residual() for _ in range(4)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


@pytest.mark.parametrize("damage", ["weights", "config-blocks", "norm-file"])
def test_failed_load_leaves_the_passed_model_untouched(tmp_path: Path, damage: str) -> None:
    saved = AdaptiveDepth.wrap(_Net(), input_size=[3, 16, 16])
    saved.save_pretrained(tmp_path)
    if damage == "weights":
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / "model.safetensors")
        tensors.pop("blocks.3.conv.weight")
        save_file(tensors, tmp_path / "model.safetensors")
    elif damage == "config-blocks":
        config = json.loads((tmp_path / "config.json").read_text())
        config["stages"][0]["blocks"][1]["name"] = "blocks.9"
        (tmp_path / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["norm_stats"] = [0.5]
        (tmp_path / "config.json").write_text(json.dumps(config))
    mine = _Net()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(CheckpointError):
        AdaptiveDepth.from_pretrained(tmp_path, model=mine)
    assert not is_gated(mine)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    AdaptiveDepth.wrap(mine, input_size=[3, 16, 16])  # still a plain module: it can be wrapped (or loaded) again


# ---------------------------------------------------------------------- hand-edited configs


def _edit(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["stages"][1]["blocks"].pop(),  # a block dropped: it would always run
        lambda c: c["stages"][0]["blocks"].append(c["stages"][1]["blocks"].pop(0)),  # moved between stages
        lambda c: c.update(norm_stats=[]),  # per-depth statistics silently dropped
        lambda c: c.update(policy="spread"),  # other blocks than those recalibrated
    ],
    ids=["block-dropped", "block-moved", "norm-stats-emptied", "policy-changed"],
)
def test_edited_configs_are_refused(tmp_path: Path, edit) -> None:
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("resnet50", num_classes=5), input_size=[3, 32, 32])  # [3, 4, 6, 3]
    model.recalibrate_norms(_batches(), [0.5, 1.0])
    model.save_pretrained(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(CheckpointError, match="edited"):
        AdaptiveDepth.from_pretrained(tmp_path)


def test_free_fields_of_the_config_may_be_edited(tmp_path: Path) -> None:
    _recalibrated().save_pretrained(tmp_path)
    _edit(tmp_path, lambda c: c.update(default_scaling_factor=0.5, scaling_factors=[0.5, 1.0]))
    assert AdaptiveDepth.from_pretrained(tmp_path).scaling_factor == 0.5


def test_flops_follow_an_edited_input_size_and_labels_may_be_a_list(tmp_path: Path) -> None:
    model = _resnet()
    at_32 = model.flops_table()
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda c: c.update(input_size=[3, 64, 64], id2label=["a", "b", "c", "d", "e"]))
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.id2label == dict(enumerate("abcde"))
    at_64 = again.flops_table()  # counted again at the edited size, not the cache of 32 px
    assert at_64 == {s: again.flops(s) for s in at_64}
    assert all(3.5 < at_64[s] / at_32[s] < 4.5 for s in at_32)
    assert again.set_budget(max_flops=at_64[1.0] - 1) < 1.0  # the 32 px counts would all fit: s = 1


def test_a_flops_cache_counted_without_attention_is_counted_again(tmp_path: Path) -> None:
    """FLOPs counted before the CPU's attention kernel was counted (no ``flops_revision``) would mix with new
    counts: a model loaded with such a cache counts every depth again."""
    model = AdaptiveDepth.from_pretrained("test_vit", pretrained=False, num_classes=3, depth=2)
    counted = model.flops_table()
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda c: (c.pop("flops_revision"), c["flops"].update({k: 1.0 for k in c["flops"]})))
    assert AdaptiveDepth.from_pretrained(tmp_path).flops_table() == counted


def test_attention_counts_its_flops_on_the_cpu() -> None:
    """PyTorch's counter has no formula for the CPU's fused attention kernel and would count it as 0 FLOPs."""
    from adaptive_depth.flops import count_flops

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    batch, heads, tokens, channels = 2, 3, 10, 8
    scores_and_mix = 2 * (2 * batch * heads * tokens * tokens * channels)  # two matmuls, a multiply-add is 2
    assert count_flops(Attention(), torch.randn(batch, heads, tokens, channels)) == scores_and_mix


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(base_model=None), "base_model"),
        (lambda c: c["base_model"].update(model_args={"no_such_arg": 1}), "model_args"),
        (lambda c: c["base_model"].update(architecture="resnet_does_not_exist"), "does not have"),
        (lambda c: c.update(format_version="1"), "positive integer"),
        (lambda c: c.update(stages="layer1"), "stages"),
        (lambda c: c.update(input_size="332"), "input_size"),
        (lambda c: c.update(input_size=[3, 32.5, 32]), "input_size"),
        (lambda c: c["flops"].update({"1.0": float("nan")}), "finite, non-negative"),
        (lambda c: c["flops"].update({"1.0": "296e6"}), "finite, non-negative"),
        (lambda c: c["flops"].update({"1.0": -1}), "finite, non-negative"),
        (lambda c: c["flops"].update({"2": 1e6}), "no scaling factor"),
        (lambda c: c.update(id2label={"cat": "0"}), "class indices"),
    ],
    ids=[
        "base-model-null",
        "bad-model-args",
        "unknown-architecture",
        "format-version-string",
        "stages-string",
        "input-size-string",
        "input-size-float",
        "flops-nan",
        "flops-string",
        "flops-negative",
        "flops-bad-depth",
        "labels-by-name",
    ],
)
def test_broken_configs_raise_library_errors(tmp_path: Path, edit, match: str) -> None:
    _resnet().save_pretrained(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(AdaptiveDepthError, match=match):
        AdaptiveDepth.from_pretrained(tmp_path)


def test_wrapping_twice_scripted_modules_and_file_paths_are_library_errors(tmp_path: Path) -> None:
    model = _resnet()
    with pytest.raises(ConfigError, match="already has depth gates"):
        AdaptiveDepth.wrap(model.model)
    scripted = torch.jit.trace(_Net().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="TorchScript"):
        AdaptiveDepth.wrap(scripted)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnknownModelError, match="is a file"):
        AdaptiveDepth.from_pretrained(tmp_path / "model.safetensors")
