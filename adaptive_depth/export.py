"""Materialise one depth as a plain timm / transformers module that runs without this library."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from torch import nn

from .config import StageSpec
from .errors import AdaptiveDepthError
from .gates import unwrap_gates

__all__ = ["export_depth"]

logger = logging.getLogger(__name__)


def export_depth(model: nn.Module, stages: Sequence[StageSpec], masks: Sequence[Sequence[bool]]) -> nn.Module:
    """Return a deep copy of ``model`` (gated or not) with the blocks switched off in ``masks`` removed.

    Blocks inside an ``nn.Sequential`` / ``nn.ModuleList`` are deleted (indices renumber, as in a natively
    shallower model); a block held in a plain attribute becomes ``nn.Identity``. A transformers config's
    ``depths`` / ``num_hidden_layers`` are updated so that ``save_pretrained`` / ``from_pretrained`` of the
    result rebuild the shallower architecture.
    """
    plain = unwrap_gates(copy.deepcopy(model))
    removals: dict[str, list[str]] = {}
    for stage, mask in zip(stages, masks):
        for block, keep in zip(stage.blocks, mask):
            if not keep:
                parent, _, child = block.name.rpartition(".")
                removals.setdefault(parent, []).append(child)
    for parent_name, children in removals.items():
        parent = plain.get_submodule(parent_name) if parent_name else plain
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            for index in sorted((int(c) for c in children), reverse=True):
                del parent[index]
            continue
        for child in children:
            spec = next(b for s in stages for b in s.blocks if b.name == f"{parent_name}.{child}".lstrip("."))
            if spec.output != "tensor":
                raise AdaptiveDepthError(
                    f"cannot export: block {spec.name!r} returns a tuple and sits in a plain attribute of "
                    f"{type(parent).__name__}, so it can be neither deleted nor replaced by nn.Identity"
                )
            parent._modules[child] = nn.Identity()
    _update_transformers_config(plain, stages, masks)
    return plain


def _update_transformers_config(model: nn.Module, stages: Sequence[StageSpec], masks: Sequence[Sequence[bool]]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    full = [s.num_blocks for s in stages]
    kept = [sum(m) for m in masks]
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and list(depths) == full:
        config.depths = kept
    elif getattr(config, "num_hidden_layers", None) == sum(full) and len(stages) == 1:
        config.num_hidden_layers = kept[0]
    elif kept != full:
        logger.warning(
            "exported %s: its config does not describe the stage depths %s, left unchanged",
            type(model).__name__,
            full,
        )
