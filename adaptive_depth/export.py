"""Materialise one depth as a plain timm / transformers module that runs without this library."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import BlockSpec, StageSpec
from .errors import AdaptiveDepthError, ConfigError
from .export_files import check_outputs
from .gates import SkippedBlock, unwrap_gates
from .outputs import first_tensor
from .state import preserved

__all__ = ["ZeroBranch", "config_depth_field", "export_depth", "export_matching"]

logger = logging.getLogger(__name__)


class ZeroBranch(SkippedBlock):
    """What a removed residual branch becomes: no parameters, returns zeros of its input's shape (a switched-off
    branch gate's output, as a module of its own).

    The block's own add (``shortcut + branch(x)``) then gives the shortcut, as the gated model does.

    Args:
        input_kwarg: keyword the block passes the branch's input by (``None``: the first positional argument).
    """

    def __init__(self, input_kwarg: str | None = None) -> None:
        super().__init__(BlockSpec(name="branch", input_kwarg=input_kwarg, kind="branch"))


def export_depth(
    model: nn.Module, stages: Sequence[StageSpec], masks: Sequence[Sequence[bool]], *, keep_positions: bool = False
) -> nn.Module:
    """Return a deep copy of ``model`` (gated or not) with the blocks switched off in ``masks`` removed.

    Blocks inside an ``nn.Sequential`` / ``nn.ModuleList`` are deleted (indices renumber, as in a natively
    shallower model; named blocks of a Sequential built from an ``OrderedDict`` keep their names); a block held in
    a plain attribute becomes ``nn.Identity``, and a residual branch becomes a :class:`ZeroBranch` (its block's
    forward still adds it, wherever it is held). A transformers config's
    ``depths`` / ``num_hidden_layers`` are updated so that ``save_pretrained`` / ``from_pretrained`` of the
    result rebuild the shallower architecture. With ``keep_positions`` every removed block's place holds a
    :class:`~adaptive_depth.gates.SkippedBlock` instead (nothing renumbers; the config is left as it is).
    """
    plain = unwrap_gates(copy.deepcopy(model))
    removals: dict[str, list[str]] = {}
    for stage, mask in zip(stages, masks):
        for block, keep in zip(stage.blocks, mask):
            if keep:
                continue
            if block.kind == "branch":
                plain.set_submodule(block.name, ZeroBranch(block.input_kwarg))
                continue
            if keep_positions:
                plain.set_submodule(block.name, SkippedBlock(block))
                continue
            parent, _, child = block.name.rpartition(".")
            removals.setdefault(parent, []).append(child)
    # Every parent is looked up before anything is deleted: deleting from a Sequential renumbers its children, and
    # a removal further down that Sequential (CSATv2: a block inside block 3 of a stage whose block 2 goes) would
    # otherwise find another module under its old index.
    parents = [(name, plain.get_submodule(name) if name else plain, children) for name, children in removals.items()]
    for parent_name, parent, children in parents:
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            if all(c.isdigit() for c in children):  # indices: delete from the end, the rest renumber
                for index in sorted((int(c) for c in children), reverse=True):
                    del parent[index]
            else:  # a Sequential of named blocks (OrderedDict): the others keep their names
                for child in children:
                    delattr(parent, child)
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


def export_matching(
    model: nn.Module, stages: Sequence[StageSpec], masks: Sequence[Sequence[bool]], example: torch.Tensor
) -> tuple[nn.Module, bool]:
    """:func:`export_depth`, checked against ``model`` (gated, switched to ``masks`` already) on ``example``.

    Where deleting the removed blocks changes what the network computes (a forward that counts its blocks: ConViT
    adds its class token before block 10, whatever the list holds), the blocks' positions are kept instead.

    Returns:
        The plain module, and whether it kept the positions (a natively shallower network would compute another
        function: no timm / transformers repository of that depth exists).

    Raises:
        ConfigError: neither copy computes what ``model`` computes at this depth.
    """
    with torch.no_grad(), preserved(model, train=False):
        expected = first_tensor(model(example))
        deleted = export_depth(model, stages, masks)
        try:
            with preserved(deleted, train=False):
                check_outputs(first_tensor(deleted(example)), expected, "the copy with the blocks deleted")
            return deleted, False
        except ConfigError:
            why = "it computes another function"
        except (RuntimeError, TypeError, IndexError) as e:  # or it no longer runs
            why = f"it fails: {type(e).__name__}: {e}"
        kept = export_depth(model, stages, masks, keep_positions=True)
        with preserved(kept, train=False):
            check_outputs(first_tensor(kept(example)), expected, "the copy with the blocks' places kept")
    logger.info("export: the removed blocks keep their places (with them deleted %s)", why)
    return kept, True


def config_depth_field(config: Any, stages: Sequence[StageSpec]) -> str | None:
    """The transformers config field that holds the block stages' depths (``depths`` or ``num_hidden_layers``).

    ``None`` when the config does not describe them: ``save_pretrained`` of a shallower export would then reload
    as another network.
    """
    # Only whole blocks are in a config's depths: a removed branch leaves its block (and the depth) in place.
    full = [s.num_blocks for s in stages if s.kind == "block"]
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and list(depths) == full:
        return "depths"
    if getattr(config, "num_hidden_layers", None) == sum(full) and len(full) == 1:
        return "num_hidden_layers"
    return None


def _renumber_backbone_stages(config: Any, layers: int) -> None:
    """A ViT-like config that is also a backbone's (BEiT, DINOv2) names one stage per layer: name the kept ones, so
    that the config reloads (transformers checks that the output stages exist)."""
    names = getattr(config, "stage_names", None)
    if not isinstance(names, list) or not hasattr(config, "set_output_features_output_indices"):
        return
    if config.out_features != names[-1:]:
        logger.warning("exported config: its backbone outputs %s become the last kept layer's", config.out_features)
    config.stage_names = ["stem", *(f"stage{i}" for i in range(1, layers + 1))]
    config.set_output_features_output_indices(out_features=None, out_indices=None)


def _update_transformers_config(model: nn.Module, stages: Sequence[StageSpec], masks: Sequence[Sequence[bool]]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    pairs = [(stage, mask) for stage, mask in zip(stages, masks) if stage.kind == "block"]
    full = [s.num_blocks for s, _ in pairs]
    kept = [sum(m) for _, m in pairs]
    field = config_depth_field(config, stages)
    if field == "depths":
        config.depths = kept
    elif field == "num_hidden_layers":
        config.num_hidden_layers = kept[0]
        _renumber_backbone_stages(config, kept[0])
    elif kept != full:
        logger.warning(
            "exported %s: its config does not describe the stage depths %s, left unchanged",
            type(model).__name__,
            full,
        )
    if any(not all(m) for stage, m in zip(stages, masks) if stage.kind == "branch"):
        logger.warning(
            "exported %s without some residual branches: its config cannot describe that, so its own "
            "save_pretrained() would not reload this network; keep the adaptive model (save_pretrained) instead",
            type(model).__name__,
        )
