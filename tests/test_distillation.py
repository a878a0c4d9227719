"""One-pass distillation recipes: sampled nested depths, a fixed / cached / EMA teacher, compute counted, max_steps."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.flops import count_flops
from adaptive_depth.training import (
    CooperativeTrainer,
    TrainingConfig,
    accelerator_kwargs,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.compute import BACKWARD_FACTOR, ForwardCost
from adaptive_depth.training.players import CooperativeModel, nested_depths

SIZE = [3, 32, 32]


def _model(seed: int = 0) -> AdaptiveDepth:
    torch.manual_seed(seed)
    return AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=10), input_size=SIZE)


@pytest.fixture(scope="module")
def data():
    return load_image_classification_data("digits", max_train_samples=48, max_eval_samples=16)


def _trainer(data, config: TrainingConfig, leader=None, model=None) -> CooperativeTrainer:
    model = model or _model()
    loaders = make_loaders(data, model, **config.loader_options, input_size=SIZE)
    accelerator = Accelerator(**accelerator_kwargs(config))
    return CooperativeTrainer(
        model, config, loaders.train, loaders.eval, leader=leader, accelerator=accelerator,
        recalibration_loader=loaders.recalibration,
    )  # fmt: skip


def _count_calls(module: torch.nn.Module) -> list[bool]:
    """Every forward of ``module``, recorded as whether it ran with gradients."""
    calls: list[bool] = []
    module.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


def test_nested_depths_are_the_distinct_configurations_the_policy_deploys() -> None:
    model = _model()  # regnetx_002: gated stages of 4 and 7 blocks
    depths = nested_depths(model, 0.25)
    configs = [tuple(model.depth_for(s)) for s in depths]
    assert depths[0] == 0.25 and depths[-1] == 1.0
    assert len(set(configs)) == len(configs)  # each configuration once
    assert configs == sorted(configs)  # nested: every block count grows with s
    grid = {tuple(model.depth_for(s / 200)) for s in range(50, 201)}  # every s a user can pick in [0.25, 1]
    assert set(configs) == grid


def test_sampled_steps_draw_nested_depths_the_smallest_half_the_time_and_the_top_a_quarter() -> None:
    model = _model()
    share = TrainingConfig().smallest_share  # the default
    players = CooperativeModel(
        [model], [0.25, 0.5, 0.75, 1.0], leader="none", train_depths="sampled", smallest_share=share
    ).train()
    torch.manual_seed(0)
    draws = Counter(d for _ in range(4000) for d in players.depths_to_run())
    assert set(draws) == set(nested_depths(model, 0.25, named=[0.5, 0.75]))
    assert {0.25, 0.5, 0.75, 1.0} <= set(draws)  # the trained depths go by their own names
    assert {tuple(model.depth_for(d)) for d in draws} == {tuple(model.depth_for(s)) for s in nested_depths(model, 0.25)}
    assert share == 0.5 and draws[0.25] / 4000 == pytest.approx(0.5, abs=0.03)
    assert draws[1.0] / 4000 == pytest.approx(0.25, abs=0.03)
    top_and_one = CooperativeModel([model], [0.25, 1.0], leader="none", train_depths="top+sampled").train()
    runs = [top_and_one.depths_to_run() for _ in range(200)]
    assert all(r[0] == 1.0 and len(r) == 2 and r[1] < 1.0 for r in runs)
    assert players.eval().depths_to_run() == [1.0, 0.75, 0.5, 0.25]  # evaluation: every trained depth


def test_smallest_share_sets_how_often_the_smallest_depth_trains_and_the_steps_a_budget_buys(data) -> None:
    model = _model()
    players = CooperativeModel(
        [model], [0.25, 0.5, 0.75, 1.0], leader="none", train_depths="sampled", smallest_share=0.5
    ).train()
    torch.manual_seed(0)
    draws = Counter(d for _ in range(4000) for d in players.depths_to_run())
    assert draws[0.25] / 4000 == pytest.approx(0.5, abs=0.03)
    assert draws[1.0] / 4000 == pytest.approx(0.25, abs=0.03)  # the top keeps its quarter; the others share the rest
    assert sum(n for d, n in draws.items() if d not in (0.25, 1.0)) / 4000 == pytest.approx(0.25, abs=0.03)
    below = CooperativeModel([model], [0.25, 1.0], leader="none", train_depths="top+sampled", smallest_share=0.75)
    runs = Counter(below.train().depths_to_run()[1] for _ in range(2000))
    assert runs[0.25] / 2000 == pytest.approx(0.75, abs=0.04)
    # top_share moves steps to the top depth (the blocks only it runs train in those steps alone)
    top_heavy = CooperativeModel(
        [model], [0.25, 0.5, 0.75, 1.0], leader="none", train_depths="sampled", smallest_share=0.25, top_share=0.5
    ).train()
    draws = Counter(d for _ in range(4000) for d in top_heavy.depths_to_run())
    assert draws[1.0] / 4000 == pytest.approx(0.5, abs=0.03)
    assert draws[0.25] / 4000 == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ConfigError, match="top_share"):
        TrainingConfig(smallest_share=0.5, top_share=0.6)
    with pytest.raises(ConfigError, match="give one of them a share"):  # two depths, both with no share
        CooperativeModel._draw([0.25, 1.0], [(0.25, 0.0), (1.0, 0.0)])
    # a budget buys more steps when the cheap depth trains more often
    steps = {}
    for share in (0.0, 0.75):
        config = TrainingConfig(batch_size=8, scaling_factors=[0.25, 1.0], compute_budget=4.0, smallest_share=share)
        steps[share] = _trainer(data, config).run.total_steps
    assert steps[0.75] > steps[0.0]
    # and fewer when the full depth does (the trainer hands top_share to the players that price a step)
    config = TrainingConfig(batch_size=8, scaling_factors=[0.25, 1.0], compute_budget=4.0, smallest_share=0.0)
    top_heavy = TrainingConfig(**{**config.to_dict(), "top_share": 0.75})
    assert _trainer(data, top_heavy).run.total_steps < steps[0.0]
    for bad in (-0.1, 0.8, float("nan"), "half"):
        with pytest.raises(ConfigError, match="smallest_share"):
            TrainingConfig(smallest_share=bad)


def test_forward_cost_is_the_flop_count_of_the_blocks_that_ran() -> None:
    model = _model()
    cost = ForwardCost(model)
    x = model.example_input(1)
    for s in (1.0, 0.5, 0.25):
        model.set_scaling_factor(s)
        assert cost() == count_flops(model, x)
    torch.manual_seed(3)
    model.drop_blocks(0.5)  # an arbitrary subset
    assert cost() == count_flops(model, x)


def test_a_fixed_teacher_with_sampled_depths_costs_one_pass_a_step(data) -> None:
    config = TrainingConfig(
        train_depths="sampled", leader="frozen", interactive=False, batch_size=8, max_steps=4, distill_warmup_epochs=0
    )
    teacher = _model(1).export(1.0).eval()
    trainer = _trainer(data, config, leader=teacher)
    student_calls = _count_calls(trainer.teammates[0].model)
    teacher_calls = _count_calls(teacher)
    trainer.train()
    assert trainer.progress.step == 4
    assert student_calls == [True] * 4  # one forward (with a backward) of the student a step
    assert teacher_calls == [False] * 4  # and one of the teacher, without gradients
    full = count_flops(teacher, trainer.teammates[0].example_input(1))
    assert trainer.compute.teacher == 4 * 8 * full
    smallest = trainer.teammates[0].flops(0.25)
    assert 4 * 8 * BACKWARD_FACTOR * smallest <= trainer.compute.trained <= 4 * 8 * BACKWARD_FACTOR * full


def test_max_steps_ends_the_schedule_inside_an_epoch(data) -> None:
    config = TrainingConfig(leader="none", interactive=False, batch_size=8, max_steps=7, warmup_epochs=0)
    trainer = _trainer(data, config)  # 6 batches an epoch
    trainer.train()
    assert trainer.progress.step == 7 and trainer.run.epochs == 2
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end


def test_ema_teacher_is_the_average_of_the_student_and_teaches_after_distill_start(data) -> None:
    config = TrainingConfig(
        train_depths="sampled", leader="ema", interactive=False, batch_size=8, max_steps=6, distill_start=0.5,
        distill_warmup_epochs=0, ema_decay=0.9,
    )  # fmt: skip
    trainer = _trainer(data, config)
    ema = trainer.players.leader_model
    teacher_calls = _count_calls(ema.module.model)
    student = trainer.teammates[0]
    name = "model.head.fc.weight"
    for step in range(1, 4):
        before = dict(ema.module.named_parameters())[name].detach().clone()
        images, labels = next(iter(trainer.train_loader))[:2]
        trainer.training_step(images, labels, ramp=0.0)
        trainer.progress.step = step
        decay = ema.get_decay(step)
        expected = decay * before + (1 - decay) * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(dict(ema.module.named_parameters())[name], expected)
    assert teacher_calls == []  # no distillation yet: the teacher does not run
    trainer.training_step(images, labels, ramp=1.0)
    assert teacher_calls == [False]
    assert trainer._ramp(0, 2) == 0.0 and trainer._ramp(0, 3) == 1.0  # distillation from half of the 6 steps


def test_ema_teacher_normalises_with_the_batch_and_leaves_its_running_statistics(data) -> None:
    """The averaged running statistics mix every sampled depth; at full depth the teacher uses the batch's."""
    config = TrainingConfig(train_depths="sampled", leader="ema", interactive=False, batch_size=8, max_steps=2)
    trainer = _trainer(data, config)
    ema = trainer.players.leader_model.module
    norm = next(m for m in ema.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_mean.fill_(3.0)  # statistics that fit no batch: eval-mode outputs would be far off
    buffers = {k: v.clone() for k, v in ema.named_buffers()}
    images = next(iter(trainer.train_loader))[0]
    trainer.players.train()
    teacher = trainer.players.leader_logits(images)
    reference = copy.deepcopy(ema).train()  # the same network normalising with batch statistics
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher, reference(images))
        assert not torch.allclose(teacher, ema(images), atol=1e-3)  # not the running statistics
    for key, value in ema.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=f"{key} changed")
    assert not ema.training and not norm.training and norm.track_running_stats  # put back as it was


