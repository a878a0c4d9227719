"""Cost of a forward pass, counted by PyTorch's own ``FlopCounterMode`` (no hand-written counter)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .state import preserved

__all__ = ["count_flops"]


def count_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of ``model(*inputs, **kwargs)`` in eval mode (a multiply-add counts as two).

    The model runs in eval mode, so counting never updates BatchNorm statistics; its mode is restored.
    Autograd stays on: the counter's module tracker hooks gradients of module inputs, and fails under
    ``no_grad`` when a module is handed a parameter directly (CaiT's class token).
    """
    with preserved(model, train=False), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())
