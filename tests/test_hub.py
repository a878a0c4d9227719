"""Loading from timm names, Hub ids and local folders, and pushing, all offline against a laid-out Hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import transformers as tf
from cases import HF_VIT_CONFIG
from safetensors.torch import save_file
from timm.models import save_for_hf

from adaptive_depth import AdaptiveDepth, UnknownModelError, WeightsUnavailableError


def _same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in expected.items() if not k.startswith(skip))


def test_timm_name_loads_pretrained_weights_from_hub_cache(hub_repo, tmp_path: Path) -> None:
    source = timm.create_model("test_vit")
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    hub_repo("timm/test_vit.r160_in1k", tmp_path)

    model = AdaptiveDepth.from_pretrained("test_vit")

    assert _same_weights(model.model, source.state_dict())
    assert model.config.base_model.name == "test_vit.r160_in1k" and model.config.base_model.pretrained
    assert len(model.stages) == 1 and model.stages[0].num_blocks == 6


def test_timm_name_with_new_head_keeps_backbone_weights(hub_repo, tmp_path: Path) -> None:
    source = timm.create_model("test_vit")
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    hub_repo("timm/test_vit.r160_in1k", tmp_path)

    model = AdaptiveDepth.from_pretrained("test_vit", num_classes=3)

    assert model.model.head.out_features == 3
    assert _same_weights(model.model, source.state_dict(), skip=("head.",))


@pytest.mark.parametrize("prefix", ["", "hf-hub:"])
def test_timm_hub_repo(hub_repo, tmp_path: Path, prefix: str) -> None:
    source = timm.create_model("test_convnext")
    save_for_hf(source, str(tmp_path), safe_serialization=True)
    hub_repo("timm/test_convnext.r160_in1k", tmp_path)

    model = AdaptiveDepth.from_pretrained(f"{prefix}timm/test_convnext.r160_in1k")

    assert _same_weights(model.model, source.state_dict())
    assert model.config.base_model.source == "timm"


def test_transformers_hub_repo(hub_repo, tmp_path: Path) -> None:
    source = tf.ViTForImageClassification(tf.ViTConfig(**HF_VIT_CONFIG)).eval()
    source.save_pretrained(tmp_path)
    hub_repo("google/vit-test-tiny", tmp_path)

    model = AdaptiveDepth.from_pretrained("google/vit-test-tiny").eval()

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x).logits)
    assert model.config.base_model.name == "google/vit-test-tiny"


def test_local_folders_of_timm_and_transformers(tmp_path: Path) -> None:
    timm_dir, hf_dir = tmp_path / "timm", tmp_path / "hf"
    timm_source = timm.create_model("test_convnext")
    save_for_hf(timm_source, str(timm_dir), safe_serialization=True)
    hf_source = tf.ViTForImageClassification(tf.ViTConfig(**HF_VIT_CONFIG))
    hf_source.save_pretrained(hf_dir)

    assert _same_weights(AdaptiveDepth.from_pretrained(str(timm_dir)).model, timm_source.state_dict())
    assert _same_weights(AdaptiveDepth.from_pretrained(hf_dir).model, hf_source.state_dict())


def test_uncached_pretrained_weights_are_an_error_not_random_init() -> None:
    with pytest.raises(WeightsUnavailableError, match="pretrained=False"):
        AdaptiveDepth.from_pretrained("resnet18")
    with pytest.raises(WeightsUnavailableError, match="local cache"):
        AdaptiveDepth.from_pretrained("microsoft/resnet-50")
    # The explicit opt-out works.
    assert (
        AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=10).config.base_model.pretrained
        is False
    )


def test_unknown_model_names() -> None:
    with pytest.raises(UnknownModelError, match="resnet50"):
        AdaptiveDepth.from_pretrained("resnet5O")
    with pytest.raises(UnknownModelError, match="does not exist"):
        AdaptiveDepth.from_pretrained("./no/such/folder")


def test_push_to_hub_uploads_exactly_the_saved_files_and_loads_back(hub_repo, fake_hub_upload) -> None:
    calls, uploaded = fake_hub_upload
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=4, input_size=(3, 64, 64)).eval()
    model.push_to_hub("me/resnet18-adaptive")

    assert calls == {"create_repo": "me/resnet18-adaptive", "upload_folder": "me/resnet18-adaptive"}
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "library_name: adaptive-depth" in card and "| 0.5 |" in card

    hub_repo("me/resnet18-adaptive", uploaded)
    loaded = AdaptiveDepth.from_pretrained("me/resnet18-adaptive")
    x = torch.randn(2, 3, 64, 64)
    for s in (1.0, 0.5, 0.25):
        with torch.no_grad():
            assert torch.equal(loaded.set_scaling_factor(s)(x), model.set_scaling_factor(s)(x))


def test_pretrained_or_random_says_loudly_when_it_falls_back(caplog) -> None:
    from adaptive_depth import ConfigError
    from adaptive_depth.model import pretrained_or_random

    kwargs = {"num_classes": 3, "input_size": [3, 32, 32]}
    with pytest.raises(WeightsUnavailableError):  # nothing cached, offline: an error when weights are required
        pretrained_or_random("regnetx_002", weights="pretrained", **kwargs)
    with caplog.at_level("WARNING"):
        model = pretrained_or_random("regnetx_002", weights="auto", seed=4, **kwargs)
    assert "NO PRETRAINED WEIGHTS" in caplog.text and "RANDOM INITIALISATION" in caplog.text
    assert model.config.base_model.pretrained is False
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = pretrained_or_random("regnetx_002", weights="random", seed=4, **kwargs)
    assert "NO PRETRAINED" not in caplog.text  # random on purpose: nothing to warn about
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # the seed makes the initialisation reproducible, fallback or not
    with pytest.raises(ConfigError, match="weights must be one of"):
        pretrained_or_random("regnetx_002", weights="maybe")
