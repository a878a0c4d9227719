"""The architecture matrix: small real timm and transformers models, with random weights.

Each case builds the adaptive model the way a user would, and the plain model to compare it with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import transformers as tf
from torch import nn

from adaptive_depth import AdaptiveDepth, AdaptiveDepthConfig


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
    # Blocks without an identity path as a whole: their residual branches are gated (attn, mlp; channel_mixer).
    _timm(
        "tiny_vit_5m_224",
        64,
        embed_dims=[8, 16, 16, 24],
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 2],
        window_sizes=[4, 4, 3, 2],  # stage 2 pads its 4x4 tokens to 3x3 windows, stage 3 is one window
    ),
    _timm("repvit_m0_9", 64, embed_dim=(8, 16, 24, 32), depth=(2, 2, 3, 2)),
    # Blocks that take and return two tensors (pixel and patch embeddings): a skipped one hands both on.
    _timm(
        "tnt_s_patch16_224", 32, img_size=32, embed_dim=32, inner_dim=8, depth=4, num_heads_inner=1, num_heads_outer=2
    ),
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


def discovery_digest(config: AdaptiveDepthConfig) -> str:
    """A short digest of what discovery found: method, stages, and every block's fields."""
    described = [config.discovery] + [
        [s.name, [[b.name, b.gateable, b.input_kwarg, b.output, b.output_len, b.kind] for b in s.blocks]]
        for s in config.stages
    ]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


# What discovery finds in each case, pinned: a change in discovery that moves any of these is deliberate or a bug.
# The block-level cases find no residual branch: their digests are those of whole-block discovery alone.
DISCOVERY_DIGESTS = {
    "timm/resnet18": "8c7878e81563195d",
    "timm/resnet50d": "2ec8f8552b8424b1",
    "timm/resnet32ts": "248724ca93b10404",
    "timm/seresnext26d_32x4d": "13254f000d22a35c",
    "timm/resnetv2_50": "e5f8c12b9ac1e080",
    "timm/cspresnet50": "b2c1ba84cf8a02fc",
    "timm/dla34": "34fdb251a28a66cf",
    "timm/regnetx_002": "71ca0269c3da2e56",
    "timm/convnext_atto": "af61645a85290751",
    "timm/convnextv2_atto": "af61645a85290751",
    "timm/mobilenetv2_035": "ebb670e713e5ee21",
    "timm/mobilenetv3_small_050": "0ad8452eaf093c22",
    "timm/efficientnet_b0": "d0589bd818efc75d",  # squeeze-excitation no longer taken for a block (was random)
    "timm/test_vit": "9327d0ae0c29f554",
    "timm/vit_tiny_patch16_224": "1bc3068872f2b82f",
    "timm/deit_tiny_patch16_224": "1bc3068872f2b82f",
    "timm/eva02_tiny_patch14_224": "1bc3068872f2b82f",
    "timm/beit_base_patch16_224": "1bc3068872f2b82f",
    "timm/vit_small_patch14_dinov2": "1bc3068872f2b82f",
    "timm/cait_xxs24_224": "7391e108744fa9aa",
    "timm/swin_tiny_patch4_window7_224": "456b9c0f751c444f",
    "timm/swinv2_tiny_window8_256": "456b9c0f751c444f",
    "timm/poolformer_s12": "07d1e5729029820a",
    "timm/mixer_s16_224": "e9fba7b1c0e11e00",
    "timm/pvt_v2_b0": "eef5f388d53ba6a9",
    "timm/tiny_vit_5m_224": "49b4f2ff3e15e815",
    "timm/repvit_m0_9": "a61bfbecfc34e127",
    "timm/tnt_s_patch16_224": "a3c68933cf618d29",
    "hf/resnet": "b731c3d144114f1e",
    "hf/resnet-backbone": "cd36348f0be01dea",
    "hf/convnext": "1e422d7dc7d5e8ff",
    "hf/convnextv2": "03820f27b4c8f689",
    "hf/regnet": "8fbfff48b4b227a6",
    "hf/poolformer": "97ce888e69ce2f4c",
    "hf/mobilenet_v2": "4847d77c82377906",
    "hf/vit": "803f9771b8ff36d1",
    "hf/deit": "f94a4cd0d4d59d35",
    "hf/beit": "391d1cd292336ba4",
    "hf/dinov2": "375b41144afe6948",
    "hf/swin": "a587208733865a9a",
    "hf/swinv2": "9303b25b704920c6",
    "hf/pvt_v2": "fc7201070c823b42",
}
