"""Every argument of ``AdaptiveDepth.from_pretrained`` reaches the loader that understands it, or is refused with an
error that says what works; models that transformers and timm build in other ways (TimmWrapper, in_chans) wrap and
round-trip; what safetensors cannot hold is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import transformers

from adaptive_depth import AdaptiveDepth, ConfigError, WeightsUnavailableError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AdaptiveDepth]:
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("resnet18", num_classes=3), input_size=[3, 32, 32]).eval()
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3)
    folder = tmp_path_factory.mktemp("hf")
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def test_a_saved_model_honours_depths_input_size_dtype_and_device(saved) -> None:
    folder, model = saved
    loaded = AdaptiveDepth.from_pretrained(folder, scaling_factors=[0.5, 1.0], input_size=[3, 64, 64])
    assert loaded.config.scaling_factors == [0.5, 1.0]
    assert loaded.config.input_size == [3, 64, 64] and loaded.data_config["input_size"] == (3, 64, 64)
    assert loaded.flops_table()[1.0] == loaded.flops(1.0) > model.flops(1.0)  # counted at 64 px
    half = AdaptiveDepth.from_pretrained(folder, dtype=torch.float16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert {p.dtype for p in AdaptiveDepth.from_pretrained(folder, torch_dtype="bfloat16").parameters()} == {
        torch.bfloat16
    }
    assert AdaptiveDepth.from_pretrained(folder, policy="last").config.policy == "last"  # its own policy
    # its own number of classes (a script fine-tuning it further on the same task passes its dataset's): the same head
    same = AdaptiveDepth.from_pretrained(folder, num_classes=3).eval()
    torch.testing.assert_close(same(X), model(X))


def test_a_saved_transformers_model_takes_its_own_number_of_classes(hf_folder: Path, tmp_path: Path) -> None:
    AdaptiveDepth.from_pretrained(hf_folder, input_size=[3, 32, 32]).save_pretrained(tmp_path / "adaptive")
    assert AdaptiveDepth.from_pretrained(tmp_path / "adaptive", num_classes=3) is not None
    with pytest.raises(ConfigError, match=r"classifier \(3 classes\).*reset_classifier"):
        AdaptiveDepth.from_pretrained(tmp_path / "adaptive", num_classes=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "spread"}, "saved with the depth policy 'last'"),
        ({"block_patterns": [r"layer1\.\d"]}, "blocks are fixed"),
        ({"num_classes": 10}, "reset_classifier"),
        ({"not_a_real_kwarg": 3}, "not_a_real_kwarg"),
        ({"quantization_config": {"load_in_8bit": True}}, "quantize afterwards"),
        ({"device_map": {"a": "cpu", "b": "meta"}}, "one device"),
        ({"input_size": [1, 32, 32]}, "does not run at input_size"),
        ({"dtype": torch.int8}, "floating"),
    ],
)
def test_a_saved_model_refuses_what_it_cannot_honour(saved, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdaptiveDepth.from_pretrained(saved[0], **kwargs)


def test_timm_arguments_are_honoured_or_refused() -> None:
    with pytest.raises(ConfigError, match="not_a_real_kwarg"):
        AdaptiveDepth.from_pretrained("resnet18", pretrained=False, not_a_real_kwarg=3)
    with pytest.raises(ConfigError, match="quantize afterwards"):
        AdaptiveDepth.from_pretrained("resnet18", pretrained=False, quantization_config={"load_in_8bit": True})
    plain = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, input_size=[3, 32, 32])
    half = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, input_size=[3, 32, 32], torch_dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.stages == plain.stages  # discovery probed it in float32, before the cast


def test_transformers_arguments_reach_transformers(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pretrained in (True, False):
        with pytest.raises(ConfigError, match="not_a_real_kwarg"):
            AdaptiveDepth.from_pretrained(hf_folder, pretrained=pretrained, not_a_real_kwarg=3)
    with pytest.raises(ValueError, match="quantization"):  # transformers' own answer: it got the option
        AdaptiveDepth.from_pretrained(hf_folder, quantization_config={"quant_method": "no-such-method"})
    with pytest.raises(ConfigError, match="quantize afterwards"):
        AdaptiveDepth.from_pretrained(hf_folder, pretrained=False, quantization_config={"load_in_8bit": True})
    seen: dict = {}
    original = transformers.ResNetForImageClassification.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.ResNetForImageClassification, "from_pretrained", classmethod(spy))
    model = AdaptiveDepth.from_pretrained(hf_folder, dtype=torch.bfloat16, device_map="cpu")
    assert seen["dtype"] == torch.bfloat16 and seen["device_map"] == "cpu"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    random = AdaptiveDepth.from_pretrained(hf_folder, pretrained=False, dtype="float16")
    assert {p.dtype for p in random.parameters()} == {torch.float16}


def test_a_timm_hub_id_with_random_weights_needs_no_hub() -> None:
    model = AdaptiveDepth.from_pretrained("timm/convnext_atto.d2_in1k", pretrained=False)  # offline, not cached
    assert model.config.base_model.architecture == "convnext_atto"
    with pytest.raises(WeightsUnavailableError, match="pretrained=False"):
        AdaptiveDepth.from_pretrained("timm/convnext_atto.d2_in1k")
    with pytest.raises(WeightsUnavailableError) as error:  # another org: its config.json is needed all the same
        AdaptiveDepth.from_pretrained("someone/convnext-like", pretrained=False)
    assert "pass pretrained=False" not in str(error.value) and "timm architecture" in str(error.value)


def test_one_channel_models_are_probed_with_one_channel(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, in_chans=1, num_classes=3)
    assert model.config.input_size[0] == 1
    wrapped = AdaptiveDepth.wrap(timm.create_model("resnet18", in_chans=1, num_classes=3), input_size=None)
    assert wrapped.config.input_size == [1, 224, 224] and wrapped.stages == model.stages
    from PIL import Image

    assert model.create_transform()(Image.new("RGB", (40, 40))).shape == (1, 224, 224)
    model.save_pretrained(tmp_path)
    assert AdaptiveDepth.from_pretrained(tmp_path).config.input_size[0] == 1


def test_a_space_to_depth_stem_is_probed_with_the_image_channels_not_its_first_convs() -> None:
    # TResNet's first conv takes 48 channels (3 x 4 x 4 after its space-to-depth stem); the image has 3
    model = AdaptiveDepth.from_pretrained("tresnet_m", pretrained=False, num_classes=3)
    assert model.config.input_size == [3, 224, 224] and model.get_submodule("model.body.conv1").in_channels == 48


def test_a_dynamically_quantized_model_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = AdaptiveDepth.wrap(timm.create_model("resnet18", num_classes=3), input_size=[3, 32, 32]).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ConfigError, match="quantized"):
        quantized.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists() or list((tmp_path / "q").iterdir()) == []


def test_a_transformers_timm_wrapper_survives_a_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.TimmWrapperConfig(architecture="resnet18", num_labels=10)
    model = AdaptiveDepth.wrap(transformers.TimmWrapperForImageClassification(config), input_size=[3, 32, 32]).eval()
    model.save_pretrained(tmp_path)
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.model.config.num_labels == 10
    for s in (0.5, 1.0):
        assert torch.equal(again.set_scaling_factor(s)(X).logits, model.set_scaling_factor(s)(X).logits)
