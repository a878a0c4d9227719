"""Residual branches: the exact test that finds them, gating them, and what they change in configs and exports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, Case
from torch import nn

from adaptive_depth import (
    AdaptiveDepth,
    AdaptiveDepthConfig,
    BaseModelRef,
    BlockSpec,
    ConfigError,
    DepthGate,
    StageSpec,
)
from adaptive_depth.branches import find_branches
from adaptive_depth.export import ZeroBranch

TINY_VIT = next(c for c in CASES if c.id == "timm/tiny_vit_5m_224")
REPVIT = next(c for c in CASES if c.id == "timm/repvit_m0_9")


def _branches(model: nn.Module, x: torch.Tensor, candidates: set[str], blocks: set[str]) -> set[str]:
    with torch.no_grad():
        return {b.name for b in find_branches(model.eval(), x, candidates, blocks)}


# ---------------------------------------------------------------------- the test on real blocks
def test_tiny_vit_attn_and_mlp_are_branches_and_local_conv_is_not() -> None:
    _, model = TINY_VIT.pair()
    plain = model.export(1.0)
    block = "stages.1.blocks.0"
    candidates = {
        f"{block}.{m}" for m in ("attn", "attn.norm", "attn.proj", "mlp", "mlp.norm", "mlp.fc2", "local_conv")
    }
    found = _branches(plain, TINY_VIT.example(1), candidates, {block, f"{block}.attn", f"{block}.mlp"})
    # attn.proj and mlp.fc2 end the branches (nested: discovery gates the outermost), the norms feed a linear layer
    assert found == {f"{block}.{m}" for m in ("attn", "attn.proj", "mlp", "mlp.fc2")}
    names = {b.name for st in model.stages if st.kind == "branch" for b in st.blocks}
    assert names == {f"stages.{i}.blocks.{j}.{m}" for i in (1, 2, 3) for j in (0, 1) for m in ("attn", "mlp")}


def test_repvit_channel_mixer_is_a_branch_and_the_repvgg_token_mixer_is_not() -> None:
    _, model = REPVIT.pair()
    plain = model.export(1.0)
    block = "stages.1.blocks.0"
    parts = ("token_mixer", "token_mixer.conv", "token_mixer.conv1", "token_mixer.bn", "se", "channel_mixer")
    candidates = {f"{block}.{m}" for m in parts}
    # conv(x) + conv1(x) + x: each conv is added to the other, a tensor computed beside it, then a BatchNorm follows
    assert _branches(plain, REPVIT.example(1), candidates, {block, f"{block}.token_mixer"}) == {
        f"{block}.channel_mixer"
    }


class _Block(nn.Module):
    """``post(x + tail(f(x)))``: no identity path as a whole (``post``), one candidate branch ``f``."""

    def __init__(self, tail: str, dim: int = 6) -> None:
        super().__init__()
        self.tail = tail
        self.f = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)
        self.post = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.bias = nn.Parameter(torch.ones(dim))
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.tail == "sibling":  # RepVGG: the other operand was computed beside f, from the same input
            other = self.g(x)
            return self.post(other + self.f(x))
        if self.tail == "fresh":  # the other operand was computed after f started
            h = self.f(x)
            return self.post(h + self.g(x))
        h = self.f(x)
        extra = 0.0
        if self.tail == "scale":
            h = self.gamma * h  # LayerScale
        elif self.tail == "dropout":
            h = F.dropout(h, 0.1, self.training)
        elif self.tail == "views":
            h = h.reshape(x.shape[0], 2, 3).transpose(1, 2).contiguous().transpose(1, 2).reshape(x.shape)
        elif self.tail == "gelu":
            h = F.gelu(h)  # gelu(0) == 0
        elif self.tail == "sigmoid":
            h = torch.sigmoid(h)  # sigmoid(0) == 0.5
        elif self.tail == "bias":
            h = h + self.bias
        elif self.tail == "norm":
            h = F.layer_norm(h, h.shape[-1:])
        elif self.tail == "scalar":
            h = h + 1.0
        elif self.tail == "second_use":
            extra = h.mean()
        elif self.tail == "stored":
            self.kept = h
        elif self.tail == "alpha":
            return self.post(torch.add(shortcut, h, alpha=2.0))
        elif self.tail == "inplace":
            h += shortcut
            return self.post(h)
        return self.post(shortcut + h) + extra


@pytest.mark.parametrize(
    ("tail", "is_branch"),
    [
        ("identity", True),
        ("scale", True),
        ("dropout", True),
        ("views", True),
        ("inplace", True),
        ("gelu", True),
        ("sigmoid", False),
        ("bias", False),
        ("norm", False),
        ("scalar", False),
        ("second_use", False),
        ("stored", False),
        ("alpha", False),
        ("sibling", False),
        ("fresh", False),
    ],
)
def test_a_branch_reaches_the_residual_add_through_zero_preserving_ops_only(tail: str, is_branch: bool) -> None:
    model = nn.Sequential(_Block(tail))
    x = torch.randn(4, 6)
    assert _branches(model, x, {"0.f"}, {"0"}) == ({"0.f"} if is_branch else set())


class _Parallel(nn.Module):
    """RepVGG's ``conv_1x1(x) + conv_kxk(x)`` with the norm of one path a module of its own: no shortcut."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.a, self.b, self.norm, self.post = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.a(x)
        return self.post(other + self.norm(self.b(x)))  # norm's input comes from x, not from ``other``


