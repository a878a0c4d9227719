"""The architecture matrix: small real timm and transformers models, with random weights.

Each case builds the adaptive model the way a user would, and the plain model to compare it with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import transformers as tf
from torch import nn

from adaptive_depth import AdaptiveDepth


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it plain, and as a user would get it adaptive."""

    id: str
    build: Callable[[], nn.Module]
    make: Callable[[], AdaptiveDepth]
    input_size: tuple[int, int, int]

    def pair(self) -> tuple[nn.Module, AdaptiveDepth]:
        """An adaptive model (eval) and the plain model holding the same weights (eval).

        The weights travel through ``state_dict()``: gates must be invisible there.
        """
        torch.manual_seed(0)
        adaptive = self.make().eval()
        base = self.build().eval()
        base.load_state_dict(adaptive.model.state_dict(), strict=True)
        return base, adaptive

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, *self.input_size, generator=torch.Generator().manual_seed(1))


def _timm(name: str, size: int, **kwargs: Any) -> Case:
    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=7, **kwargs)

    def make() -> AdaptiveDepth:
        return AdaptiveDepth.from_pretrained(
            name, pretrained=False, num_classes=7, input_size=(3, size, size), **kwargs
        )

    return Case(f"timm/{name}", build, make, (3, size, size))


def _hf(name: str, config: tf.PretrainedConfig, cls: type[tf.PreTrainedModel], size: int) -> Case:
    def build() -> nn.Module:
        return cls(config)

    def make() -> AdaptiveDepth:
        return AdaptiveDepth.wrap(cls(config), input_size=(3, size, size))

    return Case(f"hf/{name}", build, make, (3, size, size))


_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
HF_VIT_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 7,
}
_HF_CNN = {"hidden_sizes": [8, 16, 24, 32], "depths": [2, 2, 3, 2], "num_labels": 7}

TIMM_CASES = [
    _timm("resnet18", 64),
    _timm("resnet50d", 64),
    _timm("resnet32ts", 64),  # ByobNet: blocks end in SiLU(x + f(x))
    _timm("seresnext26d_32x4d", 64),
    _timm("resnetv2_50", 64),
    _timm("cspresnet50", 64),
    _timm("dla34", 64),
    _timm("regnetx_002", 64),
    _timm("convnext_atto", 64),
    _timm("convnextv2_atto", 64),
    _timm("mobilenetv2_035", 64),
    _timm("mobilenetv3_small_050", 64),
    _timm("efficientnet_b0", 64),
    _timm("test_vit", 160),
    _timm("vit_tiny_patch16_224", 32, **_VIT),
    _timm("deit_tiny_patch16_224", 32, **_VIT),
    _timm("eva02_tiny_patch14_224", 28, img_size=28, patch_size=7, depth=4),
    _timm("beit_base_patch16_224", 32, **_VIT),
    _timm("vit_small_patch14_dinov2", 28, img_size=28, patch_size=7, embed_dim=32, depth=4, num_heads=2),
    _timm("cait_xxs24_224", 32, img_size=32, patch_size=8, depth=4),
    _timm("swin_tiny_patch4_window7_224", 56, img_size=56, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)),
    _timm("swinv2_tiny_window8_256", 64, img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)),
    _timm("poolformer_s12", 64),
    _timm("mixer_s16_224", 64, img_size=64),
    _timm("pvt_v2_b0", 64),
]

HF_CASES = [
    _hf("resnet", tf.ResNetConfig(embedding_size=8, **_HF_CNN), tf.ResNetForImageClassification, 64),
    _hf(
        "resnet-backbone",
        tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 3, 2]),
        tf.ResNetModel,
        64,
    ),
    _hf("convnext", tf.ConvNextConfig(**_HF_CNN), tf.ConvNextForImageClassification, 64),
    _hf("convnextv2", tf.ConvNextV2Config(**_HF_CNN), tf.ConvNextV2ForImageClassification, 64),
    _hf("regnet", tf.RegNetConfig(embedding_size=8, groups_width=8, **_HF_CNN), tf.RegNetForImageClassification, 64),
    _hf("poolformer", tf.PoolFormerConfig(**_HF_CNN), tf.PoolFormerForImageClassification, 64),
    _hf(
        "mobilenet_v2",
        tf.MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=7),
        tf.MobileNetV2ForImageClassification,
        64,
    ),
    _hf("vit", tf.ViTConfig(**HF_VIT_CONFIG), tf.ViTForImageClassification, 32),
    _hf("deit", tf.DeiTConfig(**HF_VIT_CONFIG), tf.DeiTForImageClassification, 32),
    _hf("beit", tf.BeitConfig(use_relative_position_bias=True, **HF_VIT_CONFIG), tf.BeitForImageClassification, 32),
    _hf(
        "dinov2",
        tf.Dinov2Config(**{k: v for k, v in HF_VIT_CONFIG.items() if k != "intermediate_size"}),
        tf.Dinov2ForImageClassification,
        32,
    ),
    _hf(
        "swin",
        tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=7
        ),
        tf.SwinForImageClassification,
        32,
    ),
    _hf(
        "swinv2",
        tf.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=7
        ),
        tf.Swinv2ForImageClassification,
        32,
    ),
    _hf(
        "pvt_v2",
        tf.PvtV2Config(
            hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 2, 2], num_attention_heads=[1, 1, 2, 2], num_labels=7
        ),
        tf.PvtV2ForImageClassification,
        64,
    ),
]

CASES = TIMM_CASES + HF_CASES
