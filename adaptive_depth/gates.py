"""Depth gates: a wrapper that runs its block or skips it entirely.

A gate replaces a block in its parent module (the block stays reachable as ``gate.base_layer``). When the
gate is off the block is not called at all: the gate hands back its input in the structure the block
returns (the tensor itself, ``(tensor, None, ...)`` for a block that returns a tuple, or all its tensor arguments
for a block that transforms each of them, such as TNT's ``(pixel_embed, patch_embed)``). This is the
``y = x + m * (block(x) - x)`` of the paper with ``m`` in {0, 1}, as control flow instead of arithmetic, so
a skipped block costs nothing. Switching is a Python boolean: no weights move.

A gate on a residual *branch* (``kind="branch"``: a module whose output its block adds to a shortcut,
``x = shortcut + attn(x)``) hands back ``torch.zeros_like`` of its input instead, the shape of the branch's
output: the block's own add then gives the shortcut, bitwise.

Gates are invisible in ``state_dict()``: keys are those of the unwrapped model (no ``base_layer.``), so a
checkpoint loads into the plain timm / transformers model and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AdaptiveDepthConfig, BlockSpec
from .errors import CheckpointError, ConfigError

__all__ = ["DepthGate", "SkippedBlock", "check_structure", "gate_model", "is_gated", "unwrap_gates"]

_INNER = "base_layer."


class SkippedBlock(nn.Module):
    """What a switched-off gate returns, as a module: the input in the block's structure (zeros for a branch).

    An export that keeps the blocks' positions puts one in each removed block's place, for networks whose forward
    counts its blocks (ConViT adds its class token before a fixed block index).

    Args:
        spec: how the block is called and what it returns.
    """

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.input_kwarg = spec.input_kwarg
        self.tuple_len = spec.output_len if spec.output == "tuple" else 0
        self.inputs_len = spec.output_len if spec.output == "inputs" else 0
        self.zeros_when_off = spec.kind == "branch"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs[self.input_kwarg] if self.input_kwarg is not None and not args else args[0]
        if self.zeros_when_off:
            return torch.zeros_like(x)  # discovery checked that the branch returns a tensor of its input's shape
        if self.inputs_len:
            return tuple(args[: self.inputs_len])
        if self.tuple_len:
            return (x,) + (None,) * (self.tuple_len - 1)
        return x


class DepthGate(SkippedBlock):
    """Runs ``base_layer`` when ``active``; otherwise returns its input unchanged, in the block's structure.

    A branch gate (``spec.kind == "branch"``) returns zeros of its input's shape, dtype and device instead.

    Args:
        block: the residual block (or branch) to gate.
        spec: how the block is called and what it returns.
    """

    def __init__(self, block: nn.Module, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.base_layer = block
        self.active = True
        self.register_state_dict_post_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def switch(self, on: bool) -> None:
        """Run the block (``True``) or skip it (``False``)."""
        # A plain bool attribute: skip nn.Module.__setattr__'s parameter / buffer / module bookkeeping.
        object.__setattr__(self, "active", on)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            return self.base_layer(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Parent code sometimes reads attributes of its children (``layer.attention``...): forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"active={self.active}, branch=True" if self.zeros_when_off else f"active={self.active}"


def _drop_inner_prefix(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, _meta: Any) -> None:
    inner = prefix + _INNER
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_inner_prefix(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_args: Any, **_kwargs: Any
) -> None:
    inner = prefix + _INNER
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def is_gated(model: nn.Module) -> bool:
    """True if ``model`` already holds depth gates (it was wrapped before)."""
    return any(isinstance(m, DepthGate) for m in model.modules())


def gate_model(model: nn.Module, blocks: list[BlockSpec]) -> dict[str, DepthGate]:
    """Wrap every gateable block of ``model`` in place; return the gates by block name.

    Everything is checked before the first block is replaced, so a refused model is left as it was.
    """
    if is_gated(model):
        raise ConfigError(
            f"this {type(model).__name__} already has depth gates (it was wrapped before); use the AdaptiveDepth model "
            "you have, or unwrap_gates(model) first"
        )
    specs = [spec for spec in blocks if spec.gateable]
    targets = {spec.name: model.get_submodule(spec.name) for spec in specs}
    gates: dict[str, DepthGate] = {}
    for spec in specs:
        gate = DepthGate(targets[spec.name], spec)
        _set_child(model, spec.name, gate)
        gates[spec.name] = gate
    return gates


def unwrap_gates(model: nn.Module) -> nn.Module:
    """Put every gated block back in its parent (in place); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DepthGate):
            _set_child(model, name, module.base_layer)
    return model


def check_structure(model: nn.Module, config: AdaptiveDepthConfig) -> None:
    """Raise :class:`CheckpointError` unless ``config``'s stages name distinct, un-nested blocks of ``model``."""
    modules = dict(model.named_modules())
    names = [b.name for s in config.stages for b in s.blocks]
    missing = [n for n in names if n not in modules]
    if missing:
        raise CheckpointError(
            f"the config names blocks {missing[:5]} that {type(model).__name__} does not have; "
            "the config belongs to another architecture"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    nested = sorted({a for a in names for b in names if a != b and a.startswith(b + ".")})
    if repeated or nested:
        raise CheckpointError(
            f"the config's stages list blocks twice {repeated[:5]} or blocks inside other blocks {nested[:5]}; "
            "it was edited by hand: wrap the model again (block_patterns= names blocks explicitly)"
        )
