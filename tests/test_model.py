"""AdaptiveDepth behaviour on one small model: switching, policies, overrides, gates, config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from adaptive_depth import (
    AdaptiveDepth,
    AdaptiveDepthConfig,
    ConfigError,
    DepthGate,
    DepthSpecError,
    NoGateableBlocksError,
    ScalingFactorError,
)


@pytest.fixture(scope="module")
def resnet() -> AdaptiveDepth:
    return AdaptiveDepth.from_pretrained("resnet50", pretrained=False, num_classes=10, input_size=(3, 64, 64)).eval()


def test_resnet50_structure_and_depths(resnet: AdaptiveDepth) -> None:
    assert [(st.name, st.num_blocks, st.num_fixed) for st in resnet.stages] == [
        ("layer1", 3, 1),
        ("layer2", 4, 1),
        ("layer3", 6, 1),
        ("layer4", 3, 1),
    ]
    assert resnet.set_scaling_factor(0.5).active_depth == [2, 2, 3, 2]
    assert resnet.scaling_factor == 0.5
    assert resnet.set_scaling_factor(0.25).active_depth == [1, 1, 2, 1]
    resnet.set_scaling_factor(1.0)


def test_set_depth_explicit_counts(resnet: AdaptiveDepth) -> None:
    resnet.set_depth([1, 2, 3, 1])
    assert resnet.active_depth == [1, 2, 3, 1]
    assert resnet.scaling_factor is None
    assert not resnet.model.layer4[1].active and resnet.model.layer3[2].active and not resnet.model.layer3[3].active
    resnet.set_scaling_factor(1.0)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", None, True, [0.5]])
def test_bad_scaling_factors(resnet: AdaptiveDepth, bad) -> None:
    with pytest.raises(ScalingFactorError, match="scaling factor") as info:
        resnet.set_scaling_factor(bad)
    assert isinstance(info.value, ValueError)
    assert resnet.active_depth == [3, 4, 6, 3]  # a refused value changes nothing


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, 2, 3], "4 stages"),
        ([1, 2, 3, 4, 5], "4 stages"),
        ([0, 2, 3, 1], "can run 1..3"),
        ([1, 2, 7, 1], "can run 1..6"),
        ([1, 2, 2.5, 1], "got 2.5"),
        ("1231", "one block count per stage"),
    ],
)
def test_bad_depth_lists(resnet: AdaptiveDepth, bad, message: str) -> None:
    with pytest.raises(DepthSpecError, match=message):
        resnet.set_depth(bad)


def test_switching_moves_no_weights(resnet: AdaptiveDepth) -> None:
    before = {k: v.data_ptr() for k, v in resnet.state_dict().items()}
    for s in (0.25, 0.5, 1.0):
        resnet.set_scaling_factor(s)
    assert {k: v.data_ptr() for k, v in resnet.state_dict().items()} == before


def test_skipped_block_is_never_called(resnet: AdaptiveDepth) -> None:
    block = resnet.model.layer3[5].base_layer
    called = []
    handle = block.register_forward_pre_hook(lambda *_: called.append(True))
    with torch.no_grad(), resnet.scaled(0.5):
        resnet(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert called == [] and resnet.scaling_factor == 1.0


def test_state_dict_has_the_plain_model_keys(resnet: AdaptiveDepth) -> None:
    plain = timm.create_model("resnet50", num_classes=10)
    assert list(resnet.model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(resnet.model.state_dict())  # and loads into it, strictly


def test_spread_policy_on_a_vit() -> None:
    model = AdaptiveDepth.from_pretrained(
        "vit_tiny_patch16_224", pretrained=False, policy="spread", img_size=32, patch_size=8, depth=8
    )
    model.set_scaling_factor(0.5)
    gates = [m for m in model.model.blocks]
    assert [g.active for g in gates] == [True, False] * 4
    assert model.config.policy == "spread"


def test_depth_summary_lists_stages_and_flops(resnet: AdaptiveDepth) -> None:
    summary = resnet.depth_summary()
    for text in ("layer1", "layer4", "GFLOPs", "[2, 2, 3, 2]", "discovery: metadata"):
        assert text in summary
    flops = resnet.flops_table()
    assert flops[0.25] < flops[0.5] < flops[0.75] < flops[1.0]


def test_plain_conv_stack_is_refused() -> None:
    vgg_like = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    with pytest.raises(NoGateableBlocksError, match="nothing to gate"):
        AdaptiveDepth.wrap(vgg_like, input_size=(3, 16, 16))


def test_a_norm_layer_is_no_block_however_large_its_input() -> None:
    """A zeroed BatchNorm outputs zeros; with inputs of 1e5 and more (random-weight HRNet's fuse layers, MobileOne)
    relu6 of them fell within the tolerance of zeros, and BatchNorms were taken for residual blocks."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    nn.init.normal_(conv.weight, std=1e5)
    stack = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    with pytest.raises(NoGateableBlocksError, match="nothing to gate"):
        AdaptiveDepth.wrap(nn.Sequential(stack, nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=(3, 16, 16))


def test_timm_vgg_is_refused() -> None:
    with pytest.raises(NoGateableBlocksError, match="VGG"):
        AdaptiveDepth.from_pretrained("vgg11", pretrained=False, input_size=(3, 32, 32))


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Custom(nn.Module):
    """A user model: residual blocks held in plain attributes, and a non-residual same-shape layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.a, self.b, self.c = _Residual(16), _Residual(16), _Residual(16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.c(self.b(self.a(self.embed(x.flatten(1)))))))


def test_generic_probe_finds_blocks_of_a_custom_module(tmp_path: Path) -> None:
    model = AdaptiveDepth.wrap(_Custom(), input_size=(1, 2, 2)).eval()
    assert model.config.discovery == "probe"
    names = [b.name for st in model.stages for b in st.blocks if b.gateable]
    assert names == ["a", "b", "c"]
    x = torch.randn(3, 1, 2, 2)
    model.set_scaling_factor(0.5)
    expected = model(x)
    model.save_pretrained(tmp_path)
    from adaptive_depth import CheckpointError

    with pytest.raises(CheckpointError, match="model=MyModel"):
        AdaptiveDepth.from_pretrained(tmp_path)
    again = AdaptiveDepth.from_pretrained(tmp_path, model=_Custom())
    assert torch.equal(again(x), expected)


def test_a_wrap_that_can_save_little_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="adaptive_depth"):
        model = AdaptiveDepth.wrap(_Custom(), input_size=(1, 2, 2))
    assert not caplog.records
    assert "at most 68% can be saved" in model.depth_summary()  # the three residual blocks off: embed runs
    heavy = _Custom()
    heavy.head = nn.Sequential(nn.Linear(16, 4096), nn.Linear(4096, 3))  # the compute sits outside the blocks
    with caplog.at_level("WARNING", logger="adaptive_depth"):
        model = AdaptiveDepth.wrap(heavy, input_size=(1, 2, 2))
    assert "only 1% of _Custom's FLOPs can be skipped (gateable blocks: <root> 3/4)" in caplog.text
    assert model.fewest_blocks_flops_ratio() == pytest.approx(0.99, abs=0.005)


def test_block_patterns_override_discovery() -> None:
    model = AdaptiveDepth.wrap(_Custom(), input_size=(1, 2, 2), block_patterns=[r"a|b"])
    assert model.config.discovery == "override"
    assert [b.name for st in model.stages for b in st.blocks if b.gateable] == ["a", "b"]
    with pytest.raises(ConfigError, match="invalid regex"):
        AdaptiveDepth.wrap(_Custom(), input_size=(1, 2, 2), block_patterns=["(a"])
    with pytest.raises(NoGateableBlocksError, match="no module matched"):
        AdaptiveDepth.wrap(_Custom(), input_size=(1, 2, 2), block_patterns=["nothing"])


def test_gate_off_returns_input_in_the_block_structure() -> None:
    from adaptive_depth import BlockSpec

    gate = DepthGate(nn.Identity(), BlockSpec("x", output="tuple", output_len=3))
    gate.active = False
    x = torch.randn(2)
    out = gate(x, "ignored", flag=True)
    assert out[0] is x and out[1:] == (None, None)
    kw_gate = DepthGate(nn.Identity(), BlockSpec("y", input_kwarg="hidden_states"))
    kw_gate.active = False
    assert kw_gate(hidden_states=x) is x


def test_config_round_trips_and_rejects_bad_values(resnet: AdaptiveDepth, tmp_path: Path, caplog) -> None:
    path = tmp_path / "config.json"
    resnet.config.save(path)
    assert AdaptiveDepthConfig.load(path) == resnet.config
    data = json.loads(path.read_text())
    assert list(data) == sorted(data)
    data["from_the_future"] = 1
    assert AdaptiveDepthConfig.from_dict(data) == resnet.config
    assert "from_the_future" in caplog.text
    for key, value, message in [
        ("policy", "middle", "policy must be one of"),
        ("scaling_factors", [0.5, 2.0], "scaling factor"),
        ("scaling_factors", [], "at least one"),
        ("input_size", [3, 64], "input_size"),
        ("format_version", 99, "newer"),
        ("stages", [], "at least one stage"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdaptiveDepthConfig.from_dict({**data, key: value})
    assert math.isclose(AdaptiveDepthConfig.from_dict(data).scaling_factors[0], 0.25)


def test_counting_flops_in_train_mode_leaves_batchnorm_statistics_alone(resnet: AdaptiveDepth) -> None:
    resnet.train()
    before = {k: v.clone() for k, v in resnet.state_dict().items() if "running" in k}
    resnet.config.flops.clear()
    resnet.flops_table()
    assert resnet.training
    assert all(torch.equal(resnet.state_dict()[k], v) for k, v in before.items())
    resnet.eval()


def test_device_and_dtype_moves_keep_the_gates(resnet: AdaptiveDepth) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.set_scaling_factor(0.5)(x).double()
        model.to(torch.float64)
        assert model.active_depth == [1, 1, 1, 1]
        assert torch.allclose(model(x.double()), expected, atol=1e-4)


def test_wrapping_a_training_model_changes_none_of_its_state() -> None:
    base = timm.create_model("resnet18", num_classes=3).train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = AdaptiveDepth.wrap(base, input_size=(3, 32, 32))
    assert model.training and base.training
    assert len(model.stages) == 4  # layer4 runs at 1x1: probing in train mode would make BatchNorm fail there
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
