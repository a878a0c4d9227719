"""Training runs that would lose work, train nothing or crash: each one stops early with a clear error, or works."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image

from adaptive_depth import AdaptiveDepth, CheckpointError, ConfigError, DataError
from adaptive_depth.training import (
    CooperativeTrainer,
    TrainingConfig,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.checkpoints import STATE_NAME, checkpoint_dirs, resolve_checkpoint
from adaptive_depth.training.output_dir import FINAL_OUTPUTS, LOCK_NAME, OutputDir, check_output_dir, prepare_output_dir
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("examples/finetune.py")


def _trainer(out: Path | None, samples: int = 48, **config) -> CooperativeTrainer:
    set_seed(0)
    data = load_image_classification_data("digits", max_train_samples=samples, max_eval_samples=16)
    model = AdaptiveDepth.wrap(timm.create_model("test_convnext", num_classes=10), input_size=[3, 32, 32])
    cfg = TrainingConfig(**({"epochs": 1, "batch_size": 16, "interactive": False} | config))
    loaders = make_loaders(data, model, batch_size=cfg.batch_size, seed=0, input_size=[3, 32, 32])
    return CooperativeTrainer(
        model, cfg, loaders.train, loaders.eval, accelerator=Accelerator(), output_dir=out, checkpoint_steps=1
    )


# ---------------------------------------------------------------------- nothing to train


def test_a_run_without_a_full_batch_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no full batch: 12 images for batches of 16"):
        _trainer(None, samples=12)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no full batch"):
        _script().main(["--max-train-samples", "50", "--batch-size", "64", "--output-dir", str(out)])
    assert not out.exists()  # nothing written


# ---------------------------------------------------------------------- checkpoints


def test_checkpoints_are_complete_json_and_resume_only_their_own_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _trainer(out)
    first.train()  # 3 steps, a checkpoint after each
    dirs = first.checkpoint_dirs()
    assert [d.name for d in dirs] == ["step_1", "step_2", "step_3"]
    # Our own state is JSON: accelerate's custom_checkpoint_*.pkl (read back with a full unpickler) is gone, and
    # only accelerate's RNG states remain pickled (read back with torch.load(weights_only=True)).
    assert {p.name for p in dirs[0].glob("*.pkl")} == {"random_states_0.pkl"}
    state = json.loads((dirs[0] / STATE_NAME).read_text())
    assert state["progress"]["step"] == 1 and state["progress"]["run_id"] == first.progress.run_id
    # An interrupted save: a step folder without its state, and a staging folder: never taken for a checkpoint.
    shutil.copytree(dirs[-1], out / "checkpoints" / "step_9")
    (out / "checkpoints" / "step_9" / STATE_NAME).unlink()
    (out / "checkpoints" / ".step_10.incomplete").mkdir()
    assert resolve_checkpoint(out, "latest").name == "step_3"
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_checkpoint(out, out / "checkpoints" / "step_9")
    # A checkpoint of a run with other settings is refused, not silently continued.
    other = _trainer(out, learning_rate=0.5)
    with pytest.raises(ConfigError, match="other settings.*learning_rate=0.001"):
        other.train(resume_from_checkpoint="latest")
    # A damaged complete checkpoint is a CheckpointError naming it, not a raw safetensors error.
    (dirs[1] / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="step_2"):
        _trainer(out).train(resume_from_checkpoint=dirs[1])
    # A finished run removes its own checkpoints only.
    foreign = out / "checkpoints" / "step_50"
    shutil.copytree(dirs[0], foreign)
    data = json.loads((foreign / STATE_NAME).read_text())
    data["progress"]["run_id"] = "another-run"
    (foreign / STATE_NAME).write_text(json.dumps(data))
    first.remove_checkpoints()
    assert [d.name for d in checkpoint_dirs(out)] == ["step_50"]


def test_overwrite_clears_our_outputs_and_old_checkpoints_but_never_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _trainer(out).train()
    for name in ("config.json", "model.safetensors", "results.json"):
        (out / name).write_text("{}")
    (out / "README.md").write_text("my notes about this folder")
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite-output-dir"):
        check_output_dir(out)  # a fresh run refuses a used folder
    with pytest.raises(ConfigError, match="resumed run may only find"):
        check_output_dir(out, resume=True)  # ...and so does a resumed one that would overwrite a finished model
    prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoints", "mine.txt"]
    assert checkpoint_dirs(out) == []  # a new run cannot resume from the old one
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_checkpoint(out, "latest")
    assert (out / "README.md").read_text() == "my notes about this folder"


def test_resume_with_overwrite_keeps_the_checkpoints_it_resumes_from(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _trainer(out).train()
    (out / "config.json").write_text("{}")
    check_output_dir(tmp_path / "new", resume=True)
    prepare_output_dir(out, overwrite=True, resume=True)
    assert not (out / "config.json").exists() and len(checkpoint_dirs(out)) == 3


def test_output_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("data")
    with pytest.raises(ConfigError, match="is a file"):
        _script().main(["--output-dir", str(path)])
    with pytest.raises(ConfigError, match="is a file"):
        _script().main(["--output-dir", str(path), "--resume-from-checkpoint", "latest", "--overwrite-output-dir"])
    assert path.read_text() == "data"


def test_script_resume_refuses_a_folder_with_a_finished_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the user's")
    with pytest.raises(ConfigError, match="resumed run"):
        _script().main(["--output-dir", str(out), "--resume-from-checkpoint", "latest"])
    assert (out / "model.safetensors").read_text() == "the user's"


def test_a_resume_with_other_script_settings_is_refused_and_with_the_same_ones_runs(
    tmp_path: Path, image_folder: Path
) -> None:
    out = tmp_path / "out"
    common = ["--model", "test_convnext", "--random-init", "--epochs", "1", "--max-train-samples", "32",
              "--max-eval-samples", "16", "--batch-size", "16", "--no-latency", "--output-dir", str(out)]  # fmt: skip
    assert _script().main([*common, "--checkpointing-steps", "1", "--keep-checkpoints"]) == 0
    for name in FINAL_OUTPUTS:  # as if the run had been killed before its final save...
        (out / name).unlink(missing_ok=True)
    killed_save = out / ".saving-k1ll3d"  # ...in it: a model save's temporary folder (adaptive_depth.saved.atomic)
    killed_save.mkdir()
    (killed_save / "model.safetensors").write_bytes(b"half a file")
    resume = [*common, "--resume-from-checkpoint", "latest"]
    for flags, difference in [
        (["--policy", "spread"], "policy='last' (this run: 'spread')"),
        (["--image-size", "48"], "image_size=32 (this run: 48)"),
        (["--max-train-samples", "24"], "max_train_samples=32 (this run: 24)"),
        (["--dataset", f"imagefolder:{image_folder}"], f"dataset='digits' (this run: 'imagefolder:{image_folder}')"),
        (["--leader-model", "resnet18"], "leader_model=None (this run: 'resnet18')"),
    ]:
        with pytest.raises(ConfigError, match="other settings.*" + re.escape(difference)):
            _script().main([*resume, *flags])
    # Mixed precision is recorded from the Accelerator (one process cannot make a second one with another).
    state = json.loads((checkpoint_dirs(out)[-1] / STATE_NAME).read_text())
    settings = {k: v for k, v in state["settings"].items() if k != "mixed_precision"}
    bf16 = SimpleNamespace(mixed_precision="bf16", num_processes=1)
    with pytest.raises(ConfigError, match=re.escape("mixed_precision='no' (this run: 'bf16')")):
        OutputDir(out, resume_from_checkpoint="latest").checkpoint_to_resume(
            TrainingConfig.from_dict(state["config"]), settings, bf16
        )
    # The same settings resume, also without writing new checkpoints (found in the output folder all the same).
    assert _script().main([*resume, "--checkpointing-steps", "no"]) == 0
    assert (out / "config.json").is_file() and checkpoint_dirs(out) == []  # the finished run removed its own
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match=f"no complete checkpoint to resume from in {re.escape(str(empty))}"):
        _script().main(
            ["--output-dir", str(empty), "--checkpointing-steps", "no", "--resume-from-checkpoint", "latest"]
        )


def _lock(out: Path, **values: object) -> None:
    lock = {"token": "another", "pid": os.getpid(), "host": socket.gethostname(), "process_started": 0.0}
    (out / LOCK_NAME).write_text(json.dumps(lock | {"since": "yesterday"} | values))


def test_one_run_at_a_time_holds_an_output_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    first, second = OutputDir(out), OutputDir(out)  # two runs started on one fresh folder: both pass the check
    with first.claim(accelerator):
        busy = rf"in use by a run that is still going \(pid {os.getpid()} "
        with pytest.raises(ConfigError, match=busy), second.claim(accelerator):
            pass
        with pytest.raises(ConfigError, match="in use by a run that is still going"):
            _script().main(["--output-dir", str(out), "--overwrite-output-dir"])  # refused before anything loads
    assert not (out / LOCK_NAME).exists()  # released at the end
    # A run that was killed leaves its lock: stale once its process is gone, or its pid runs another process.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(ended.stdout), os.getpid()):  # an ended process; this one, but started at another time
        _lock(out, pid=pid, process_started=12345.0)
        with caplog.at_level(logging.WARNING), OutputDir(out).claim(accelerator):
            assert json.loads((out / LOCK_NAME).read_text())["token"] != "another"
        assert "ended without releasing it" in caplog.text and not (out / LOCK_NAME).exists()
    _lock(out, host="elsewhere")  # a lock from another host cannot be checked from here
    with pytest.raises(ConfigError, match=r"a run on another host \(pid \d+ on elsewhere.*if it has ended, delete"):
        OutputDir(out)


def test_a_run_saves_only_while_the_folder_is_still_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    saved: list[Path] = []
    trainer = SimpleNamespace(accelerator=accelerator, save=lambda result, path, **_: saved.append(path))
    output = OutputDir(out)
    with output.claim(accelerator):
        (out / LOCK_NAME).unlink()  # deleted by hand, and another run took the folder
        taken = "no longer this run's.*names another run.*Nothing was saved"
        with OutputDir(out).claim(accelerator), pytest.raises(ConfigError, match=taken):
            output.save(trainer, SimpleNamespace())
        assert saved == []
    with OutputDir(out).claim(accelerator) as mine:
        mine.save(trainer, SimpleNamespace())
    assert saved == [out]


def test_evaluation_refuses_labels_outside_the_classes() -> None:
    from torch import nn

    from adaptive_depth.training import evaluate_accuracy

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.zeros(2, 1, 2, 2), torch.tensor([0, -1]))]  # -1: an image without a label
    with pytest.raises(DataError, match=r"classes 0\.\.2, got \[-1, 0\]"):
        evaluate_accuracy(model, batches, Accelerator(), [1.0], num_classes=3)


# ---------------------------------------------------------------------- data


def test_undecodable_images_are_found_before_training_and_named(tmp_path: Path, image_folder: Path) -> None:
    bad = image_folder / "kind1" / "broken.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(bad)
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    with pytest.raises(DataError, match=r"broken\.png.*--skip-bad-images"):
        load_image_classification_data(f"imagefolder:{image_folder}", eval_fraction=0.5)
    data = load_image_classification_data(f"imagefolder:{image_folder}", eval_fraction=0.5, skip_bad_images=True)
    assert len(data.train) + len(data.eval) == 12  # the 12 good images, the broken one left out


def test_one_class_image_folder_says_so(tmp_path: Path) -> None:
    root = tmp_path / "images" / "only"
    root.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (6, 6), (i, 0, 0)).save(root / f"{i}.png")
    with pytest.raises(DataError, match="class subfolders"):
        load_image_classification_data(f"imagefolder:{tmp_path / 'images'}")


def test_bad_checkpointing_steps_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _script().parse_args(["--checkpointing-steps", "abc"])
    assert "expected 'epoch', 'no' or a positive number of steps, got 'abc'" in capsys.readouterr().err
    args, config = _script().parse_args(["--checkpointing-steps", "5", "--learning_rate", "0.5", "--recipe", "paper"])
    assert args.checkpointing_steps == 5 and config.learning_rate == 0.5 and config.interactive
    assert not _script().parse_args([])[1].interactive  # one Teammate unless asked (docs/benchmarks.md)
    args, config = _script().parse_args(["--dataset", "imagefolder:x"])  # the embedded data's 1e-2 only on them
    assert config.learning_rate == 1e-3 and args.report_to == "none"


# ---------------------------------------------------------------------- DDP


def _launch_modes(processes: int, batch_size: int, *modes: str) -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launch = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", *launch, str(ROOT / "tests" / "ddp_modes.py"),
        "--batch-size", str(batch_size), *modes,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("OK ")}


def test_every_training_mode_runs_under_two_process_ddp() -> None:
    two = _launch_modes(2, 8)
    assert list(two) == [
        "two-teammates",
        "one-teammate",
        "random-depth",
        "sandwich",
        "frozen-leader",
        "cached-leader",
        "sampled-ema",
        "nested",
        "alone",
        "views",
        "streams",
        "refused",
    ], two
    assert all("steps=2" in line for mode, line in two.items() if mode != "refused"), two
    # Per-Teammate data streams: the same global batches on one process give the same weights.
    one = _launch_modes(1, 16, "streams")

    def checksum(line: str) -> float:
        return float(line.split("checksum=")[1])

    assert checksum(one["streams"]) == pytest.approx(checksum(two["streams"]), rel=1e-6, abs=0)
