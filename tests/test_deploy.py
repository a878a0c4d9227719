"""What a deployment needs travels with the model: its preprocessing, its class names, a complete card."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import timm.data
import torch
import transformers
from huggingface_hub import ModelCard
from PIL import Image

from adaptive_depth import AdaptiveDepth, ConfigError

IMAGE = Image.new("RGB", (50, 40), (200, 30, 90))


def test_a_timm_tags_preprocessing_survives_save_and_load(tmp_path: Path) -> None:
    # resnet18.tv_in1k preprocesses unlike resnet18's default tag (bilinear, crop 0.875 against bicubic, 0.95)
    model = AdaptiveDepth.from_pretrained("resnet18.tv_in1k", pretrained=False, num_classes=4, input_size=(3, 64, 64))
    expected = {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 0.875}
    assert {k: model.data_config[k] for k in expected} == expected
    assert timm.data.resolve_model_data_config(model) == model.data_config  # timm reads the wrapper too
    model.save_pretrained(tmp_path)
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.data_config == model.data_config
    assert torch.equal(again.create_transform()(IMAGE), model.create_transform()(IMAGE))
    assert model.create_transform()(IMAGE).shape == (3, 64, 64)


def test_a_transformers_processor_is_saved_and_restored(tmp_path: Path) -> None:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    source = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(source)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1] * 3, image_std=[0.3] * 3
    )
    processor.save_pretrained(source)
    model = AdaptiveDepth.from_pretrained(source)
    assert model.data_config["mean"] == (0.1, 0.1, 0.1) and model.data_config["input_size"] == (3, 32, 32)
    model.save_pretrained(tmp_path / "adaptive")
    assert (tmp_path / "adaptive" / "preprocessor_config.json").is_file()
    again = AdaptiveDepth.from_pretrained(tmp_path / "adaptive")
    assert again.image_processor is not None and again.data_config == model.data_config
    assert torch.equal(again.create_transform()(IMAGE), model.create_transform()(IMAGE))


def test_class_names_travel_to_the_config_the_card_and_the_base_model(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match="3 classes"):
        model.set_labels(["cat", "dog"])
    model.set_labels(["cat", "dog", "fish"])
    assert model.model.pretrained_cfg["label_names"] == ["cat", "dog", "fish"]
    model.save_pretrained(tmp_path)
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.id2label == {0: "cat", 1: "dog", 2: "fish"} and again.label2id["fish"] == 2
    card = ModelCard.load(tmp_path / "README.md")
    assert "`cat`, `dog`, `fish`" in card.text and "pip install adaptive-depth" in card.text
    assert card.data.library_name == "adaptive-depth"
