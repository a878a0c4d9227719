"""The example script's conventions and the run guarantees not covered elsewhere: a refused resume removes nothing,
the checkpoint limit spares other runs, no weight decay on 1-D parameters, every config field a flag, transformers'
flag names, trackers checked and fed, offline detected in one attempt, library chatter only with --verbose, labels
and splits checked end to end, nothing local published, public imports only."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import timm
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCard
from PIL import Image

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.report import DepthResult, pareto_plot
from adaptive_depth.saved import PLOT_NAME
from adaptive_depth.training import CooperativeTrainer, TrainingConfig, load_image_classification_data, make_loaders
from adaptive_depth.training.checkpoints import checkpoint_dirs
from scripts import ROOT, load_script


def _script():
    return load_script("examples/finetune.py")


def _trainer(out: Path | None, save_total_limit: int | None = None, **config) -> CooperativeTrainer:
    set_seed(0)
    data = load_image_classification_data("digits", max_train_samples=48, max_eval_samples=16)
    model = AdaptiveDepth.wrap(timm.create_model("test_convnext", num_classes=10), input_size=[3, 32, 32])
    cfg = TrainingConfig(**({"epochs": 1, "batch_size": 16, "interactive": False} | config))
    loaders = make_loaders(data, model, batch_size=cfg.batch_size, seed=0, input_size=[3, 32, 32])
    return CooperativeTrainer(
        model, cfg, loaders.train, loaders.eval, accelerator=Accelerator(), output_dir=out, checkpoint_steps=1,
        save_total_limit=save_total_limit,
    )  # fmt: skip


def test_a_refused_resume_removes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the finished model")
    argv = ["--output-dir", str(out), "--overwrite-output-dir", "--resume-from-checkpoint", "latest",
            "--max-train-samples", "32", "--batch-size", "16"]  # fmt: skip
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _script().main(argv)
    assert (out / "config.json").read_text() == "the finished model"
    _trainer(out).train()  # checkpoints of a run with other settings than the script's
    with pytest.raises(ConfigError, match="other settings"):
        _script().main(argv)
    assert (out / "config.json").read_text() == "the finished model"


def test_the_checkpoint_limit_keeps_this_runs_newest_and_other_runs_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _trainer(out)
    first.train()
    dirs = first.checkpoint_dirs()
    (dirs[-1]).rename(out / "checkpoints" / "step_30")  # another run's checkpoint
    for path in dirs[:-1]:
        shutil.rmtree(path)
    second = _trainer(out, save_total_limit=2)
    second.train()  # 3 steps, a checkpoint after each, at most 2 of them kept
    assert [d.name for d in checkpoint_dirs(out)] == ["step_2", "step_3", "step_30"]
    assert [d.name for d in checkpoint_dirs(out, run_id=second.progress.run_id)] == ["step_2", "step_3"]


def test_no_weight_decay_on_norms_and_biases() -> None:
    trainer = _trainer(None, weight_decay=0.05)
    groups = trainer.optimizer.param_groups
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    exempt = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and exempt
    assert all(p.ndim > 1 for p in decayed) and all(p.ndim <= 1 for p in exempt)


def test_every_training_config_field_is_a_flag_in_both_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _script().parse_args(["--help"])
    text = capsys.readouterr().out
    for f in fields(TrainingConfig):
        for flag in {f"--{f.name}", f"--{f.name.replace('_', '-')}"}:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
    _, config = _script().parse_args(["--lr-scheduler-type", "linear", "--sfsl_gamma", "0", "--no-self-distillation"])
    assert config.lr_scheduler_type == "linear" and config.sfsl_gamma == 0 and not config.self_distillation


def test_per_depth_results_and_the_plot_go_to_the_trackers(tmp_path: Path) -> None:
    class Tracker:
        images: dict = {}

        def log_images(self, values: dict, step: int, **kwargs: object) -> None:
            self.images = values | {"step": step}

    logged: dict = {}
    accelerator = SimpleNamespace(
        log=lambda values, step: logged.update(values, step=step), is_main_process=True, trackers=[Tracker()]
    )
    results = [DepthResult("A", 0.5, 70.0, gflops=0.1), DepthResult("A", 1.0, 80.0, gflops=0.2)]
    pareto_plot([r.to_dict() for r in results], tmp_path / PLOT_NAME, title="t")
    _script().log_results(accelerator, SimpleNamespace(results=results, steps=3), tmp_path)
    assert logged == {"eval/top1/A/s=0.5": 70.0, "eval/top1/A/s=1": 80.0, "step": 3}
    image = accelerator.trackers[0].images["accuracy_vs_flops"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3


def test_an_unreachable_hub_is_detected_in_one_attempt(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import datasets
    import huggingface_hub.constants
    import huggingface_hub.utils

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    attempts: list[float] = []

    class Session:
        def head(self, url: str, timeout: float) -> None:
            attempts.append(timeout)
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    with caplog.at_level(logging.WARNING):
        _script().work_offline_if_the_hub_is_unreachable()
    assert attempts == [5]  # one quick look, no retries
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    assert datasets.config.HF_HUB_OFFLINE
    assert caplog.text.count("cannot be reached") == 1


def test_library_chatter_only_with_verbose() -> None:
    root, ours = logging.getLogger(), logging.getLogger("adaptive_depth")
    saved = root.level, ours.level, transformers.logging.get_verbosity()
    chatter = logging.getLogger("accelerate.checkpointing")  # accelerate's INFO after each save / epoch
    try:
        script = _script()
        script.configure_logging(verbose=False)
        assert not chatter.isEnabledFor(logging.INFO) and logging.getLogger("adaptive_depth.model").isEnabledFor(
            logging.WARNING
        )  # the loud random-init notice is a warning
        script.configure_logging(verbose=True)
        assert chatter.isEnabledFor(logging.INFO)
        script.configure_logging(verbose=False, main_process=False)  # only the main process speaks
        assert not logging.getLogger("adaptive_depth.model").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        transformers.logging.set_verbosity(saved[2])


def test_transformers_flag_names_are_aliases_and_a_missing_tracker_fails_before_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    args, config = script.parse_args(
        ["--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--model_name_or_path", "resnet18",
         "--dataset_name", "beans", "--bf16", "--push_to_hub", "--hub_model_id", "me/beans"]
    )  # fmt: skip
    assert (config.epochs, config.batch_size, args.model, args.dataset) == (3, 8, "resnet18", "beans")
    assert (args.mixed_precision, args.push_to_hub) == ("bf16", "me/beans")
    assert script.parse_args(["--push_to_hub", "--output_dir", "out/run7"])[0].push_to_hub == "run7"  # as transformers
    assert script.parse_args(["--push-to-hub", "me/x", "--fp16"])[0].push_to_hub == "me/x"
    assert script.parse_args(["--push_to_hub", "false"])[0].push_to_hub is None
    assert script.parse_args(["--recipe", "random-depth", "--num_train_epochs", "2"])[1].epochs == 2
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # none installed
    for argv, message in [
        (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
        (["--bf16", "--mixed-precision", "fp16"], "--bf16 and --mixed-precision fp16 disagree"),
        (["--hub_model_id", "me/x"], "add --push-to-hub"),
        (["--report-to", "tensorboard"], "tensorboard is not installed (pip install tensorboard)"),
        (["--report_to", "wandb,nope"], "--report-to wandb: wandb is not installed"),  # the first missing one
        (["--report-to", "nope"], "no such tracker"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    assert script.trackers("all") == ["all"] and script.trackers("none") is None  # "all": those installed, maybe none


def test_labels_and_splits_are_checked_end_to_end_and_the_card_keeps_local_paths_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A local dataset folder with labels {0, 2, 5} and a Hub-style test split without labels (-1)."""
    folder = tmp_path / "private" / "shop-photos"
    labels = [0, 2, 5] * 12
    images = [Image.new("L", (8, 8), 40 * (label % 6)) for label in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features).to_parquet(
        folder / "data" / "train.parquet"
    )
    unlabeled = datasets.Dataset.from_dict({"image": images[:6], "label": [-1] * 6}, features)
    unlabeled.to_parquet(folder / "data" / "test.parquet")
    out = tmp_path / "out"
    argv = ["--dataset", str(folder), "--model", "test_convnext", "--random-init", "--epochs", "1",
            "--batch-size", "8", "--image-size", "32", "--no-latency", "--checkpointing-steps", "no",
            "--output-dir", str(out)]  # fmt: skip
    assert _script().main(argv) == 0
    assert "--recipe auto picked random-depth-nested for epochs = 1" in capsys.readouterr().out  # and why
    config = json.loads((out / "config.json").read_text())
    assert list(config["id2label"].values()) == ["0", "2", "5"]  # the label values, as class names
    results = json.loads((out / "results.json").read_text())
    assert all(r["top1"] > 0 for r in results)  # scored on labeled images (the unlabeled test split gave 0.00)
    card = (out / "README.md").read_text()
    for saved in (card, json.dumps(config)):
        assert str(tmp_path) not in saved and "private" not in saved  # where the data lies stays local
    entry = ModelCard(card).data.eval_results[0]
    assert (entry.dataset_name, entry.dataset_split) == ("shop-photos", "train (held out)")
    assert "Accuracy on the `train (held out)` split" in card


def test_the_example_script_imports_public_names_only() -> None:
    """The flagship example uses the public API: the packages' exports, or modules the docs name."""
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    tree = ast.parse((ROOT / "examples" / "finetune.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("adaptive_depth") for a in node.names), ast.unparse(node)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adaptive_depth"):
            public = node.module in ("adaptive_depth", "adaptive_depth.training") or f"`{node.module}." in docs
            assert public, f"{node.module} is neither a package nor named in the docs"
            exported = importlib.import_module(node.module).__all__
            assert all(a.name in exported for a in node.names), ast.unparse(node)
