"""Saved checkpoints: strict loading, corrupt and mismatched files, user files never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from adaptive_depth import AdaptiveDepth, CheckpointError, ConfigError
from adaptive_depth.saved import read_safetensors


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=4, input_size=(3, 32, 32))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_weights(saved: Path, edit) -> None:
    """Rewrite the weights as one save still (its metadata, the save's id, kept): only the tensors differ."""
    weights, metadata = read_safetensors(saved / "model.safetensors")
    edit(weights)
    save_file(weights, saved / "model.safetensors", metadata=metadata)


def test_missing_tensor_is_an_error(saved: Path) -> None:
    _edit_weights(saved, lambda weights: weights.pop("fc.weight"))
    with pytest.raises(CheckpointError, match="fc.weight"):
        AdaptiveDepth.from_pretrained(saved)


def test_unexpected_tensor_is_an_error(saved: Path) -> None:
    _edit_weights(saved, lambda weights: weights.update({"extra.weight": weights["fc.weight"].clone()}))
    with pytest.raises(CheckpointError, match="extra.weight"):
        AdaptiveDepth.from_pretrained(saved)


def test_truncated_weights_file(saved: Path) -> None:
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        AdaptiveDepth.from_pretrained(saved)


def test_missing_weights_file(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        AdaptiveDepth.from_pretrained(saved)


def test_config_of_another_architecture(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["base_model"]["architecture"] = "resnet34"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        AdaptiveDepth.from_pretrained(saved)


def test_corrupt_config(saved: Path) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        AdaptiveDepth.from_pretrained(saved)


def test_saved_model_cannot_be_rebuilt_with_another_head(saved: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        AdaptiveDepth.from_pretrained(saved, num_classes=7)


def test_user_readme_is_never_overwritten(saved: Path) -> None:
    (saved / "README.md").write_text("my own notes")
    AdaptiveDepth.from_pretrained(saved).save_pretrained(saved)
    assert (saved / "README.md").read_text() == "my own notes"


def test_saved_depth_is_restored(saved: Path, tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained(saved).set_scaling_factor(0.5)
    model.save_pretrained(tmp_path / "half")
    assert AdaptiveDepth.from_pretrained(tmp_path / "half").scaling_factor == 0.5
