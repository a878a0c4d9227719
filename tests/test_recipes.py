"""Named recipes (``--recipe``) and training the top depth alone (``train_depths="top"``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from test_training import ROOT, _loader

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.saved.card import how_trained
from adaptive_depth.training import CooperativeTrainer, TrainingConfig
from adaptive_depth.training.recipes import AUTO, AUTO_RULE, DEFAULT_RECIPE, RECIPES, pick_recipe, recipe_config
from scripts import load_script


def _model() -> AdaptiveDepth:
    return AdaptiveDepth.wrap(
        timm.create_model("regnetx_002", num_classes=10, zero_init_last=False), input_size=[3, 32, 32]
    )


def test_every_recipe_is_a_valid_config_and_values_win_over_it() -> None:
    for name in RECIPES:
        assert isinstance(recipe_config(name), TrainingConfig)
    assert recipe_config(DEFAULT_RECIPE) == TrainingConfig()
    rd = recipe_config("random-depth")
    assert (rd.train_depths, rd.layer_drop, rd.leader, rd.interactive) == ("top", 0.5, "none", False)
    assert rd.scaling_factors == [0.25, 0.5, 0.75, 1.0]  # still recalibrated and evaluated at every depth
    assert recipe_config("random-depth", layer_drop=0.2).layer_drop == 0.2
    with pytest.raises(ConfigError, match=r"unknown recipe 'layerdrop'; choose one of"):
        recipe_config("layerdrop")
    with pytest.raises(ConfigError, match=r"unknown training config fields \['layer_dorp'\]"):
        recipe_config("random-depth", layer_dorp=0.2)
    with pytest.raises(ConfigError, match="train_depths must be one of"):
        TrainingConfig(train_depths="middle")


def test_a_config_saved_before_the_default_changed_keeps_what_it_trained_with() -> None:
    saved = TrainingConfig().to_dict()
    assert TrainingConfig.from_dict(saved) == TrainingConfig()  # today's file: today's values
    del saved["leader"], saved["train_depths"]  # a file written before the fields existed
    earlier = TrainingConfig.from_dict(saved)
    assert (earlier.leader, earlier.train_depths) == ("joint", "all") != (TrainingConfig().leader, "sampled")


def test_auto_picks_the_recipe_on_top_of_the_curves_at_the_budget_given_and_says_why(monkeypatch) -> None:
    # Today's curves cross once, at 64 epochs of compute: the full depth in half the steps from there
    assert [(start, recipe) for start, recipe, _ in AUTO_RULE] == [(64.0, "nested-top-half")]
    assert "from 64 epochs" in RECIPES["nested-top-half"].summary  # --help says the same
    for budget in (1, 10, 63.9):
        name, why = pick_recipe(AUTO, epochs=budget)
        assert name == DEFAULT_RECIPE and "below 64 epochs of compute" in why and f"epochs = {budget:g}" in why
    for budget in (64, 128, 500):
        name, why = pick_recipe(AUTO, epochs=budget)
        assert (
            name == "nested-top-half"
            and "from 64 epochs of compute" in why
            and "at 128" in why
            and all(task in why for task in ("digits-cluttered", "digit-pairs", "Fashion-MNIST"))
        )
    assert pick_recipe(AUTO)[0] == DEFAULT_RECIPE  # no budget given: the default epochs
    name, why = pick_recipe(AUTO, epochs=10, compute_budget=64)  # the compute budget sets the length: it decides
    assert name == "nested-top-half" and "compute_budget = 64" in why
    assert pick_recipe(AUTO, epochs=100, compute_budget=8)[0] == DEFAULT_RECIPE
    assert recipe_config(AUTO, epochs=100) == recipe_config("nested-top-half", epochs=100)
    assert recipe_config(AUTO, epochs=4) == recipe_config(DEFAULT_RECIPE, epochs=4)
    assert pick_recipe("paper", epochs=100)[0] == "paper"  # a named recipe is never overridden
    name, why = pick_recipe(AUTO, epochs=100, max_steps=500)  # steps: no compute before the data is read
    assert name == DEFAULT_RECIPE and "max_steps = 500" in why and "--epochs or --compute-budget" in why
    script = load_script(ROOT / "examples" / "finetune.py")
    args, config = script.parse_args(["--epochs", "60"])  # the script's default is auto
    assert args.recipe == AUTO
    assert config == recipe_config(DEFAULT_RECIPE, epochs=60, learning_rate=config.learning_rate)
    args, config = script.parse_args(["--epochs", "100"])
    assert config == recipe_config("nested-top-half", epochs=100, learning_rate=config.learning_rate)
    _, config = script.parse_args(["--num_train_epochs", "100", "--top-share", "0.3"])  # an alias; a flag still wins
    assert (config.smallest_share, config.top_share) == (0.25, 0.3)
    _, config = script.parse_args(["--recipe", "auto", "--compute-budget", "8"])
    assert config == recipe_config(DEFAULT_RECIPE, compute_budget=8, learning_rate=config.learning_rate)
    _, config = script.parse_args(["--max-steps", "100"])
    assert config == recipe_config(DEFAULT_RECIPE, max_steps=100, learning_rate=config.learning_rate)
    # With no switch in the rule, the default at every budget
    from adaptive_depth.training import recipes

    monkeypatch.setattr(recipes, "AUTO_RULE", ())
    for budget in (1, 64, 200):
        name, why = pick_recipe(AUTO, epochs=budget)
        assert name == DEFAULT_RECIPE and "at every budget measured" in why


def test_the_script_takes_a_recipe_as_defaults_for_its_flags() -> None:
    script = load_script(ROOT / "examples" / "finetune.py")
    _, config = script.parse_args(["--recipe", "random-depth"])
    assert config == recipe_config("random-depth", learning_rate=config.learning_rate)
    _, config = script.parse_args(["--recipe", "random-depth", "--layer-drop", "0.3", "--leader", "joint"])
    assert (config.layer_drop, config.leader, config.train_depths) == (0.3, "joint", "top")
    _, config = script.parse_args(["--recipe", "paper"])
    assert config.interactive and config.leader == "joint"
    args, config = script.parse_args([])  # auto at the default 10 epochs: the nested default
    assert args.recipe == AUTO and DEFAULT_RECIPE == "random-depth-nested"
    assert config == TrainingConfig(learning_rate=config.learning_rate)
    assert (config.train_depths, config.leader, config.interactive) == ("sampled", "none", False)
    _, config = script.parse_args(["--recipe", "cooperative"])
    assert (config.train_depths, config.leader, config.interactive) == ("all", "joint", False)
    with pytest.raises(SystemExit):
        script.parse_args(["--recipe", "nope"])


def test_top_depth_alone_trains_one_forward_and_evaluates_every_depth() -> None:
    set_seed(0)
    model = _model()
    config = recipe_config("random-depth", epochs=1, batch_size=16, learning_rate=3e-3)
    trainer = CooperativeTrainer(model, config, _loader(model), _loader(model, n=32), accelerator=Accelerator())
    images, _ = next(iter(trainer.train_loader))
    trainer.module.train()
    assert trainer.module.depths_to_run() == [1.0]
    logits = trainer.module(images)
    assert list(logits.teammates[0]) == [1.0] and logits.leader is None
    trainer.module.eval()
    assert trainer.module.depths_to_run() == [1.0, 0.75, 0.5, 0.25]

    calls: list[int] = []
    handle = trainer.teammates[0].register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train()
    handle.remove()
    assert len(calls) == len(trainer.train_loader)  # one forward per step, not one per depth
    result = trainer.evaluate(latency=False)
    assert sorted({r.scaling_factor for r in result.results}) == [0.25, 0.5, 0.75, 1.0]
    saved = result.model
    assert saved.config.scaling_factors == [0.25, 0.5, 0.75, 1.0]
    norms = [m for m in saved.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    means = {}
    for s in (0.25, 1.0):  # each depth got its own BatchNorm statistics
        saved.set_scaling_factor(s)
        means[s] = [bn.running_mean.clone() for bn in norms]
    assert any(not torch.equal(a, b) for a, b in zip(means[0.25], means[1.0]))


def test_a_fine_tuned_model_is_its_own_frozen_teacher(tmp_path: Path) -> None:
    """The user with a model fine-tuned on the task: ``--leader frozen`` alone makes that model the fixed teacher."""
    finetuned = timm.create_model("test_convnext", num_classes=10)  # digits has 10 classes: the head is kept
    timm.models.save_for_hf(finetuned, tmp_path / "finetuned")
    script = load_script("examples/finetune.py")
    common = ["--epochs", "1", "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16",
              "--no-latency", "--checkpointing-steps", "no", "--image-size", "32"]  # fmt: skip
    out = tmp_path / "out"
    assert (
        script.main(["--model", str(tmp_path / "finetuned"), "--leader", "frozen", *common, "--output-dir", str(out)])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    leader = [r for r in results if r["player"] == "leader"]
    assert len(leader) == 1 and json.loads((out / "training_config.json").read_text())["leader"] == "frozen"
    with torch.no_grad():  # the teacher was the fine-tuned model, unchanged: its accuracy is that model's
        x = torch.randn(2, 3, 32, 32)
        teacher = script.own_teacher(AdaptiveDepth.from_pretrained(tmp_path / "finetuned", input_size=[3, 32, 32]), "x")
        torch.testing.assert_close(teacher(x), finetuned.eval()(x))
    fresh = AdaptiveDepth.from_pretrained(tmp_path / "finetuned", num_classes=4, input_size=[3, 32, 32])
    with pytest.raises(ConfigError, match="its head is new"):
        script.own_teacher(fresh, "finetuned")


def test_the_card_says_what_each_recipe_trained() -> None:
    said = {name: how_trained(recipe_config(name).to_dict()) for name in RECIPES}
    assert said[DEFAULT_RECIPE].startswith("One network trained at one nested depth a step")
    assert "the smallest in 50% of the steps" in said[DEFAULT_RECIPE] and "25% of the steps" in said["distill"]
    assert "the smallest in 25% of the steps, the full depth in 50%" in said["nested-top-half"]
    earlier = {k: v for k, v in TrainingConfig().to_dict().items() if k != "smallest_share"}  # saved before the field
    assert "the smallest in 25% of the steps" in how_trained(earlier)
    assert TrainingConfig.from_dict(earlier).smallest_share == 0.25  # what that version trained with
    assert "Leader" not in said[DEFAULT_RECIPE] and "teacher" not in said[DEFAULT_RECIPE]
    assert said["cooperative"] == "Cooperative training (one Teammate, every depth a step, a Leader trained alongside)"
    assert "the smallest, the full and 1 random depth(s) a step" in said["sandwich"]
    assert said["paper"].startswith("Cooperative training (two Teammates")
    assert said["distill"].endswith("taught by a fixed teacher") and "random depth" in said["random-depth"]
    assert said["plain"] == "One network trained at full depth, cut to each depth afterwards"
    assert len(set(said.values())) == len(said)
