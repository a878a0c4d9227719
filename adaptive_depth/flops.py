"""Cost of a forward pass, counted by PyTorch's own ``FlopCounterMode`` (no hand-written counter)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .state import preserved

__all__ = ["COUNTING_REVISION", "count_flops", "count_flops_by_module"]

# What a saved FLOPs cache was counted with: raise it when the counting changes, and caches of another revision are
# counted again. 2: attention on the CPU counted (revision 1 counted it only on a GPU).
COUNTING_REVISION = 2


def _cpu_attention(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU's fused attention kernel, counted as PyTorch counts the GPU's."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU's fused attention kernel's backward pass, counted as PyTorch counts the GPU's."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the GPU's fused attention kernels and none for the CPU's (PyTorch 2.14), which
# it then counts as 0 FLOPs: ViT-S/16 at 224 px would be 8.5 GFLOPs on the CPU and 9.2 on a GPU.
ATTENTION_ON_CPU = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


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
    with (
        preserved(model, train=False),
        torch.enable_grad(),
        FlopCounterMode(display=False, custom_mapping=ATTENTION_ON_CPU) as counter,
    ):
        model(*inputs, **kwargs)
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module
