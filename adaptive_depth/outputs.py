"""The logits in what a model returns: a tensor (timm), an output with ``.logits`` (transformers), a tuple."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

__all__ = ["first_tensor", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """Logits from what a model returns: a tensor (timm), an output with ``.logits`` (transformers), a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        f"cannot find logits in a {type(output).__name__} output; the model must return a tensor, a tuple "
        "starting with the logits, or an object with a .logits tensor (an image classifier, not a backbone)"
    )


def first_tensor(output: Any) -> torch.Tensor:
    """The main output of any model: its logits, else the first tensor of a ``ModelOutput`` (a backbone's features)."""
    if isinstance(output, torch.Tensor) or isinstance(getattr(output, "logits", None), torch.Tensor):
        return logits_of(output)
    return next(v for v in output.to_tuple() if isinstance(v, torch.Tensor))
