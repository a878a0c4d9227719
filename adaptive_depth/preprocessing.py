"""A model's own preprocessing: timm's data config, or a transformers image processor, as one data config and one
torchvision transform.

The data config travels with a saved model (timm: the ``pretrained_cfg`` of its base, with the fine-tuned input
size; transformers: ``preprocessor_config.json``), so the model that is loaded again preprocesses exactly as the one
that was trained.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ConfigError, DataError

__all__ = [
    "PREPROCESSING_KEYS",
    "PreprocessingMixin",
    "build_transform",
    "convert_image",
    "create_transform",
    "data_config",
    "default_input_size",
    "match_channels",
    "record_input_size",
    "timm_preprocessing",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL resample codes in processor configs
# The parts of a timm pretrained_cfg that describe how to feed the weights (not where they came from).
PREPROCESSING_KEYS = (
    "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "fixed_input_size", "test_input_size",
    "test_crop_pct", "label_names",
)  # fmt: skip


def timm_preprocessing(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe preprocessing part of a timm ``pretrained_cfg`` (tuples as lists), as a saved model keeps it."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in pretrained_cfg.items()
        if k in PREPROCESSING_KEYS and v is not None
    }


def data_config(model: nn.Module, processor: Any = None, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode`` of a model.

    Args:
        model: a timm model (its ``pretrained_cfg``) or a transformers model.
        processor: the transformers image processor that came with the model (its statistics and size).
        input_size: ``[C, H, W]`` to use instead of the model's (a model fine-tuned at another resolution).
    """
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(model))
    else:
        config = getattr(model, "config", None)
        size = _processor_size(processor) or getattr(config, "image_size", None)
        if isinstance(size, Sequence):
            size = int(size[-1])
        if size is None and input_size is None:
            raise ConfigError(f"cannot tell the input size of {type(model).__name__}; pass input_size=[C, H, W]")
        channels = int(getattr(config, "num_channels", 3))
        cfg = {
            "input_size": (channels, int(size or 0), int(size or 0)),
            "mean": tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN),
            "std": tuple(getattr(processor, "image_std", None) or IMAGENET_STD),
            "interpolation": _RESAMPLE.get(getattr(processor, "resample", 2), "bilinear"),
            "crop_pct": float(getattr(processor, "crop_pct", None) or 0.875),
            "crop_mode": "center",
        }
    if input_size is not None:
        cfg["input_size"] = tuple(int(v) for v in input_size)
    return cfg


