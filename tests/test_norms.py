"""Per-depth BatchNorm statistics: recalibration, swapping by reference, saving, loading, export."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from adaptive_depth import AdaptiveDepth, CheckpointError
from adaptive_depth.saved import NORMS_NAME


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) * 2 + 1 for _ in range(3)]


def _model() -> AdaptiveDepth:
    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=5, zero_init_last=False)
    return AdaptiveDepth.wrap(base, input_size=[3, 32, 32]).eval()


def test_recalibration_estimates_exact_statistics_per_depth(batches: list[torch.Tensor]) -> None:
    model = _model()
    x = batches[0][:2]
    before = {s: model.set_scaling_factor(s)(x) for s in model.config.scaling_factors}
    seen = model.recalibrate_norms(batches)
    assert seen == {s: 24 for s in (0.25, 0.5, 0.75, 1.0)}
    assert model.config.norm_stats == [0.25, 0.5, 0.75, 1.0]
    # The stem's BatchNorm sees the same input at every depth: its statistics are the exact mean over the data.
    stem = model.model.conv1
    expected = torch.cat([stem(b) for b in batches]).mean(dim=(0, 2, 3))
    for s in model.config.scaling_factors:
        model.set_scaling_factor(s)
        torch.testing.assert_close(model.model.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    # Deeper layers see different inputs at different depths, so their statistics (and the outputs) differ.
    last_bn = model.model.layer4[0].bn1
    means = {s: model.set_scaling_factor(s) and last_bn.running_mean.clone() for s in (0.25, 1.0)}
    assert not torch.allclose(means[0.25], means[1.0])
    after = {s: model.set_scaling_factor(s)(x) for s in model.config.scaling_factors}
    assert not torch.allclose(before[0.25], after[0.25])


def test_statistics_weigh_every_image_the_same_whatever_its_batch() -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    uneven = [torch.randn(8, 3, 32, 32, generator=g) * 2 + 1, torch.randn(5, 3, 32, 32, generator=g) - 1]
    assert model.recalibrate_norms(uneven) == {s: 13 for s in (0.25, 0.5, 0.75, 1.0)}
    # The stem's BatchNorm sees the same input at every depth: the statistics of all 13 images pooled, not the
    # average of two batch statistics (which would give the 5 images as much weight as the 8).
    features = model.model.conv1(torch.cat(uneven)).transpose(0, 1).reshape(64, -1).double()
    for s in model.config.scaling_factors:
        model.set_scaling_factor(s)
        torch.testing.assert_close(model.model.bn1.running_mean.double(), features.mean(dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.model.bn1.running_var.double(), features.var(dim=1), rtol=1e-5, atol=1e-6)


def test_a_last_batch_of_one_image_is_recalibrated_with_the_batch_before_it() -> None:
    # regnetx_002 at 32 px ends in a 1x1 feature map: a BatchNorm in training mode refuses one value per channel.
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=3), input_size=[3, 32, 32]).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)] + [torch.randn(1, 3, 32, 32, generator=g)]
    assert model.recalibrate_norms(batches, [0.5, 1.0]) == {0.5: 33, 1.0: 33}
    assert torch.isfinite(model.set_scaling_factor(0.5)(batches[0])).all()


def test_switching_depth_swaps_references_and_custom_depths_use_training_stats(batches: list[torch.Tensor]) -> None:
    model = _model()
    trained = model.model.layer4[0].bn1.running_mean.clone()
    model.recalibrate_norms(batches)
    bn = model.model.layer4[0].bn1
    pointers = {s: model.set_scaling_factor(s) and bn.running_mean.data_ptr() for s in (0.25, 0.5, 1.0)}
    # resnet18 runs one block per stage at 0.25 and at 0.5: the same sub-network, the same statistics
    assert model.depth_for(0.25) == model.depth_for(0.5) == [1, 1, 1, 1]
    assert pointers[0.25] == pointers[0.5] != pointers[1.0]  # one tensor per depth, nothing copied between them
    assert model.set_scaling_factor(0.5) and bn.running_mean.data_ptr() == pointers[0.5]
    model.set_depth([1, 1, 1, 1])  # the blocks of a recalibrated depth: its statistics
    assert bn.running_mean.data_ptr() == pointers[0.5]
    model.set_depth([2, 1, 2, 1])  # not a trained depth: the statistics the model was trained with
    torch.testing.assert_close(bn.running_mean, trained)
    with model.scaled(0.25):
        assert bn.running_mean.data_ptr() == pointers[0.25]
    torch.testing.assert_close(bn.running_mean, trained)


def test_dtype_move_keeps_per_depth_statistics(batches: list[torch.Tensor]) -> None:
    model = _model()
    model.recalibrate_norms(batches)
    model.set_scaling_factor(0.5)
    reference = model(batches[0]).double()
    model.double()
    assert model.model.layer4[0].bn1.running_mean.dtype == torch.float64
    model.set_scaling_factor(0.25).set_scaling_factor(0.5)
    torch.testing.assert_close(model(batches[0].double()), reference, rtol=1e-4, atol=1e-4)


def test_save_load_and_export_use_each_depths_statistics(tmp_path, batches: list[torch.Tensor]) -> None:
    model = _model()
    model.recalibrate_norms(batches)
    model.set_scaling_factor(0.5).save_pretrained(tmp_path)
    assert (tmp_path / NORMS_NAME).is_file()
    assert json.loads((tmp_path / "config.json").read_text())["norm_stats"] == [0.25, 0.5, 0.75, 1.0]
    again = AdaptiveDepth.from_pretrained(tmp_path)
    assert again.scaling_factor == 0.5
    x = batches[1][:2]
    for s in model.config.scaling_factors:
        assert torch.equal(again.set_scaling_factor(s)(x), model.set_scaling_factor(s)(x))
        plain = model.export(s).eval()
        torch.testing.assert_close(plain(x), model(x))
    # model.safetensors keeps the statistics of training, for tools that load it without this library
    plain_sd = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(plain_sd["layer4.0.bn1.running_mean"], _model().model.layer4[0].bn1.running_mean)


def test_corrupt_or_missing_statistics_are_checkpoint_errors(tmp_path, batches: list[torch.Tensor]) -> None:
    model = _model()
    model.recalibrate_norms(batches, [0.5, 1.0])
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / NORMS_NAME)
    save_file({k: v for k, v in tensors.items() if not k.startswith("0.5/layer4")}, tmp_path / NORMS_NAME)
    with pytest.raises(CheckpointError, match="missing"):
        AdaptiveDepth.from_pretrained(tmp_path)
    (tmp_path / NORMS_NAME).unlink()
    with pytest.raises(CheckpointError, match=NORMS_NAME):
        AdaptiveDepth.from_pretrained(tmp_path)


def test_model_without_batchnorm_is_left_unchanged(tmp_path) -> None:
    model = AdaptiveDepth.wrap(timm.create_model("test_vit", num_classes=3)).eval()
    x = model.example_input(2)
    reference = model(x)
    assert model.recalibrate_norms([x]) == {}
    assert model.config.norm_stats == [] and model.depth_norms is None
    assert torch.equal(model(x), reference)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / NORMS_NAME).exists()


def test_reset_norms_returns_every_depth_to_the_training_statistics(batches: list[torch.Tensor]) -> None:
    model = _model()
    trained = model.model.layer4[0].bn1.running_mean.clone()
    model.recalibrate_norms(batches)
    model.set_scaling_factor(0.25).reset_norms()
    assert model.depth_norms is None and model.config.norm_stats == []
    torch.testing.assert_close(model.model.layer4[0].bn1.running_mean, trained)
    assert torch.equal(model.set_scaling_factor(1.0).model.layer4[0].bn1.running_mean, trained)
