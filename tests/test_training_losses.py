"""The cooperative objective, term by term, against values computed by hand; the training config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_depth.errors import ConfigError, ScalingFactorError
from adaptive_depth.training.config import TrainingConfig
from adaptive_depth.training.losses import CooperativeLogits, cooperative_loss, kd_loss, sfsl_weights
from adaptive_depth.training.players import CooperativeModel
from adaptive_depth.training.recipes import recipe_config


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kd(student: list[float], teacher: list[float], t: float) -> float:
    p, q = _softmax(student, t), _softmax(teacher, t)
    return t * t * sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))


def _ce(z: list[float], label: int) -> float:
    return -math.log(_softmax(z)[label])


def test_kd_loss_matches_hand_computed_value() -> None:
    # softmax([ln 3, 0]) = [.75, .25] against uniform: KL = .75 ln 1.5 + .25 ln .5
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    # tau = 2 softens the teacher to [sqrt3, 1] / (sqrt3 + 1) and multiplies by tau^2 = 4
    q = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q)))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_detaches_the_teacher() -> None:
    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    teacher = torch.tensor([[0.3, 0.1, -1.0]], requires_grad=True)
    assert kd_loss(z, z.detach().clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    kd_loss(z, teacher, 2.0).backward()
    assert teacher.grad is None and z.grad is not None


def test_sfsl_weights() -> None:
    w = sfsl_weights([0.25, 0.5, 0.75, 1.0], gamma=1.0)
    mean = (4 + 2 + 4 / 3) / 3
    assert w == pytest.approx({0.25: 4 / mean, 0.5: 2 / mean, 0.75: (4 / 3) / mean})
    assert sum(w.values()) / len(w) == pytest.approx(1.0)
    assert sfsl_weights([0.25, 0.5, 1.0], gamma=0.0) == {0.25: 1.0, 0.5: 1.0}
    assert sfsl_weights([1.0], gamma=1.0) == {}


# One image, two classes, label 0, depths {0.5, 1}.
A = {1.0: [2.0, 0.0], 0.5: [0.5, 0.2]}
B = {1.0: [1.0, 1.0], 0.5: [-0.5, 0.0]}
L = [3.0, -1.0]


def _logits(leader: bool = True, teammates: int = 2) -> CooperativeLogits:
    players = [A, B][:teammates]
    return CooperativeLogits(
        teammates=[{s: torch.tensor([z]) for s, z in p.items()} for p in players],
        leader=torch.tensor([L]) if leader else None,
    )


def _config(**kw: object) -> TrainingConfig:
    """The paper's full objective (two Teammates), with ``kw`` switched."""
    return recipe_config("paper", **{"scaling_factors": [0.5, 1.0], "temperature": 2.0} | kw)  # type: ignore[arg-type]


