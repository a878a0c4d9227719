"""What a deployment needs travels with the model: its preprocessing, its class names, a complete card."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import transformers
from huggingface_hub import ModelCard
from PIL import Image
from without_library import run_without_the_library

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.report import DepthResult, TrainingReport
from adaptive_depth.training import load_image_classification_data, make_loaders

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
    assert timm.data.resolve_model_data_config(model) == model.data_config  # not timm's ImageNet defaults
    data = load_image_classification_data("digits", max_train_samples=4, max_eval_samples=4)
    loaders = make_loaders(data, model, batch_size=2, seed=0)  # the training pipeline: the processor's statistics
    for loader in (loaders.eval, loaders.recalibration):
        assert torch.equal(loader.dataset.transform(IMAGE), model.create_transform()(IMAGE))
    model.save_pretrained(tmp_path / "adaptive")
    assert (tmp_path / "adaptive" / "preprocessor_config.json").is_file()
    again = AdaptiveDepth.from_pretrained(tmp_path / "adaptive")
    assert again.image_processor is not None and again.data_config == model.data_config
    assert torch.equal(again.create_transform()(IMAGE), model.create_transform()(IMAGE))
    # Another model saved over it takes nothing of the first along: no processor describing someone else's inputs.
    AdaptiveDepth.wrap(timm.create_model("test_vit", num_classes=3)).save_pretrained(tmp_path / "adaptive")
    assert not (tmp_path / "adaptive" / "preprocessor_config.json").exists()
    assert AdaptiveDepth.from_pretrained(tmp_path / "adaptive").image_processor is None


def test_a_pretrained_transformers_model_without_a_processor_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)  # no preprocessor_config.json
    with caplog.at_level(logging.WARNING, logger="adaptive_depth"):
        AdaptiveDepth.from_pretrained(tmp_path, pretrained=False)  # random weights: no statistics to match
        assert "has no image processor" not in caplog.text
        model = AdaptiveDepth.from_pretrained(tmp_path)
    assert "has no image processor" in caplog.text and "ImageNet mean and std" in caplog.text
    assert model.image_processor is None and model.data_config["input_size"] == (3, 32, 32)


def test_the_cards_metadata_and_its_snippet_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    base = model.config.base_model
    base.name, base.pretrained, base.license = "resnet18.a1_in1k", True, "apache-2.0"  # as if from the Hub
    results = [DepthResult("A", 0.5, 70.0), DepthResult("A", 1.0, 80.0), DepthResult("B", 1.0, 60.0)]
    report = TrainingReport(config={}, deployed="A", results=results, dataset="uoft-cs/cifar10")
    model.config.extra["training"] = report.to_dict()
    card = ModelCard(str(model.generate_model_card()))  # parsed as the Hub parses it
    assert card.data.base_model == "timm/resnet18.a1_in1k" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("top-1 accuracy at scaling factor 0.5", 70.0),
        ("top-1 accuracy at scaling factor 1", 80.0),
    ]
    # The one-image snippet runs as written, for a timm and a transformers base.
    hf = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=2, image_size=32)
    hf_model = AdaptiveDepth.wrap(transformers.ResNetForImageClassification(hf), input_size=[3, 32, 32])
    monkeypatch.chdir(tmp_path)
    IMAGE.save("image.png")
    for name, wrapped in (("timm", model), ("transformers", hf_model)):
        wrapped.save_pretrained(tmp_path / name)
        text = (tmp_path / name / "README.md").read_text()
        snippet = text.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(tmp_path / name))
        exec(compile(snippet, f"{name} card", "exec"), {})  # our own card's code


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


def test_a_timm_export_loads_with_timm_alone_from_a_folder_and_the_hub_cache(tmp_path: Path, hub_repo) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32)).eval()
    model.set_labels(["cat", "dog", "fish"])
    folder = model.save_export(tmp_path / "half", 0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.set_scaling_factor(0.5)(x)
    snapshot = hub_repo("me/resnet18-half", folder)
    IMAGE.save(tmp_path / "image.png")
    code = f"""
import timm, torch, transformers
x = torch.load({str(tmp_path / "x.pt")!r})
for i, name in enumerate(("local-dir:{folder}", "hf-hub:me/resnet18-half")):
    m = timm.create_model(name, pretrained=True).eval()
    print(name, [len(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)], m.pretrained_cfg["label_names"])
    torch.save(m(x), {str(tmp_path)!r} + f"/out{{i}}.pt")
