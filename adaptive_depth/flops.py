"""Cost of a forward pass, counted by PyTorch's own ``FlopCounterMode`` (no hand-written counter)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .state import preserved

__all__ = ["count_flops", "count_flops_by_module"]


def count_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of ``model(*inputs, **kwargs)`` in eval mode (a multiply-add counts as two).

    The model runs in eval mode, so counting never updates BatchNorm statistics; its mode is restored.
    Autograd stays on: the counter's module tracker hooks gradients of module inputs, and fails under
    ``no_grad`` when a module is handed a parameter directly (CaiT's class token).
    """
    return count_flops_by_module(model, *inputs, **kwargs)[0]


def count_flops_by_module(model: nn.Module, *inputs: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """The FLOPs of one eval-mode forward (as :func:`count_flops`) and of every module in it.

    Modules are named as the counter names them: ``<ClassName of model>.<qualified module name>``.
    """
    with preserved(model, train=False), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module
