"""Exported depths are plain modules: they run, save and load without this library, and torch.export them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import transformers as tf

from adaptive_depth import AdaptiveDepth, BlockSpec, ConfigError, StageSpec
from adaptive_depth.export import export_depth
from adaptive_depth.gates import SkippedBlock


def test_exported_transformers_model_round_trips_through_transformers(tmp_path: Path) -> None:
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 3, 2], num_labels=3)
    model = AdaptiveDepth.wrap(tf.ResNetForImageClassification(config), input_size=(3, 64, 64)).eval()
    plain = model.export(0.5)
    assert plain.config.depths == [1, 1, 2, 1]
    plain.save_pretrained(tmp_path)
    reloaded = tf.ResNetForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model.set_scaling_factor(0.5)(x).logits, atol=1e-6)


def test_exported_vit_updates_num_hidden_layers() -> None:
    config = tf.ViTConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    plain = AdaptiveDepth.wrap(tf.ViTForImageClassification(config)).export(0.5)
    assert plain.config.num_hidden_layers == 3 and len(plain.vit.layers) == 3


def test_exported_depth_works_with_torch_export() -> None:
    model = AdaptiveDepth.from_pretrained("resnet18", pretrained=False, num_classes=5, input_size=(3, 32, 32)).eval()
    plain = model.export(0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(plain, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model.set_scaling_factor(0.5)(x), atol=1e-5)


class _Residual(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_blocks_of_a_sequential_with_named_children_are_removed_by_name() -> None:
    """EfficientViT and GCViT hold their blocks in ``nn.Sequential(OrderedDict(...))``: names, not indices."""
    blocks = torch.nn.Sequential(OrderedDict((f"res{i}", _Residual(8)) for i in range(4)))
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), blocks, *head)
    model = AdaptiveDepth.wrap(net).eval()
    plain, kept_places = model.export_checked(0.5)
    assert list(plain[1]._modules) == ["res0", "res1"] and not kept_places  # deleted, as a shallower network
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(x), model.set_scaling_factor(0.5)(x), atol=1e-6)


def test_a_vit_config_that_names_backbone_stages_reloads_at_a_shallower_depth(tmp_path: Path) -> None:
    # BEiT's config names one backbone stage per layer; a config still naming stage4 of 2 layers would not load
    config = tf.BeitConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    model = AdaptiveDepth.wrap(tf.BeitForImageClassification(config)).eval()
    folder = model.save_export(tmp_path / "half", 0.5)
    reloaded = tf.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert reloaded.config.stage_names == ["stem", "stage1", "stage2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model.set_scaling_factor(0.5)(x).logits)


class _Outer(torch.nn.Module):
    """A residual block holding another in a plain attribute, as CSATv2's blocks hold an attention block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = _Residual(channels)
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.inner(x))


def test_a_block_inside_a_later_block_of_a_thinned_sequential_is_removed_from_the_right_block() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Sequential(*[_Outer(8) for _ in range(3)]))
    stages = [
        StageSpec("0", [BlockSpec("0.0", gateable=False), BlockSpec("0.1"), BlockSpec("0.2")]),
        StageSpec("0.2", [BlockSpec("0.2.inner")]),
    ]
    plain = export_depth(net, stages, [[True, False, True], [False]])  # block 1 goes, and block 2's inner block
    assert len(plain[0]) == 2 and isinstance(plain[0][1].inner, torch.nn.Identity)
    assert isinstance(plain[0][0].inner, _Residual)  # block 0 (first after the renumbering) keeps its own
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = net[0][0](x)
        torch.testing.assert_close(plain(x), y + net[0][2].conv(y))


class _CountsItsBlocks(torch.nn.Module):
    """A forward that acts at a fixed block index, as ConViT adds its class token before block 10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(_Residual(8) for _ in range(4))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i == 2:
                x = x + 1.0
            x = block(x)
        return self.head(x)


def test_an_export_keeps_the_places_of_removed_blocks_where_the_forward_counts_them() -> None:
    torch.manual_seed(0)
    model = AdaptiveDepth.wrap(_CountsItsBlocks(), input_size=(3, 8, 8)).eval()
    plain, kept = model.export_checked(0.5)  # blocks 2 and 3 go: deleting them would skip the "+ 1" too
    assert kept and len(plain.blocks) == 4 and isinstance(plain.blocks[3], SkippedBlock)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), model.scaled(0.5):
        torch.testing.assert_close(plain(x), model(x))


def test_a_repository_of_a_depth_whose_forward_counts_blocks_is_refused(tmp_path: Path) -> None:
    model = AdaptiveDepth.from_pretrained(
        "convit_tiny", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=4, local_up_to_layer=2
    ).eval()
    with pytest.raises(ConfigError, match="counts its blocks.*format='onnx'"):
        model.save_export(tmp_path / "repo", 0.5, format="repo")
    assert list((tmp_path / "repo").iterdir()) == []  # nothing written (the staging folder removed)
    folder = model.save_export(tmp_path / "onnx", 0.5, format="onnx")  # checked in onnxruntime against the model
    assert (folder / "model.onnx").exists()