def test_a_sibling_path_is_no_shortcut_even_for_the_last_layer_of_the_other_path() -> None:
    model = nn.Sequential(_Parallel())
    assert _branches(model, torch.randn(4, 6), {"0.a", "0.b", "0.norm"}, {"0"}) == set()


def test_the_add_must_run_in_a_block_that_holds_the_branch() -> None:
    model = nn.Sequential(_Block("identity"))
    assert _branches(model, torch.randn(4, 6), {"0.f"}, set()) == set()


class _Stage(nn.Module):
    """Three ``_Block``s: a stage of three branches, each skipped exactly when its gate is off."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block("scale", 3), _Block("identity", 3), _Block("dropout", 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def test_a_custom_model_is_gated_branch_by_branch_and_a_skip_is_exact() -> None:
    base = _Stage().eval()
    model = AdaptiveDepth.wrap(_Stage(), input_size=(1, 2, 3)).eval()
    model.model.load_state_dict(base.state_dict())
    assert [(st.name, st.kind, [b.name for b in st.blocks]) for st in model.stages] == [
        ("blocks", "branch", ["blocks.0.f", "blocks.1.f", "blocks.2.f"])
    ]
    x = torch.randn(5, 1, 2, 3)
    with torch.no_grad():
        assert torch.equal(model.set_scaling_factor(1.0)(x), base(x))
        for layer in (base.blocks[1].f, base.blocks[2].f):  # zero weights: exactly a branch that adds nothing
            layer.weight.zero_()
            layer.bias.zero_()
        assert torch.equal(model.set_scaling_factor(0.25)(x), base(x))
    assert "branches" in model.depth_summary()


# ---------------------------------------------------------------------- gating real models
@pytest.mark.parametrize(
    ("case", "last_layers"),
    [(TINY_VIT, {"attn": "proj", "mlp": "fc2"}), (REPVIT, {"channel_mixer": "conv2.bn"})],
    ids=["tiny_vit", "repvit"],
)
def test_a_skipped_branch_is_exactly_the_branch_adding_zeros(case: Case, last_layers: dict[str, str]) -> None:
    base, model = case.pair()
    model.set_scaling_factor(0.5)
    off = [
        (name, gate) for name, gate in model.model.named_modules() if isinstance(gate, DepthGate) and not gate.active
    ]
    assert any(gate.zeros_when_off for _, gate in off)
    for name, gate in off:
        if gate.zeros_when_off:  # zero weights in the branch's last layer: the branch adds exact zeros
            last = base.get_submodule(f"{name}.{last_layers[name.rpartition('.')[2]]}")
            for p in last.parameters():
                p.data.zero_()
        else:  # a skipped whole block (TinyViT's MBConv) is the identity
            parent, _, child = name.rpartition(".")
            base.get_submodule(parent)._modules[child] = nn.Identity()
    x = case.example()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("case", [TINY_VIT, REPVIT], ids=["tiny_vit", "repvit"])
def test_branch_gated_depths_recalibrate_batchnorm_per_depth(case: Case) -> None:
    _, model = case.pair()
    batches = [case.example(4) for _ in range(2)]
    seen = model.recalibrate_norms(batches)
    assert set(seen) == set(model.config.scaling_factors)
    x = case.example()
    with torch.no_grad():
        half = model.set_scaling_factor(0.5)(x)
        model.depth_norms.use(None)  # the statistics of training
        assert not torch.equal(half, model(x))


@pytest.mark.filterwarnings("ignore:The tensor attributes")  # timm TinyViT caches its attention biases
def test_a_branch_export_holds_zero_branches_and_runs_under_torch_export() -> None:
    _, model = TINY_VIT.pair()
    plain = model.export(0.25).eval()
    zeros = [n for n, m in plain.named_modules() if isinstance(m, ZeroBranch)]
    assert "stages.2.blocks.1.mlp" in zeros and not any(isinstance(m, ZeroBranch) for m in model.export(1.0).modules())
    x = TINY_VIT.example()
    program = torch.export.export(plain, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model.set_scaling_factor(0.25)(x), atol=1e-5, rtol=1e-4)


def test_save_export_of_skipped_branches_is_refused_and_names_save_pretrained(tmp_path: Path) -> None:
    _, model = REPVIT.pair()
    with pytest.raises(ConfigError, match=r"skips residual branches.*save_pretrained\(\)"):
        model.save_export(tmp_path / "half", 0.5)
    assert not (tmp_path / "half").exists()
    _, tiny_vit = TINY_VIT.pair()  # only its block stage shallower: still not a depth timm can describe
    with pytest.raises(ConfigError, match="gates residual branches inside blocks in some stages"):
        tiny_vit.save_export(tmp_path / "blocks", depth=[1, 4, 4, 4])


def test_depth_summary_says_which_stages_gate_branches() -> None:
    _, model = TINY_VIT.pair()
    rows = {line.split()[0]: line.split()[1] for line in model.depth_summary().splitlines() if "stages." in line}
    assert rows == {
        "stages.0.blocks": "blocks",
        "stages.1.blocks": "branches",
        "stages.2.blocks": "branches",
        "stages.3.blocks": "branches",
    }


# ---------------------------------------------------------------------- configs
def _config(stages: list[StageSpec]) -> AdaptiveDepthConfig:
    return AdaptiveDepthConfig(base_model=BaseModelRef(source="module"), stages=stages)


def test_a_config_saved_before_branches_existed_loads_as_blocks_with_the_same_digest(tmp_path: Path) -> None:
    old = _config([StageSpec("layer1", [BlockSpec("layer1.0", gateable=False), BlockSpec("layer1.1")])])
    data = old.to_dict()
    for stage in data["stages"]:
        for block in stage["blocks"]:
            del block["kind"]  # the format of before
    legacy = {"stages": [asdict(s) for s in old.stages], "policy": old.policy, "norm_stats": []}
    for stage in legacy["stages"]:
        for block in stage["blocks"]:
            del block["kind"]
    loaded = AdaptiveDepthConfig.from_dict(data)
    assert [b.kind for b in loaded.stages[0].blocks] == ["block", "block"]
    expected = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:32]
    assert loaded.structure_digest() == expected == old.structure_digest()


def test_branch_kind_round_trips_and_counts_in_the_digest(tmp_path: Path) -> None:
    stages = [StageSpec("blocks", [BlockSpec("blocks.0.f", kind="branch"), BlockSpec("blocks.1.f", kind="branch")])]
    config = _config(stages)
    config.save(tmp_path / "config.json")
    again = AdaptiveDepthConfig.load(tmp_path / "config.json")
    assert again.stages == config.stages and again.stages[0].kind == "branch" and again.gates_branches
    as_blocks = _config([StageSpec("blocks", [BlockSpec("blocks.0.f"), BlockSpec("blocks.1.f")])])
    assert as_blocks.structure_digest() != config.structure_digest()


def test_invalid_branch_specs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="kind must be one of"):
        BlockSpec("a", kind="layer")
    with pytest.raises(ConfigError, match="must be gateable and return a tensor"):
        BlockSpec("a", kind="branch", gateable=False)
    with pytest.raises(ConfigError, match="mixes blocks and branches"):
        StageSpec("s", [BlockSpec("s.0"), BlockSpec("s.1.f", kind="branch")])


@pytest.mark.parametrize("scale", [1e-4, 1.0])
def test_a_gate_is_no_residual_block_however_small_its_input(scale: float) -> None:
    """With zero weights squeeze-excitation returns x / 2, which is SiLU and GELU near zero: random-weight
    EfficientNet-B3 (activations below 1e-3 in its last stage) had its SE modules gated as blocks, in some draws."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    from adaptive_depth.probe import is_residual, probe

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.silu(x + self.conv(x))

    net = nn.Sequential(SqueezeExcite(16), Residual()).eval()
    calls = probe(net, torch.randn(1, 16, 8, 8) * scale)
    assert not is_residual(net[0], calls["0"])
    assert is_residual(net[1], calls["1"])  # a residual block with a trailing SiLU still passes at any scale
