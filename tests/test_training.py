"""Cooperative training end to end on tiny models: loss falls, exact resume, 2-process DDP, the example script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from adaptive_depth import AdaptiveDepth, ConfigError, DataError, ScalingFactorError
from adaptive_depth.preprocessing import build_transform
from adaptive_depth.saved import SAVE_ID_KEY, read_safetensors
from adaptive_depth.training import (
    CooperativeTrainer,
    EpochSampler,
    TrainingConfig,
    TransformedDataset,
    cooperative_loss,
    digits_dataset,
)
from adaptive_depth.training.recipes import COOPERATIVE, recipe_config
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"


def _timm_model() -> AdaptiveDepth:
    return AdaptiveDepth.wrap(
        timm.create_model("regnetx_002", num_classes=10, zero_init_last=False), input_size=[3, 32, 32]
    )


def _hf_model() -> AdaptiveDepth:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[4, 4], num_labels=10, image_size=32
    )
    return AdaptiveDepth.wrap(transformers.ResNetForImageClassification(config), input_size=[3, 32, 32])


def _loader(model: AdaptiveDepth, n: int = 48, batch_size: int = 16, seed: int = 0) -> DataLoader:
    data = digits_dataset()["train"].select(range(n))
    tf = build_transform(model.model, train=True, input_size=[3, 32, 32])
    ds = TransformedDataset(data, tf, "image", "label", seed=seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=EpochSampler(n, shuffle=True, seed=seed),
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _trainer(build, tmp_path: Path | None = None, **config) -> CooperativeTrainer:
    set_seed(0)
    model = build()
    cfg = TrainingConfig(
        **(COOPERATIVE | {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "distill_warmup_epochs": 1} | config)
    )
    return CooperativeTrainer(
        model,
        cfg,
        _loader(model),
        _loader(model, n=32),
        accelerator=Accelerator(),
        output_dir=tmp_path,
        checkpoint_steps=2 if tmp_path else None,
        log_every=1,
    )


@pytest.mark.parametrize("build", [_timm_model, _hf_model], ids=["timm", "transformers"])
def test_cooperative_training_lowers_the_loss_and_every_term_contributes(build) -> None:
    trainer = _trainer(build, epochs=8, distill_warmup_epochs=0, warmup_epochs=0, learning_rate=1e-2, interactive=True)
    module = trainer.module
    images, labels = next(iter(trainer.train_loader))
    loss = cooperative_loss(module(images), labels, trainer.config, ramp=1.0)
    expected = {"leader/ce"} | {
        f"{p}/s={s:g}/{t}"
        for p in "AB"
        for s, terms in [(1.0, ("ce", "guided", "interactive"))]
        + [(s, ("self", "interactive", "ce")) for s in (0.25, 0.5, 0.75)]
        for t in terms
    }
    assert set(loss.terms) == expected
    for key, value in loss.terms.items():
        assert torch.isfinite(value) and value.item() > 0, key
        assert loss.weights[key] > 0, key
        # each term sends a gradient into the network it trains
        grads = torch.autograd.grad(
            value, [p for p in module.parameters() if p.requires_grad], allow_unused=True, retain_graph=True
        )
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key
    trainer.train()
    history = trainer.progress.history
    # falls by 15% or more and is still falling in the second half (15%, not more: the tiny transformers ResNet's
    # fall varies with the transformers version, 19.7% with 5.23.0)
    assert len(history) == 8 and history[-1] < 0.85 * history[0] and history[-1] < min(history[:4]), history
    result = trainer.evaluate(latency=False)
    assert result.deployed in ("A", "B")
    assert {(r.player, r.scaling_factor) for r in result.results} >= {("A", 0.25), ("B", 1.0), ("leader", 1.0)}
    assert result.model.config.extra["training"]["deployed"] == result.deployed


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = _trainer(_timm_model, tmp_path / "a")
    straight.train()  # 3 steps per epoch: checkpoints at step 2 (mid-epoch 1), 4 (mid-epoch 2), 6 (the end)
    saved = [p.name for p in straight.checkpoint_dirs()]
    assert "step_2" in saved and "step_4" in saved
    final = {k: v.clone() for k, v in straight.module.state_dict().items()}

    resumed = _trainer(_timm_model, tmp_path / "b")  # a fresh process would build exactly this
    resumed.train(resume_from_checkpoint=tmp_path / "a" / "checkpoints" / "step_4")
    assert resumed.progress.step == straight.progress.step
    assert resumed.progress.history == pytest.approx(straight.progress.history)
    for key, value in resumed.module.state_dict().items():
        assert torch.equal(value, final[key]), key


@pytest.mark.parametrize("teammate_data", ["views", "streams"])
def test_resume_with_teammate_streams_equals_an_uninterrupted_run(tmp_path: Path, teammate_data: str) -> None:
    from adaptive_depth.training import load_image_classification_data, make_loaders

    data = load_image_classification_data("digits", max_train_samples=48, max_eval_samples=16)

    def trainer(out: Path) -> CooperativeTrainer:
        set_seed(0)
        model = _timm_model()
        config = recipe_config(
            "paper", epochs=2, batch_size=16, scaling_factors=[0.5, 1.0], teammate_data=teammate_data
        )
        loaders = make_loaders(
            data, model, batch_size=16, seed=0, input_size=[3, 32, 32], streams=2,
            own_order=teammate_data == "streams",
        )  # fmt: skip
        return CooperativeTrainer(
            model, config, loaders.train, accelerator=Accelerator(), output_dir=out, checkpoint_steps=2
        )

    straight = trainer(tmp_path / "a")
    straight.train()
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=tmp_path / "a" / "checkpoints" / "step_2")
    final = straight.module.state_dict()
    for key, value in resumed.module.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_trainer_rejects_bad_setup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frozen"):
        _trainer(_timm_model, leader="frozen")
    trainer = _trainer(_timm_model, tmp_path)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint="latest")


# ---------------------------------------------------------------------- the example script


def _script():
    return load_script("examples/finetune.py")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--scaling-factors", "0", "1"], ScalingFactorError, "scaling factor"),
        (["--scaling-factors", "0.5", "1.5"], ScalingFactorError, "scaling factor"),
        (["--dataset", "no-such-org/no-such-dataset"], DataError, "imagefolder:PATH"),
        (["--dataset", "imagefolder:/no/such/folder"], DataError, "not a folder"),
        (["--label-column", "nope"], DataError, "columns are"),
        (["--leader", "frozen"], ConfigError, "--leader-model"),
    ],
)
def test_script_rejects_bad_input_before_training(tmp_path: Path, args: list[str], error, match: str) -> None:
    with pytest.raises(error, match=match):
        _script().main([*args, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_script_refuses_top5_with_few_classes_and_a_used_output_dir(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(ConfigError, match="more than 5 classes"):
        _script().main(
            [
                "--dataset",
                f"imagefolder:{image_folder}",
                "--metrics",
                "top1",
                "top5",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite-output-dir"):
        _script().main(["--output-dir", str(used)])
    assert (used / "config.json").read_text() == "{}"


def _launch(out: Path, processes: int, batch_size: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launch = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", *launch, str(SCRIPT),
        "--model", "test_convnext", "--random-init", "--epochs", "1", "--max-train-samples", "64",
        "--max-eval-samples", "32", "--batch-size", str(batch_size), "--no-latency", "--checkpointing-steps", "no",
        "--report-to", "none", "--output-dir", str(out),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_script_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    one = _launch(tmp_path / "one", 1, 16)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(tmp_path / "two", 2, 8)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "1 process(es)" in one.stdout
    model = AdaptiveDepth.from_pretrained(tmp_path / "two")
    assert model.config.extra["training"]["processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # ...and the match means something: training moved the deployed teammate away from its initialisation
    # (the script seeds teammate A with --seed and B with --seed + 1 before building it).
    for seed in (0, 1):
        torch.manual_seed(seed)
        init = AdaptiveDepth.from_pretrained("test_convnext", pretrained=False, num_classes=10, input_size=[3, 32, 32])
        moved = max((init.model.state_dict()[k] - v).abs().max().item() for k, v in a.items())
        assert moved > 1e-3, seed
    for name in ("README.md", "config.json", "training_config.json", "results.json"):
        assert (tmp_path / "one" / name).is_file(), name
    assert not (tmp_path / "one" / "checkpoints").exists()


def test_script_pushes_the_deployed_model_with_its_report_to_the_hub(tmp_path: Path, hub_repo, fake_hub_upload) -> None:
    calls, uploaded = fake_hub_upload
    out = tmp_path / "out"
    argv = [
        "--model", "test_convnext", "--random-init", "--epochs", "1", "--max-train-samples", "32",
        "--max-eval-samples", "16", "--batch-size", "16", "--no-latency", "--report-to", "none",
        "--output-dir", str(out), "--push-to-hub", "me/digits-adaptive",
    ]  # fmt: skip
    assert _script().main(argv) == 0
    assert calls == {"create_repo": "me/digits-adaptive", "upload_folder": "me/digits-adaptive"}
    pushed = sorted(p.name for p in uploaded.iterdir())
    assert pushed == ["README.md", "config.json", "model.safetensors", "pareto.png"]
    card = (uploaded / "README.md").read_text()
    assert "## Training results" in card and "me/digits-adaptive" in card
    parsed = ModelCard(card)  # metadata as the Hub reads it: top-1 of the deployed model at every depth
    assert parsed.data.base_model is None and parsed.data.model_name == "me/digits-adaptive"
    assert sorted(r.metric_name for r in parsed.data.eval_results) == [
        f"top-1 accuracy at scaling factor {s}" for s in ("0.25", "0.5", "0.75", "1")
    ]
    assert "## Classes" in card and "`0`, `1`" in card

    # What was pushed is what was saved locally, and loads back from the Hub id.
    # (safetensors writes its metadata in hash order, so equal files need not be equal bytes: compare contents)
    # A push is a save of its own: only the fingerprints that name each save's files differ.
    def unsaved(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "files"}

    pushed_config, local_config = (json.loads((d / "config.json").read_text()) for d in (uploaded, out))
    assert unsaved(pushed_config) == unsaved(local_config) and pushed_config["files"] != local_config["files"]
    pushed_weights, local_weights = (
        read_safetensors(uploaded / "model.safetensors"),
        read_safetensors(out / "model.safetensors"),
    )
    assert {k: v for k, v in pushed_weights[1].items() if k != SAVE_ID_KEY} == {
        k: v for k, v in local_weights[1].items() if k != SAVE_ID_KEY
    }
    assert pushed_weights[0].keys() == local_weights[0].keys()
    assert all(torch.equal(v, local_weights[0][k]) for k, v in pushed_weights[0].items())
    hub_repo("me/digits-adaptive", uploaded)
    loaded = AdaptiveDepth.from_pretrained("me/digits-adaptive").eval()
    local = AdaptiveDepth.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for s in (0.25, 1.0):
            assert torch.equal(loaded.set_scaling_factor(s)(x), local.set_scaling_factor(s)(x))


@pytest.mark.parametrize(("num_classes", "kept"), [(10, True), (4, False)])
def test_a_head_trained_for_the_task_is_kept_by_every_player(tmp_path: Path, num_classes: int, kept: bool) -> None:
    """A model already fine-tuned on the task (same classes) keeps its head in the Leader and the second Teammate."""
    finetuned = timm.create_model("test_convnext", num_classes=10)
    timm.models.save_for_hf(finetuned, tmp_path / "finetuned")
    model = AdaptiveDepth.from_pretrained(tmp_path / "finetuned", num_classes=num_classes, input_size=[3, 32, 32])
    assert model.config.base_model.trained_head is kept
    trainer = CooperativeTrainer(model, recipe_config("paper", batch_size=8), _loader(model, n=16, batch_size=8))
    heads = [p.model.head.fc.weight for p in trainer.teammates] + [trainer.leader.head.fc.weight]
    assert all(torch.equal(h, heads[0]) for h in heads) is kept
    if kept:
        assert torch.equal(heads[0], finetuned.head.fc.weight)