def default_input_size(model: nn.Module) -> list[int]:
    """``[C, H, W]`` the model expects, from what it says about itself (timm data config, transformers config)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        import timm.data

        size = list(timm.data.resolve_model_data_config(model)["input_size"])
        # the data config keeps the pretrained weights' channels; a model built with in_chans=1 takes one. timm's
        # record of the model's arguments knows (a space-to-depth stem, as TResNet's, makes its first conv's
        # channels 16 times the image's); the first conv's input channels where it does not
        try:
            from timm.models._hub import get_model_args

            in_chans = get_model_args(model).get("in_chans")
        except (ImportError, AttributeError, TypeError, ValueError):  # an older timm, or a model it cannot describe
            in_chans = None
        if isinstance(in_chans, int):
            size[0] = in_chans
            return size
        first = cfg.get("first_conv")
        first = first[0] if isinstance(first, list | tuple) and first else first
        try:
            conv = model.get_submodule(first) if isinstance(first, str) else None
        except AttributeError:
            conv = None
        if isinstance(getattr(conv, "in_channels", None), int):
            size[0] = conv.in_channels
        return size
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
        return [int(getattr(config, "num_channels", 3)), int(h), int(w)]
    return [3, 224, 224]


def record_input_size(model: nn.Module, config: Any) -> None:
    """Make ``config.input_size`` (an ``AdaptiveDepthConfig``'s) a timm base's data config too (``timm.data`` reads it
    from ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and config.base_model.source == "timm":
        model.pretrained_cfg = {**cfg, "input_size": tuple(config.input_size)}
        config.base_model.pretrained_cfg = timm_preprocessing(model.pretrained_cfg)


def _processor_size(processor: Any) -> int | None:
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size) if isinstance(size, int | float) else None


def match_channels(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a data config with one ``mean`` / ``std`` value per input channel.

    A one-channel model (``in_chans=1``) keeps the RGB statistics of its pretrained config; its single channel
    gets their mean, as a grey image converted from RGB would.
    """
    cfg = dict(config)
    if int(cfg["input_size"][0]) == 1 and len(cfg["mean"]) == 3:
        cfg["mean"], cfg["std"] = (sum(cfg["mean"]) / 3,), (sum(cfg["std"]) / 3,)
    return cfg


def create_transform(
    config: dict[str, Any],
    *,
    training: bool = False,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """A PIL image -> tensor transform for ``config`` (:func:`data_config`), built by ``timm.data.create_transform``.

    Evaluation: resize and centre crop (``crop_pct``). Training: random resized crop (``scale``) and horizontal flips
    with probability ``hflip`` (none by default: digits and many labels depend on orientation). Images are first
    converted to the model's channel count; a one-channel model gets the mean of the three channels' statistics.
    """
    import timm.data
    from torchvision import transforms as T

    cfg = match_channels(config)
    channels = int(cfg["input_size"][0])
    extra = {"scale": scale, "hflip": hflip, "color_jitter": None} if training else {}
    tf = timm.data.create_transform(**cfg, is_training=training, **extra)
    mode = "L" if channels == 1 else "RGB"
    # a module-level function, not a lambda: DataLoader workers started by spawn (macOS, Windows) unpickle it
    return T.Compose([T.Lambda(functools.partial(convert_image, mode=mode)), tf])


def build_transform(
    model: nn.Module, *, train: bool, input_size: Sequence[int] | None = None, processor: Any = None
) -> Callable[[Image.Image], torch.Tensor]:
    """A model's own preprocessing (timm data config or transformers image processor) as a transform.

    The one way from a model to its transform: :func:`data_config`, then :func:`create_transform`
    (``AdaptiveDepth.create_transform`` and the training loaders both come here).

    Args:
        model: the base model (timm or transformers).
        train: with training augmentation.
        input_size: ``[C, H, W]`` instead of the model's own.
        processor: the transformers image processor that came with the model (``AdaptiveDepth.image_processor``).

    Raises:
        DataError: the model does not say its input size, and ``input_size`` is not given.
    """
    try:
        config = data_config(model, processor, input_size)
    except ConfigError as e:
        raise DataError(str(e)) from e
    return create_transform(config, training=train)


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL's 16- and 32-bit one-channel images


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` in ``mode`` (``"RGB"``, or ``"L"`` for a one-channel model), high bit depths scaled, not clipped.

    PIL's own ``convert`` clips a 16- or 32-bit image to 0..255, so a 16-bit PNG (mode ``"I;16"``, as PIL and
    ``datasets`` decode it) comes out in a handful of values. Here integer images (``"I;16*"``, ``"I"``) are read
    on the 16-bit scale, 0..65535 to 0..255 (larger values saturate); float images (``"F"``) on 0..1 when every
    value lies in it, else on 0..255. A module-level function, so that transforms pickle (DataLoader workers).
    """
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        finite = values[np.isfinite(values)]
        unit = image.mode == "F" and finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
        scale = 255.0 if unit else 1.0 if image.mode == "F" else 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


class PreprocessingMixin:
    """Preprocessing and class names of a wrapped model (``AdaptiveDepth`` has them).

    Needs ``self.model`` (the base model), ``self.config`` (an ``AdaptiveDepthConfig``) and ``self.image_processor``.
    """

    model: nn.Module
    config: Any
    image_processor: Any

    @property
    def pretrained_cfg(self) -> dict[str, Any] | None:
        """This model's preprocessing as timm reads it, so ``timm.data.resolve_model_data_config(model)`` gives it.

        A timm base: its ``pretrained_cfg`` (with the fine-tuned input size); a transformers base: its
        :attr:`data_config` (from its image processor), never timm's ImageNet defaults; a custom module: ``None``.
        """
        cfg = self._timm_cfg
        if cfg is None and self.config.base_model.source == "transformers":
            return self.data_config
        return cfg

    @property
    def _timm_cfg(self) -> dict[str, Any] | None:
        """The timm base model's own ``pretrained_cfg`` (``None`` for other bases)."""
        cfg = getattr(self.model, "pretrained_cfg", None)
        return cfg if isinstance(cfg, dict) else None

    @property
    def data_config(self) -> dict[str, Any]:
        """How to preprocess images for this model: input size, mean, std, interpolation, crop."""
        return data_config(self.model, self.image_processor, self.config.input_size)

    def create_transform(self, training: bool = False) -> Callable[[Any], torch.Tensor]:
        """A PIL image -> tensor transform with this model's preprocessing (evaluation, or training augmentation)."""
        return build_transform(
            self.model, train=training, input_size=self.config.input_size, processor=self.image_processor
        )

    def set_labels(self, names: Sequence[str]) -> Any:
        """Name the classes (index ``i`` is ``names[i]``); saved in ``config.json``, the card and every export."""
        names = [str(n) for n in names]
        hf_config = getattr(self.model, "config", None)
        classes = getattr(self.model, "num_classes", None) or getattr(hf_config, "num_labels", None)
        if classes is not None and len(names) != classes:
            raise ConfigError(f"got {len(names)} class names for a model with {classes} classes")
        self.config.id2label = {str(i): n for i, n in enumerate(names)}
        if hf_config is not None and hasattr(hf_config, "id2label"):
            hf_config.id2label = dict(enumerate(names))
            hf_config.label2id = {n: i for i, n in enumerate(names)}
        if self._timm_cfg is not None:
            self.model.pretrained_cfg = {**self._timm_cfg, "label_names": names}
            self.config.base_model.pretrained_cfg = timm_preprocessing(self.model.pretrained_cfg)
        return self

    @property
    def id2label(self) -> dict[int, str]:
        """Class index -> name: those of :meth:`set_labels`, else the base model's own (transformers ``id2label``,
        timm ``label_names``); empty if the classes were never named."""
        if self.config.id2label:
            return {int(i): n for i, n in self.config.id2label.items()}
        hf_names = getattr(getattr(self.model, "config", None), "id2label", None) or {}
        if hf_names and any(n != f"LABEL_{i}" for i, n in hf_names.items()):  # LABEL_i: transformers' placeholders
            return {int(i): str(n) for i, n in hf_names.items()}
        timm_names = (self._timm_cfg or {}).get("label_names") or []
        if len(timm_names) == getattr(self.model, "num_classes", None):  # not a replaced head's
            return dict(enumerate(timm_names))
        return {}

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> index."""
        return {n: i for i, n in self.id2label.items()}
