"""The loading options of ``AdaptiveDepth.from_pretrained`` that are not about the architecture: dtype and device.

transformers' ``from_pretrained`` takes ``dtype`` (``torch_dtype``, its older name), ``device_map`` and
``quantization_config`` beside the config's attributes, and raises on names it does not know. ``from_pretrained``
here does the same for every kind of model: a transformers base loaded with its pretrained weights gets them from
transformers' own loader; a timm base, a randomly initialised transformers base and a saved adaptive-depth model are
built in float32 on the CPU (so discovery probes them as they were trained) and then moved with ``.to()``. A model
is placed whole on one device; quantization is left to transformers, the only loader here that knows how.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["LoadOptions"]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype(value: Any) -> torch.dtype | str | None:
    """A torch dtype, ``"auto"`` or ``None`` from what a user passes (a dtype, its name, ``"torch.float16"``)."""
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if value is None or value == "auto":
        return value
    name = str(value).removeprefix("torch.")
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    raise ConfigError(f"dtype must be a floating torch dtype or one of {sorted(_DTYPE_NAMES)} or 'auto', got {value!r}")


def _device(device_map: Any) -> torch.device | None:
    """The one device ``device_map`` names: a device or its name, an index, ``"auto"``, or a map to a single device."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise ConfigError(
                f"device_map={device_map!r} spreads the model over {sorted(devices)}; an adaptive-depth model is "
                "placed whole on one device: pass device_map='cuda:0' (or any one device), or call .to(device) after "
                "loading"
            )
        device_map = devices.pop()
    try:
        return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device_map={device_map!r} names no device (e.g. 'cpu', 'cuda:0', 0, 'auto')") from e


@dataclass
class LoadOptions:
    """``dtype`` / ``torch_dtype``, ``device_map`` and ``quantization_config`` as ``from_pretrained`` got them."""

    dtype: torch.dtype | str | None = None
    device_map: Any = None
    quantization_config: Any = None

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> LoadOptions:
        """Take the loading options out of ``kwargs`` (what is left goes to the architecture)."""
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        if dtype is not None and torch_dtype is not None and _dtype(dtype) != _dtype(torch_dtype):
            raise ConfigError(f"got dtype={dtype!r} and torch_dtype={torch_dtype!r}; pass one (dtype is its new name)")
        return cls(
            dtype=_dtype(dtype if dtype is not None else torch_dtype),
            device_map=kwargs.pop("device_map", None),
            quantization_config=kwargs.pop("quantization_config", None),
        )

    def for_transformers(self) -> dict[str, Any]:
        """The options as transformers' ``from_pretrained`` takes them (it applies them while loading)."""
        out = {"dtype": self.dtype, "device_map": self.device_map, "quantization_config": self.quantization_config}
        return {k: v for k, v in out.items() if v is not None}

    def check_without_quantization(self, what: str) -> None:
        """Raise :class:`ConfigError` if ``quantization_config`` was given for a model that no loader quantizes."""
        if self.quantization_config is not None:
            raise ConfigError(
                f"quantization_config is applied by transformers while it loads pretrained weights; {what} is loaded "
                "in full precision. Load it without quantization_config and quantize afterwards (e.g. "
                "torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}) on CPU), or load a transformers "
                "base with its pretrained weights"
            )

    def apply(self, model: nn.Module, weights_dtype: torch.dtype | None = None) -> None:
        """Move ``model`` to the device and dtype asked for (``"auto"``: ``weights_dtype``, the checkpoint's own)."""
        dtype = weights_dtype if self.dtype == "auto" else self.dtype
        device = _device(self.device_map)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)


def saved_num_classes(config: dict[str, Any] | None) -> int | None:
    """The number of classes a saved adaptive model's ``config.json`` records for its head, if it records one."""
    base = (config or {}).get("base_model") or {}
    hf = base.get("hf_config") or {}
    count = (base.get("model_args") or {}).get("num_classes") or hf.get("num_labels")
    if count is None and isinstance(hf.get("id2label"), dict):
        count = len(hf["id2label"])
    return count if isinstance(count, int) else None


def check_saved_model_arguments(
    where: str,
    *,
    saved_policy: str,
    policy: str | None,
    num_classes: int | None,
    saved_classes: int | None,
    block_patterns: Any,
    model_kwargs: dict[str, Any],
) -> None:
    """Raise :class:`ConfigError` for an argument of ``from_pretrained`` that a saved model cannot honour.

    Its architecture, head, blocks and depth policy are what it was trained as; ``scaling_factors``, ``input_size``,
    ``dtype`` and ``device_map`` are honoured, and ``num_classes`` equal to the saved head's (``saved_classes``: a
    script that fine-tunes it further on the same task passes its dataset's count).
    """
    rewrap = "wrap its base model again: AdaptiveDepth.wrap(adaptive_depth.gates.unwrap_gates(model.model), ...)"
    if num_classes is not None and num_classes != saved_classes:
        raise ConfigError(
            f"{where} is a saved adaptive-depth model whose classifier ({saved_classes or 'its own'} classes) is part "
            "of its weights; "
            f"num_classes={num_classes!r} cannot rebuild it. Load it, then replace the classifier (timm: "
            "model.model.reset_classifier(n)) and fine-tune it"
        )
    if policy is not None and policy != saved_policy:
        raise ConfigError(
            f"{where} was saved with the depth policy {saved_policy!r}: its depths (trained, recalibrated) are that "
            f"policy's sub-networks, and policy={policy!r} would run others. Load it without policy=, or {rewrap} "
            f"with policy={policy!r}, and train it"
        )
    if block_patterns is not None:
        raise ConfigError(
            f"{where} is a saved adaptive-depth model: its blocks are fixed by its config.json. To gate other blocks, "
            f"{rewrap} with block_patterns=[...]"
        )
    if model_kwargs:
        raise ConfigError(
            f"{where} is a saved adaptive-depth model; from_pretrained does not take {sorted(model_kwargs)} for it. "
            "It takes scaling_factors=, input_size=, dtype= (or torch_dtype=), device_map=, model= (a custom base) "
            "and the Hub options (revision, cache_dir, token, local_files_only, force_download)"
        )
