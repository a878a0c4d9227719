"""What a deployment needs travels with the model: its preprocessing, its class names, a complete card."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _run_without_the_library(code: str, **env: str) -> str:
    """Run ``code`` in a fresh Python that never imports adaptive_depth (checked), offline."""
    check = "\nimport sys\nassert not any(m.startswith('adaptive_depth') for m in sys.modules), 'imported the plugin'\n"
    done = subprocess.run(
        [sys.executable, "-c", code + check],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_timm_export_loads_with_timm_alone_from_a_folder_and_the_hub_cache(tmp_path: Path, hub_repo) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32)).eval()
    model.set_labels(["cat", "dog", "fish"])
    folder = model.save_export(tmp_path / "half", 0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.set_scaling_factor(0.5)(x)
    snapshot = hub_repo("me/resnet18-half", folder)
    code = f"""
import timm, torch
x = torch.load({str(tmp_path / "x.pt")!r})
for name in ("local-dir:{folder}", "hf-hub:me/resnet18-half"):
    m = timm.create_model(name, pretrained=True).eval()
    print(name, [len(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)], m.pretrained_cfg["label_names"])
    torch.save(m(x), {str(tmp_path / "out.pt")!r})
"""
    out = _run_without_the_library(code, HF_HOME=os.environ["HF_HOME"])
    assert out.count("[1, 1, 1, 1] ['cat', 'dog', 'fish']") == 2, out
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-4, atol=1e-5)
    assert snapshot.is_dir()


def test_a_timm_architecture_without_a_depth_argument_is_a_clear_error(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("regnetx_002", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match="no per-stage depth argument"):
        model.save_export(tmp_path / "x", 0.5)


def test_a_transformers_export_loads_with_automodel_and_pipeline(tmp_path: Path) -> None:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], num_labels=3, image_size=32
    )
    model = AdaptiveDepth.wrap(transformers.ResNetForImageClassification(config), input_size=[3, 32, 32]).eval()
    model.set_labels(["cat", "dog", "fish"])
    folder = model.save_export(tmp_path / "half", 0.5)
    IMAGE.save(tmp_path / "image.png")
    code = f"""
import transformers
m = transformers.AutoModelForImageClassification.from_pretrained({str(folder)!r})
print("depths", m.config.depths)
classify = transformers.pipeline("image-classification", model={str(folder)!r})
print("labels", sorted(p["label"] for p in classify({str(tmp_path / "image.png")!r}, top_k=3)))
"""
    out = _run_without_the_library(code)
    assert "depths [2, 2]" in out and "labels ['cat', 'dog', 'fish']" in out, out


def test_predict_script_names_the_classes_at_the_chosen_depth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts import load_script

    predict = load_script("examples/predict.py")
    torch.manual_seed(0)
    model = AdaptiveDepth.from_pretrained("test_convnext", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    model.set_labels(["cat", "dog", "fish"]).save_pretrained(tmp_path / "model")
    IMAGE.save(tmp_path / "a.png")
    Image.new("L", (20, 30), 90).save(tmp_path / "b.png")  # grayscale is converted, as any user image would be
    assert predict.main([str(tmp_path / "model"), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                         "--scaling-factor", "0.5", "--top-k", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    model.eval().set_scaling_factor(0.5)
    assert lines[0].startswith(f"s = 0.5, blocks per stage {model.active_depth}")
    with torch.no_grad():  # the printed classes are the model's own top-2 at s = 0.5, by name
        probs = model(model.create_transform()(IMAGE.convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    top = probs.topk(2)
    expected = ", ".join(f"{model.id2label[int(i)]} ({float(p):.1%})" for p, i in zip(top.values, top.indices))
    assert lines[1] == f"{tmp_path / 'a.png'}: {expected}"
    assert lines[2].startswith(f"{tmp_path / 'b.png'}: ")
    (tmp_path / "c.png").write_text("not an image")
    with pytest.raises(SystemExit, match="c.png is not an image PIL can read"):
        predict.main([str(tmp_path / "model"), str(tmp_path / "c.png")])


def test_predict_reads_a_transformers_models_logits(tmp_path: Path) -> None:
    from scripts import load_script

    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=2, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = AdaptiveDepth.from_pretrained(tmp_path).eval().set_scaling_factor(0.5)
    [[(name, p)]] = load_script("examples/predict.py").predict(model, [IMAGE])
    with torch.no_grad():
        logits = model(model.create_transform()(IMAGE).unsqueeze(0)).logits[0]
    assert name == ("no", "yes")[int(logits.argmax())] and p == pytest.approx(float(logits.softmax(-1).max()))