def test_full_objective_matches_hand_computed_total() -> None:
    t = 2.0
    out = cooperative_loss(_logits(), torch.tensor([0]), _config(), ramp=1.0)
    expected_terms = {
        "leader/ce": _ce(L, 0),
        "A/s=1/ce": _ce(A[1.0], 0),
        "A/s=1/guided": _kd(A[1.0], L, t),
        "A/s=1/interactive": _kd(A[1.0], B[1.0], t),
        "A/s=0.5/self": _kd(A[0.5], A[1.0], t),
        "A/s=0.5/interactive": _kd(A[0.5], B[1.0], t),
        "A/s=0.5/ce": _ce(A[0.5], 0),
        "B/s=1/ce": _ce(B[1.0], 0),
        "B/s=1/guided": _kd(B[1.0], L, t),
        "B/s=1/interactive": _kd(B[1.0], A[1.0], t),
        "B/s=0.5/self": _kd(B[0.5], B[1.0], t),
        "B/s=0.5/interactive": _kd(B[0.5], A[1.0], t),
        "B/s=0.5/ce": _ce(B[0.5], 0),
    }
    assert set(out.terms) == set(expected_terms)
    for key, value in expected_terms.items():
        assert out.terms[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Full depth: three terms, a mean (1/3 each), and half of the teammate's two depths.
    # Sub-network: three terms (self, interactive, labels: 1/3 each), one sub depth (SFSL weight 1), the other half.
    expected_weights = {"leader/ce": 1.0}
    for p in "AB":
        expected_weights |= {f"{p}/s=1/{n}": 1 / 6 for n in ("ce", "guided", "interactive")}
        expected_weights |= {f"{p}/s=0.5/{n}": 1 / 6 for n in ("self", "interactive", "ce")}
    assert out.weights == pytest.approx(expected_weights)
    total = sum(expected_weights[k] * v for k, v in expected_terms.items())
    assert out.total.item() == pytest.approx(total, rel=1e-5)


def test_warmup_start_trains_every_depth_on_labels_only() -> None:
    out = cooperative_loss(_logits(), torch.tensor([0]), _config(), ramp=0.0)
    assert set(out.terms) == {"leader/ce", "A/s=1/ce", "A/s=0.5/ce", "B/s=1/ce", "B/s=0.5/ce"}
    assert out.weights["A/s=0.5/ce"] == pytest.approx(0.5)
    half = cooperative_loss(_logits(), torch.tensor([0]), _config(), ramp=0.5)
    # distillation weights r = .5 each, labels sub_ce_weight + 1 - r = 1.5: a mean over raw weights 2.5
    assert half.weights["A/s=0.5/self"] == pytest.approx(0.5 * 0.5 / 2.5)
    assert half.weights["A/s=0.5/ce"] == pytest.approx(0.5 * 1.5 / 2.5)


@pytest.mark.parametrize(
    ("switch", "gone"),
    [
        ({"leader": "none"}, {"leader/ce", "A/s=1/guided", "B/s=1/guided"}),
        ({"interactive": False}, {"A/s=1/interactive", "A/s=0.5/interactive"} | {"B/"}),
        ({"self_distillation": False}, {"A/s=0.5/self", "B/s=0.5/self"}),
    ],
)
def test_switching_a_component_off_removes_exactly_its_terms(switch: dict, gone: set[str]) -> None:
    full = cooperative_loss(_logits(), torch.tensor([0]), _config(), ramp=1.0)
    config = _config(**switch)
    logits = _logits(leader=config.leader != "none", teammates=config.num_teammates)
    out = cooperative_loss(logits, torch.tensor([0]), config, ramp=1.0)
    removed = set(full.terms) - set(out.terms)
    expected = {k for k in full.terms if any(k == g or (g.endswith("/") and k.startswith(g)) for g in gone)}
    assert removed == expected
    assert set(out.terms) <= set(full.terms)
    for key in out.terms:  # the remaining terms keep their values
        assert out.terms[key].item() == pytest.approx(full.terms[key].item(), rel=1e-6)


def test_sfsl_off_weights_every_depth_equally() -> None:
    config = TrainingConfig(scaling_factors=[0.25, 0.5, 1.0], sfsl_gamma=0.0)
    by_depth = {s: torch.tensor([[0.1 * s, 0.2]]) for s in (0.25, 0.5, 1.0)}
    out = cooperative_loss(CooperativeLogits([by_depth]), torch.tensor([1]), config, ramp=1.0)
    assert out.weights["A/s=0.25/self"] == pytest.approx(out.weights["A/s=0.5/self"])
    on = cooperative_loss(CooperativeLogits([by_depth]), torch.tensor([1]), TrainingConfig([0.25, 0.5, 1.0]))
    assert on.weights["A/s=0.25/self"] == pytest.approx(2 * on.weights["A/s=0.5/self"])


def test_training_config_round_trips_and_validates(tmp_path) -> None:
    config = TrainingConfig(scaling_factors=[0.5, 0.25], temperature=3.0, leader="frozen", interactive=False)
    assert config.scaling_factors == [0.25, 0.5, 1.0]  # sorted, full depth added
    config.save(tmp_path / "c.json")
    assert TrainingConfig.load(tmp_path / "c.json") == config
    for bad in (
        {"scaling_factors": [0.0]},
        {"scaling_factors": [1.5]},
        {"scaling_factors": []},
        {"temperature": 0},
        {"leader": "boss"},
        {"epochs": 0},
        {"sfsl_gamma": -1},
        {"lambda_guided": float("nan")},
        {"self_distillation": False, "interactive": False, "sub_ce_weight": 0.0, "train_depths": "all"},
    ):
        with pytest.raises((ConfigError, ScalingFactorError)):
            TrainingConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown training config keys"):
        TrainingConfig.from_dict({"epoch": 3})


def test_training_config_of_the_earlier_spelling_keeps_each_values_meaning() -> None:
    # earlier files named the learning-rate warm-up lr_warmup_epochs and the distillation ramp warmup_epochs
    old = {**TrainingConfig().to_dict(), "lr_warmup_epochs": 3.0, "warmup_epochs": 0.5}
    del old["distill_warmup_epochs"]
    config = TrainingConfig.from_dict(old)
    assert (config.warmup_epochs, config.distill_warmup_epochs) == (3.0, 0.5)


def test_sandwich_step_averages_over_the_depths_it_ran() -> None:
    config = recipe_config("sandwich", scaling_factors=[0.25, 0.5, 0.75, 1.0], leader="none")
    by_depth = {s: torch.tensor([[float(s), 0.0, 1.0]]) for s in (1.0, 0.5, 0.25)}  # 0.75 not drawn this step
    out = cooperative_loss(CooperativeLogits([by_depth]), torch.tensor([0]), config)
    assert {k.split("/")[1] for k in out.terms} == {"s=1", "s=0.5", "s=0.25"}
    sfsl = sfsl_weights(config.scaling_factors, config.sfsl_gamma)  # mean 1 over all three sub-depths
    assert out.weights["A/s=1/ce"] == pytest.approx(1 / 3)  # one term of the full depth, one of three depths run
    assert out.weights["A/s=0.25/self"] + out.weights["A/s=0.25/ce"] == pytest.approx(sfsl[0.25] / 3)


def test_sandwich_rule_runs_the_smallest_and_the_top_depth_and_a_random_sample() -> None:
    model = CooperativeModel([], [0.25, 0.5, 0.75, 1.0], leader="none", sampled_depths=1)
    seen = set()
    for _ in range(40):
        depths = model.depths_to_run()
        assert len(depths) == 3 and depths[0] == 1.0 and depths[-1] == 0.25
        seen.add(depths[1])
    assert seen == {0.5, 0.75}
    assert model.eval().depths_to_run() == [1.0, 0.75, 0.5, 0.25]  # evaluation: every depth
    assert CooperativeModel([], [0.5, 1.0], leader="none", sampled_depths=1).depths_to_run() == [1.0, 0.5]
    with pytest.raises(ConfigError, match="sampled_depths"):
        TrainingConfig(sampled_depths=-1)


def test_guided_learning_for_the_sub_networks_is_an_option() -> None:
    out = cooperative_loss(_logits(), torch.tensor([0]), _config(lambda_guided_sub=1.0), ramp=1.0)
    assert out.terms["A/s=0.5/guided"].item() == pytest.approx(_kd(A[0.5], L, 2.0), rel=1e-4)
    # four raw weights of 1 (self, interactive, guided, labels): a quarter each, of the teammate's half
    assert out.weights["A/s=0.5/guided"] == pytest.approx(1 / 8) and out.weights["A/s=0.5/self"] == pytest.approx(1 / 8)
    default = cooperative_loss(_logits(), torch.tensor([0]), _config(), ramp=1.0)
    assert not any(k.endswith("/guided") and "s=0.5" in k for k in default.terms)  # off by default, as in the paper
    config = _config(leader="none", lambda_guided_sub=1.0)
    no_leader = cooperative_loss(_logits(leader=False), torch.tensor([0]), config)
    assert not any(k.endswith("/guided") for k in no_leader.terms)


# ---------------------------------------------------------------------- Teammates with their own data


def test_each_teammate_learns_from_its_own_batch_its_leader_and_its_peer_there() -> None:
    config = recipe_config("paper", scaling_factors=[0.5, 1.0], teammate_data="streams", distill_warmup_epochs=0)
    g = torch.Generator().manual_seed(0)
    z = {name: torch.randn(4, 3, generator=g) for name in ("A1", "A.5", "B1", "B.5", "LA", "LB", "PA", "PB")}
    logits = CooperativeLogits(
        teammates=[{1.0: z["A1"], 0.5: z["A.5"]}, {1.0: z["B1"], 0.5: z["B.5"]}],
        leader=[z["LA"], z["LB"]],  # the Leader on A's batch and on B's batch
        peers=[z["PA"], z["PB"]],  # B on A's batch, A on B's batch
    )
    labels = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0]])  # [B, teammates]: each batch its own labels
    loss = cooperative_loss(logits, labels, config)
    tau = config.temperature
    torch.testing.assert_close(loss.terms["B/s=1/guided"], kd_loss(z["B1"], z["LB"], tau))
    torch.testing.assert_close(loss.terms["A/s=0.5/interactive"], kd_loss(z["A.5"], z["PA"], tau))
    torch.testing.assert_close(loss.terms["B/s=1/interactive"], kd_loss(z["B1"], z["PB"], tau))
    torch.testing.assert_close(loss.terms["B/s=0.5/ce"], F.cross_entropy(z["B.5"], labels[:, 1]))
    leader_ce = (F.cross_entropy(z["LA"], labels[:, 0]) + F.cross_entropy(z["LB"], labels[:, 1])) / 2
    torch.testing.assert_close(loss.terms["leader/ce"], leader_ce)