def test_cached_teacher_outputs_are_reused_and_refused_for_other_data_or_teacher(data, tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    config = TrainingConfig(
        train_depths="sampled", leader="cached", interactive=False, batch_size=8, max_steps=2, leader_cache=str(path),
        leader_cache_draws=3, leader_cache_top_k=4,
    )  # fmt: skip
    teacher = _model(1).export(1.0).eval()
    calls = _count_calls(teacher)
    first = _trainer(data, config, leader=teacher)
    first.train()
    # one pass over every draw of every image, before training, none during it (and one FLOP-counting pass)
    images = len(first.train_loader.dataset)  # the training split less the images held out for the norm check
    assert calls.count(False) == math.ceil(3 * images / 8) and calls.count(True) == 1
    cache = first.players.teacher_cache
    dataset = first.train_loader.dataset
    keys = torch.tensor([0, 1, 2, 3 * (images - 1) + 2])
    with torch.no_grad():
        exact = teacher(torch.stack([dataset.draw_view(int(k)) for k in keys]))
    top = exact.topk(4, dim=-1)
    torch.testing.assert_close(cache.logits(keys).gather(1, top.indices), top.values, atol=1e-2, rtol=1e-2)
    per_image = count_flops(teacher, first.teammates[0].example_input(1))
    assert first.compute.teacher == cache.making_flops == 3 * images * per_image

    calls.clear()  # another seed (and budget) reuses the file: no teacher pass at all, the making still charged
    again = _trainer(data, TrainingConfig(**{**config.to_dict(), "seed": 5, "max_steps": 3}), leader=teacher)
    again.train()
    assert calls == [] and again.compute.teacher == cache.making_flops
    torch.testing.assert_close(again.players.teacher_cache.values, cache.values.cpu())

    other_data = load_image_classification_data("digits", max_train_samples=40, max_eval_samples=16)
    with pytest.raises(ConfigError, match="another dataset"):
        _trainer(other_data, config, leader=teacher).train()
    other_teacher = _model(2).export(1.0).eval()
    with pytest.raises(ConfigError, match="another teacher"):
        _trainer(data, config, leader=other_teacher).train()


@pytest.mark.parametrize("leader", ["frozen", "cached", "ema"])
def test_every_teacher_lives_on_the_accelerator_device(data, leader: str, monkeypatch) -> None:
    # CI has no GPU: an accelerator whose device is "meta" stands in for one (a teacher left on the CPU stays there).
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    config = TrainingConfig(train_depths="sampled", leader=leader, interactive=False, batch_size=8)
    teacher = _model(1).export(1.0) if leader in ("frozen", "cached") else None
    trainer = _trainer(data, config, leader=teacher)
    assert {p.device.type for p in trainer.leader.parameters()} == {"meta"}
    assert {p.device.type for p in trainer.teammates[0].parameters()} == {"meta"}


def test_one_pass_recipes_are_validated() -> None:
    with pytest.raises(ConfigError, match="for two Teammates set train_depths='all'"):
        TrainingConfig(interactive=True)  # the default runs one depth a step: no full-depth peer
    with pytest.raises(ConfigError, match="layer_drop"):
        TrainingConfig(train_depths="sampled", layer_drop=0.5, interactive=False)
    with pytest.raises(ConfigError, match="teammate_data='shared'"):
        TrainingConfig(leader="cached", interactive=True, teammate_data="views")
    with pytest.raises(ConfigError, match="needs a trained Leader"):
        CooperativeTrainer(_model(), TrainingConfig(leader="cached", interactive=False), [])  # type: ignore[arg-type]
    old = {**TrainingConfig(leader="frozen").to_dict(), "cache_leader_logits": True}
    assert TrainingConfig.from_dict(old).leader == "cached"  # the earlier switch for a frozen Leader's cache


@pytest.mark.parametrize(
    "recipe",
    [
        {"leader": "none", "interactive": False, "train_depths": "top"},  # plain fine-tuning: the unit itself
        {},  # the default: one nested depth a step
        {"leader": "joint", "train_depths": "all"},  # cooperative: a joint Leader and every depth, about four passes
        {"leader": "frozen", "interactive": False, "train_depths": "sampled"},
        {"leader": "cached", "interactive": False, "train_depths": "sampled", "leader_cache_draws": 2},
    ],
)
def test_recipes_given_one_compute_budget_spend_the_same_flops(data, recipe: dict) -> None:
    config = TrainingConfig(**{"batch_size": 8, "compute_budget": 2.0, **recipe})
    teacher = _model(1).export(1.0).eval() if recipe.get("leader") in ("frozen", "cached") else None
    trainer = _trainer(data, config, leader=teacher)
    trainer.train()
    images = len(trainer.train_loader.dataset)
    unit = BACKWARD_FACTOR * trainer.teammates[0].flops(1.0) * images  # one plain epoch
    assert trainer.training_flops() == pytest.approx(2.0 * unit, rel=0.15)
    if recipe.get("train_depths") == "top":
        assert trainer.progress.step == round(2 * images / 8)  # two epochs' images of plain fine-tuning


def test_a_budget_too_small_for_one_step_is_refused(data) -> None:
    with pytest.raises(ConfigError, match="buys no training step"):
        _trainer(data, TrainingConfig(batch_size=8, compute_budget=0.01))
    with pytest.raises(ConfigError, match="not both"):
        TrainingConfig(compute_budget=1.0, max_steps=3)
