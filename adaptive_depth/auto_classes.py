"""transformers' Auto classes and ``pipeline()`` given a saved adaptive-depth model: an error that says what works.

A saved adaptive-depth model is not a transformers checkpoint (its ``config.json`` describes depth gates over a timm
or transformers base), so transformers cannot build it. Its config says ``"model_type": "adaptive-depth"``: without
this library, transformers' error names that model type (instead of "Unrecognized model"); with this library
imported, the model type is registered with ``AutoConfig`` and the error says what to do instead: load the model
with ``AdaptiveDepth.from_pretrained``, or export one depth (``save_export``), which transformers' Auto classes and
``pipeline()`` load. No remote code is involved.
"""

from __future__ import annotations

from typing import Any, NoReturn

import transformers

from .config import LIBRARY_NAME
from .errors import ConfigError

__all__ = ["SavedAdaptiveDepthConfig", "register_with_transformers"]


def _refuse(where: object) -> NoReturn:
    where = str(where) if where else "this folder"
    raise ConfigError(
        f"{where} is a saved adaptive-depth model (every depth, switchable), not a transformers checkpoint: load it "
        f"with adaptive_depth.AdaptiveDepth.from_pretrained({where!r}). For transformers' pipeline() and Auto classes, "
        "export one depth first: model.save_export('<folder>', 0.5) writes a transformers (or timm) repository that "
        "they load; save_export('<folder>', 0.5, format='onnx') an ONNX file for onnxruntime"
    )


class SavedAdaptiveDepthConfig(transformers.PretrainedConfig):
    """What ``AutoConfig`` builds for ``model_type == "adaptive-depth"``: nothing, a :class:`ConfigError` instead."""

    model_type = LIBRARY_NAME

    def __init__(self, **kwargs: Any) -> None:
        _refuse(kwargs.get("name_or_path") or kwargs.get("_name_or_path"))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> NoReturn:  # type: ignore[override]
        """Refuse, naming the folder or repository (``AutoConfig.from_pretrained`` passes it as ``name_or_path``)."""
        _refuse(kwargs.get("name_or_path") or config_dict.get("_name_or_path"))


def register_with_transformers() -> None:
    """Register the adaptive-depth model type with transformers' ``AutoConfig`` (see the module's docstring)."""
    transformers.AutoConfig.register(LIBRARY_NAME, SavedAdaptiveDepthConfig, exist_ok=True)
