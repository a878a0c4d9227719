"""A save is complete or invisible across all its files: an exception or a kill between the moves of its files is
finished by the next load or save, a folder mixing two saves is refused, and the temporary folders of dead saves
are cleaned up."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import timm
import torch
from filelock import FileLock
from torch import nn

import adaptive_depth.saved.atomic as atomic_module
from adaptive_depth import AdaptiveDepth, CheckpointError
from adaptive_depth.saved import NORMS_NAME, is_staging
from adaptive_depth.saved.atomic import LOCK_NAME

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _resnet(seed: int, names: list[str], recalibrate: bool) -> AdaptiveDepth:
    torch.manual_seed(seed)
    base = timm.create_model("resnet18", num_classes=3, zero_init_last=False)
    model = AdaptiveDepth.wrap(base, input_size=[3, 32, 32]).eval()
    model.set_labels(names)
    if recalibrate:
        g = torch.Generator().manual_seed(seed)
        model.recalibrate_norms([torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)], [0.5, 1.0])
    return model


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class _Tiny(nn.Module):
    """A tiny network with BatchNorm, so that a save writes three files (config, weights, per-depth statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(*(_Residual() for _ in range(4)))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _tiny(seed: int, names: list[str], recalibrate: bool) -> AdaptiveDepth:
    torch.manual_seed(seed)
    model = AdaptiveDepth.wrap(_Tiny(), input_size=[3, 16, 16]).eval()
    model.set_labels(names)
    if recalibrate:
        model.recalibrate_norms([torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed))], [0.5, 1.0])
    return model


def _same(loaded: AdaptiveDepth, model: AdaptiveDepth, x: torch.Tensor = X) -> bool:
    return loaded.id2label == model.id2label and all(
        torch.equal(loaded.set_scaling_factor(s)(x), model.set_scaling_factor(s)(x)) for s in (0.5, 1.0)
    )


def _staging(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if is_staging(p.name)]


def test_an_exception_between_the_moves_is_finished_by_the_next_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _resnet(0, ["a0", "a1", "a2"], recalibrate=True)
    second = _resnet(1, ["b0", "b1", "b2"], recalibrate=False)
    first.save_pretrained(tmp_path)
    real_replace, moved = os.replace, []

    def fail_at_the_config(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target).name == "config.json":  # the weights are in place, the config is still the old one
            raise OSError(5, "Input/output error")
        moved.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(atomic_module.os, "replace", fail_at_the_config)
    with pytest.raises(OSError, match="Input/output"):
        second.save_pretrained(tmp_path)
    monkeypatch.setattr(atomic_module.os, "replace", real_replace)
    assert "model.safetensors" in moved and _staging(tmp_path)  # a mixed folder, and the rest of the save beside it
    loaded = AdaptiveDepth.from_pretrained(tmp_path)  # finishes the save: the second model, whole
    assert _same(loaded, second)
    assert _staging(tmp_path) == [] and not (tmp_path / NORMS_NAME).exists()  # the first model's statistics went


def test_a_folder_that_mixes_two_saves_is_refused(tmp_path: Path) -> None:
    first, second = _resnet(0, ["a0", "a1", "a2"], True), _resnet(1, ["b0", "b1", "b2"], True)
    second.save_pretrained(tmp_path / "second")
    for name in ("model.safetensors", NORMS_NAME):  # one file of another save of the same architecture
        first.save_pretrained(tmp_path / "first")
        (tmp_path / "first" / name).write_bytes((tmp_path / "second" / name).read_bytes())
        with pytest.raises(CheckpointError, match="another save"):
            AdaptiveDepth.from_pretrained(tmp_path / "first")
    first.save_pretrained(tmp_path / "first")
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    config["files"] = {}  # a config as saves wrote it before they fingerprinted their files
    (tmp_path / "first" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another save"):  # beside weights that a fingerprinting save wrote
        AdaptiveDepth.from_pretrained(tmp_path / "first")


def test_temporary_folders_of_dead_saves_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    model = _resnet(0, ["a0", "a1", "a2"], recalibrate=False)
    model.save_pretrained(tmp_path)
    dead = tmp_path / ".saving-dead"  # killed while writing: its lock file is there, nobody holds it
    dead.mkdir()
    (dead / LOCK_NAME).touch()
    (dead / "model.safetensors").write_bytes(b"half")
    old = tmp_path / ".saving-old"  # killed before it took its lock, long ago
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    empty = tmp_path / ".saving-empty"  # killed before it took its lock, or while it removed its folder
    empty.mkdir()
    foreign = tmp_path / ".saving-foreign"  # files without a lock, a moment ago: nothing of ours, left alone
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    live = tmp_path / ".saving-live"
    live.mkdir()
    lock = FileLock(live / LOCK_NAME)
    with lock:
        again = AdaptiveDepth.from_pretrained(tmp_path)  # loading cleans up too
        assert sorted(_staging(tmp_path)) == [".saving-foreign", ".saving-live"]
        assert _same(again, model)
        model.save_pretrained(tmp_path)
        assert sorted(_staging(tmp_path)) == [".saving-foreign", ".saving-live"]
    model.save_pretrained(tmp_path)  # its process gone (the lock released), and nothing in it was complete
    assert _staging(tmp_path) == [".saving-foreign"]


_REPLACE = os.replace


def _slow_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    if Path(target).name == "config.json":  # the last move: the weights are in place, the config not yet
        time.sleep(0.02)
    _REPLACE(source, target)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills run a forked copy of this process")
def test_sigkill_at_random_moments_leaves_one_whole_model(tmp_path: Path) -> None:
    models = [_tiny(0, ["a0", "a1", "a2"], True), _tiny(1, ["b0", "b1", "b2"], False)]
    x = torch.randn(2, 3, 16, 16)
    models[1].save_pretrained(tmp_path)  # each model's FLOPs are counted once, here: the child's saves only write
    models[0].save_pretrained(tmp_path)
    rng = random.Random(0)
    current = 0  # the model in the folder now: the child starts with the other one
    for _ in range(30):
        pid = os.fork()
        if pid == 0:  # the child saves the two models in turn until it is killed
            os.replace = _slow_replace  # a slow filesystem: kills often land between the moves of a save
            try:
                for i in range(1, 1000):
                    models[(current + i) % 2].save_pretrained(tmp_path)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = AdaptiveDepth.from_pretrained(tmp_path, model=_Tiny())
        matches = [i for i, m in enumerate(models) if _same(loaded, m, x)]
        assert len(matches) == 1, loaded.id2label
        current = matches[0]
        assert _staging(tmp_path) == []