# transformers' TimmWrapper reads the same repository: Auto classes and pipeline()
wrapped = transformers.AutoModelForImageClassification.from_pretrained({str(folder)!r}).eval()
print("wrapper", type(wrapped).__name__, wrapped.config.id2label)
torch.save(wrapped(x).logits, {str(tmp_path / "out2.pt")!r})
classify = transformers.pipeline("image-classification", model={str(folder)!r})
print("labels", sorted(p["label"] for p in classify({str(tmp_path / "image.png")!r}, top_k=3)))
"""
    out = run_without_the_library(code, HF_HOME=os.environ["HF_HOME"])
    assert out.count("[1, 1, 1, 1] ['cat', 'dog', 'fish']") == 2, out
    assert "wrapper TimmWrapperForImageClassification {0: 'cat', 1: 'dog', 2: 'fish'}" in out, out
    assert "labels ['cat', 'dog', 'fish']" in out, out
    for i in range(3):
        torch.testing.assert_close(torch.load(tmp_path / f"out{i}.pt"), expected, rtol=1e-4, atol=1e-5)
    assert snapshot.is_dir()


def test_the_timm_check_runs_before_anything_is_in_place_and_a_failed_one_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptive_depth import export_repo

    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32)).eval()
    folder = model.save_export(tmp_path / "out", 1.0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    checked, real_check = [], export_repo._check_rebuild

    def spy(plain: torch.nn.Module, staged: Path, example: torch.Tensor) -> None:
        checked.append((staged, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}))
        real_check(plain, staged, example)

    monkeypatch.setattr(export_repo, "_check_rebuild", spy)
    model.save_export(folder, 0.5)
    [(staged, in_place)] = checked
    assert staged != folder and staged.parent == folder  # the staging folder, inside the destination
    assert in_place == before  # while the new export was checked, the earlier one was still in place, untouched
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after != before  # and replaced once the check passed

    def refuse(*_: object) -> None:
        raise ConfigError("timm rebuilds another network")

    monkeypatch.setattr(export_repo, "_check_rebuild", refuse)
    with pytest.raises(ConfigError, match="another network"):
        model.save_export(folder, 0.25)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == after  # nothing changed, nothing left behind


def test_a_one_channel_timm_model_exports(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained(
        "resnet18", pretrained=False, num_classes=3, in_chans=1, input_size=(1, 32, 32)
    ).eval()
    folder = model.save_export(tmp_path / "grey", 0.5)
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert rebuilt.pretrained_cfg["input_size"][0] == 1 and len(rebuilt.pretrained_cfg["mean"]) == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.set_scaling_factor(0.5)(x), rtol=1e-4, atol=1e-5)


def test_a_timm_export_keeps_the_depth_of_stages_that_hold_one_block(tmp_path: Path) -> None:
    # layers=[2, 1, 1, 1]: one stage is found (layer1); timm's argument has four entries
    model = AdaptiveDepth.from_pretrained(
        "resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32), layers=[2, 1, 1, 1]
    ).eval()
    folder = model.save_export(tmp_path / "half", 0.5)
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert [len(rebuilt.get_submodule(f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.set_scaling_factor(0.5)(x), rtol=1e-4, atol=1e-5)


def test_a_timm_architecture_without_a_depth_argument_is_a_clear_error(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("regnetx_002", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    with pytest.raises(ConfigError, match=r"no per-stage depth argument.*format='onnx'"):
        model.save_export(tmp_path / "x", 0.5)
    assert not (tmp_path / "x").exists()


def test_a_transformers_export_loads_with_automodel_and_pipeline(tmp_path: Path, hub_repo, fake_hub_upload) -> None:
    calls, uploaded = fake_hub_upload
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], num_labels=3, image_size=32
    )
    model = AdaptiveDepth.wrap(transformers.ResNetForImageClassification(config), input_size=[3, 32, 32]).eval()
    model.set_labels(["cat", "dog", "fish"])
    folder = model.save_export(tmp_path / "half", 0.5)
    model.push_export("me/resnet-half", 0.5)  # the same files, uploaded
    assert calls == {"create_repo": "me/resnet-half", "upload_folder": "me/resnet-half"}
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in folder.iterdir())
    hub_repo("me/resnet-half", uploaded)
    IMAGE.save(tmp_path / "image.png")
    code = f"""
import transformers
for name in ({str(folder)!r}, "me/resnet-half"):  # a folder, and a Hub id read from the cache (offline)
    m = transformers.AutoModelForImageClassification.from_pretrained(name)
    p = transformers.AutoImageProcessor.from_pretrained(name)
    print("depths", m.config.depths, "mean", [round(v, 3) for v in p.image_mean])
    classify = transformers.pipeline("image-classification", model=name)
    print("labels", sorted(p["label"] for p in classify({str(tmp_path / "image.png")!r}, top_k=3)))
"""
    out = run_without_the_library(code, HF_HOME=os.environ["HF_HOME"])
    mean = [round(v, 3) for v in model.data_config["mean"]]
    assert out.count(f"depths [2, 2] mean {mean}") == 2 and out.count("labels ['cat', 'dog', 'fish']") == 2, out


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


def test_pipeline_and_auto_classes_given_a_saved_adaptive_model_say_what_to_do(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32))
    model.save_pretrained(tmp_path / "saved")
    advice = r"saved adaptive-depth model.*AdaptiveDepth.from_pretrained.*save_export"
    for load in (
        lambda: transformers.pipeline("image-classification", model=str(tmp_path / "saved")),
        lambda: transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "saved"),
    ):
        with pytest.raises(ConfigError, match=advice):
            load()
    assert AdaptiveDepth.from_pretrained(tmp_path / "saved").config.model_type == "adaptive-depth"
    # Without this library, transformers' own error names the model type instead of "Unrecognized model".
    code = f"""
import transformers
try:
    transformers.AutoConfig.from_pretrained({str(tmp_path / "saved")!r})
except ValueError as e:
    print(e)
"""
    assert "model type `adaptive-depth`" in run_without_the_library(code)
