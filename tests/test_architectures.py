"""Every listed architecture: exact at full depth, cheaper below it, saved and exported faithfully."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cases import CASES, DISCOVERY_DIGESTS, Case, discovery_digest

from adaptive_depth import AdaptiveDepth, DepthGate


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected output {type(output).__name__}")


def _count_block_calls(model: AdaptiveDepth, x: torch.Tensor) -> int:
    calls = []
    gates = [m for m in model.modules() if isinstance(m, DepthGate)]
    handles = [g.base_layer.register_forward_pre_hook(lambda *_: calls.append(1)) for g in gates]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(scope="module")
def pair(case: Case):
    return case.pair()


def test_discovery_result_is_pinned(case: Case, pair) -> None:
    _, model = pair
    stages = [(st.name, st.kind, [b.name for b in st.blocks]) for st in model.stages]
    assert discovery_digest(model.config) == DISCOVERY_DIGESTS[case.id], f"discovery changed: {stages}"


def test_full_depth_is_bitwise_identical(case: Case, pair) -> None:
    base, model = pair
    x = case.example()
    with torch.no_grad():
        expected, got = base(x), model.set_scaling_factor(1.0)(x)
    assert type(got) is type(expected)
    assert torch.equal(_logits(got), _logits(expected))


def test_shallower_depths_run_fewer_blocks_and_flops(case: Case, pair) -> None:
    _, model = pair
    x = case.example()
    gateable = sum(st.num_blocks - st.num_fixed for st in model.stages)
    full_runs = _count_block_calls(model.set_scaling_factor(1.0), x)
    assert full_runs == gateable
    full_flops = model.flops(1.0)
    with torch.no_grad():
        full_shape = _logits(model(x)).shape
    previous_runs, previous_flops = full_runs, full_flops
    for s in (0.75, 0.5, 0.25):
        model.set_scaling_factor(s)
        runs = _count_block_calls(model, x)
        fixed = sum(st.num_fixed for st in model.stages)
        assert runs == sum(model.depth_for(s)) - fixed  # exactly the policy's blocks run, no more
        flops = model.flops()
        assert runs <= previous_runs and flops <= previous_flops
        with torch.no_grad():
            assert _logits(model(x)).shape == full_shape
        previous_runs, previous_flops = runs, flops
    assert previous_runs < full_runs, "s = 0.25 must skip at least one block"
    assert previous_flops < full_flops
    model.set_scaling_factor(1.0)


def test_save_load_round_trip(case: Case, pair, tmp_path: Path) -> None:
    _, model = pair
    x = case.example()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = AdaptiveDepth.from_pretrained(tmp_path)
    assert loaded.config.stages == model.config.stages
    for s in (1.0, 0.5, 0.25):
        with torch.no_grad():
            expected = _logits(model.set_scaling_factor(s)(x))
            got = _logits(loaded.set_scaling_factor(s)(x))
        assert torch.equal(got, expected), f"s={s}"
    model.set_scaling_factor(1.0)


def test_export_matches_gated_model(case: Case, pair) -> None:
    _, model = pair
    x = case.example()
    for s in (0.5, 0.25):
        plain = model.export(s).eval()
        assert not any(isinstance(m, DepthGate) for m in plain.modules())
        n_params = sum(p.numel() for p in plain.parameters())
        with torch.no_grad():
            expected = _logits(model.set_scaling_factor(s)(x))
            got = _logits(plain(x))
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), f"s={s}"
        assert n_params < sum(p.numel() for p in model.parameters())
    model.set_scaling_factor(1.0)
