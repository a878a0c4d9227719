"""Discovery: find the stages and skippable blocks of any vision model.

Order (model metadata first, then a generic probe, then the user's override):

1. **Model metadata.** timm models name their blocks in ``group_matcher()`` regexes
   (``^layer(\\d+)\\.(\\d+)``, ``^stages\\.(\\d+)\\.blocks\\.(\\d+)``...); transformers configs give stage
   depths (``depths``, ``num_hidden_layers``), which pick out the ``nn.Sequential`` / ``nn.ModuleList``
   containers that hold the layers. Modules so named are *candidates*.
2. **A generic probe** verifies every candidate and covers what metadata does not name. One forward pass
   on an example input records each module's call. A module is a *gateable block* when it has parameters,
   is called once, returns a tensor of its input's shape, and becomes the identity when all its
   parameters are zero, up to a trailing activation: a residual block ``act(x + f(x))`` does, a plain
   ``conv`` or a norm layer does not
   (so VGG has nothing to gate). Among nested passing modules the innermost candidate wins (a block,
   not the stage that holds it); outside candidates, the innermost passing module. The probe itself lives in
   :mod:`adaptive_depth.probe`.
3. **Residual branches.** Outside the stages of step 2, a block that keeps its input's shape but has no identity
   path as a whole (TinyViT, RepViT) may hold residual branches, added inline to a shortcut in its forward:
   :mod:`adaptive_depth.branches` finds them with one more forward pass, and they are gated instead (``kind
   "branch"``). Models whose blocks are all residual as a whole skip this step and its forward pass.
4. **A user override** (``block_patterns``): regexes on module names that replace steps 1-3.

Blocks are grouped into stages by parent container; a *fixed* (shape-changing) sibling block, such as
ResNet's first block with its downsample, opens a new stage and counts in it. Branches are grouped by the
parent of their block (all branches of ``stages.1.blocks.*`` form one stage).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .branches import find_branches, is_inside
from .config import BlockSpec, StageSpec
from .errors import ConfigError, NoGateableBlocksError
from .probe import Call, is_residual, keeps_shape, probe
from .state import preserved

__all__ = ["Discovery", "discover"]

logger = logging.getLogger(__name__)


@dataclass
class Discovery:
    """Result of :func:`discover`: the stages and how they were found."""

    stages: list[StageSpec]
    method: str


def _full_matches(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
    # timm's group regexes are written for parameter names (``^layer(\d+)\.(\d+)`` also matches
    # ``layer1.0.conv1.weight``); a module is a candidate when a pattern covers its whole name.
    compiled = [re.compile(p) for p in patterns]
    return {n for n in names if any(c.fullmatch(n) for c in compiled)}


def _timm_patterns(model: nn.Module) -> list[str]:
    matcher_fn = getattr(model, "group_matcher", None)
    if not callable(matcher_fn):
        return []
    try:
        matcher = matcher_fn(coarse=False)
    except Exception:
        return []
    if not isinstance(matcher, dict):  # some models return a function; the probe covers them
        return []
    blocks = matcher.get("blocks", [])
    if isinstance(blocks, str):
        return [blocks]
    return [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in blocks if entry]


def _config_depths(config: Any) -> set[int]:
    """Stage lengths a transformers config declares (``depths``, ``num_hidden_layers``), nested configs too."""
    found: set[int] = set()

    def visit(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if key == "depths" and isinstance(value, (list, tuple)):
                found.update(v for v in value if isinstance(v, int) and v > 0)
            elif key == "num_hidden_layers" and isinstance(value, int) and value > 0:
                found.add(value)
            elif isinstance(value, dict):
                visit(value)

    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        visit(to_dict())
    return found


def _transformers_candidates(model: nn.Module) -> set[str]:
    lengths = _config_depths(getattr(model, "config", None))
    if not lengths:
        return set()
    out: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) in lengths:
            out.update(f"{name}.{child}" if name else child for child in module._modules)
    return out


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _maximal(names: set[str]) -> set[str]:
    """The names not nested inside another name of the set."""
    return {n for n in names if not any(is_inside(n, other) for other in names)}


def _select_units(passing: set[str]) -> set[str]:
    """Pick the gate units among nested passing modules.

    A passing module whose passing descendants are not a single nested chain holds two or more blocks
    side by side (a ``Sequential`` of residual blocks is itself the identity when all are zero): it is a
    container, so descend. Otherwise it is the block itself, even if one of its sub-layers passes too
    (EfficientNet's residual add lives in its last sub-layer, ConvNeXt-V2's GRN is residual): gate the whole
    block, so that a skip saves all of it.
    """
    units: set[str] = set()
    frontier = _maximal(passing)
    while frontier:
        name = frontier.pop()
        below = {n for n in passing if is_inside(n, name)}
        leaves = [n for n in below if not any(is_inside(other, n) for other in below)]
        if len(leaves) >= 2:
            frontier |= _maximal(below)
        else:
            units.add(name)
    return units


def discover(
    model: nn.Module,
    example_input: torch.Tensor,
    block_patterns: Sequence[str] | None = None,
) -> Discovery:
    """Find the stages and gateable blocks of ``model``.

    Args:
        model: any ``nn.Module`` whose forward accepts ``example_input``.
        example_input: a batch the model accepts (its shape sets the probe resolution).
        block_patterns: optional regexes on module names (e.g. ``[r"layer\\d\\.\\d+"]``) that name the blocks
            and replace metadata and the generic search.

    Raises:
        NoGateableBlocksError: nothing in the model can be skipped.
    """
    # Eval mode throughout, restored after: the probes must not touch BatchNorm statistics or depend on dropout.
    with preserved(model, train=False):
        return _discover(model, example_input, block_patterns)


def _discover(model: nn.Module, example_input: torch.Tensor, block_patterns: Sequence[str] | None) -> Discovery:
    calls = probe(model, example_input)
    modules = dict(model.named_modules())
    with_params = {n for n in calls if _has_parameters(modules[n])}

    def passes(name: str, *, residual_test: bool = True) -> bool:
        call = calls.get(name)
        if call is None or call.calls != 1 or not keeps_shape(call) or name not in with_params:
            return False
        return not residual_test or is_residual(modules[name], call)

    branch_stages: list[tuple[int, StageSpec]] = []
    if block_patterns:
        try:
            candidates = _full_matches(block_patterns, calls)
        except re.error as e:
            raise ConfigError(f"block_patterns {list(block_patterns)!r} holds an invalid regex: {e}") from e
        units = _select_units({n for n in candidates if passes(n, residual_test=False)})
        method = "override"
    else:
        candidates = _full_matches(_timm_patterns(model), calls) | (_transformers_candidates(model) & set(calls))
        units = _select_units({n for n in candidates if passes(n)})
        shape_keeping = {n for n in calls if n not in candidates and keeps_shape(calls[n])}
        free = {n for n in shape_keeping if not any(is_inside(n, u) or is_inside(u, n) for u in units) and passes(n)}
        generic = _select_units(free)
        method = "metadata" if units else "probe"
        units |= generic
        branch_stages = _branch_stages(model, example_input, calls, with_params, units)
    if not units and not branch_stages:
        hint = (
            f"no module matched {list(block_patterns)!r} and kept its input's shape"
            if block_patterns
            else "it has no residual block whose output keeps its input's shape, nor residual branches inside its "
            "blocks (plain conv stacks such as VGG cannot skip layers)"
        )
        raise NoGateableBlocksError(
            f"{type(model).__name__} has nothing to gate: {hint}. If you know its blocks, name them with "
            "block_patterns=[r'<regex on module names>']"
        )
    stages = [stage for _, stage in sorted(_group_stages(model, calls, units) + branch_stages, key=lambda t: t[0])]
    if all(stage.num_blocks <= max(1, stage.num_fixed) for stage in stages):
        raise NoGateableBlocksError(
            f"{type(model).__name__} has nothing to gate: every stage holds a single block "
            f"({', '.join(s.name for s in stages)}), and a stage always keeps at least one block. "
            "Name smaller blocks with block_patterns=[r'<regex on module names>'] if the model has them"
        )
    return Discovery(stages=stages, method=method)


def _group_stages(model: nn.Module, calls: dict[str, Call], units: set[str]) -> list[tuple[int, StageSpec]]:
    """Group blocks by parent; returns the stages with the call order of their first block.

    A sibling with parameters that is not a block (ResNet's first block with its downsample, a DLA tree's
    first branch) is a *fixed* block: it opens a new stage and counts in it, so that ``s = 0.5`` of a
    ``[fixed, block]`` stage skips the block.
    """
    modules = dict(model.named_modules())
    stages: list[tuple[int, StageSpec]] = []
    for parent in {_parent(unit) for unit in units}:
        runs: list[list[str]] = []
        for name in _called_children(modules, calls, parent):
            if name in units:
                if not runs:
                    runs.append([])
            elif _has_parameters(modules[name]) and not any(is_inside(u, name) for u in units):
                runs.append([])  # a fixed block
            else:
                continue
            runs[-1].append(name)
        runs = [run for run in runs if any(n in units for n in run)]
        stages += _stages(parent, runs, calls, lambda n: _block_spec(n, calls[n], n in units))
    return stages


def _called_children(modules: dict[str, nn.Module], calls: dict[str, Call], parent: str) -> list[str]:
    """The children of ``parent`` that the probe saw called once, in call order."""
    children = (f"{parent}.{child}" if parent else child for child in modules[parent]._modules)
    return sorted((n for n in children if n in calls and calls[n].calls == 1), key=lambda n: calls[n].order)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _stages(
    parent: str, runs: list[list[str]], calls: dict[str, Call], spec: Callable[[str], BlockSpec]
) -> list[tuple[int, StageSpec]]:
    """One stage per run of units of ``parent`` (``parent#i`` when it holds several), with its first call's order."""
    label = parent or "<root>"
    return [
        (calls[run[0]].order, StageSpec(f"{label}#{i}" if len(runs) > 1 else label, [spec(n) for n in run]))
        for i, run in enumerate(runs)
    ]


def _block_spec(name: str, call: Call, gateable: bool) -> BlockSpec:
    return BlockSpec(
        name=name, gateable=gateable, input_kwarg=call.input_kwarg, output=call.output, output_len=call.output_len
    )


# ---------------------------------------------------------------------- residual branches (see branches.py)
def _ancestors(name: str) -> list[str]:
    """The proper ancestors of a module name, outermost first (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _uncovered(calls: dict[str, Call], units: set[str]) -> set[str]:
    """Modules outside the block-level stages: neither a block, inside or around one, nor in a block's stage.

    Branches are looked for only there, so that a model whose blocks are residual as a whole keeps its blocks as its
    units, and a stage never mixes gated blocks with gated branches.
    """
    stage_parents = {_parent(u) for u in units}
    around = {a for u in units for a in _ancestors(u)}
    return {
        n
        for n in calls
        if n not in around and not any(a in units or _parent(a) in stage_parents for a in (*_ancestors(n), n))
    }


def _branch_stages(
    model: nn.Module, example_input: torch.Tensor, calls: dict[str, Call], with_params: set[str], units: set[str]
) -> list[tuple[int, StageSpec]]:
    """Stages of residual branches, in shape-keeping blocks outside the block-level stages.

    A branch's block must keep its input's shape (a block of a stage, not a downsampling layer or CaiT's class
    attention); among nested branches the outermost is gated (TinyViT's ``attn``, not its ``attn.proj``).
    """
    blocks = {n for n in _uncovered(calls, units) if n in with_params and calls[n].calls == 1 and keeps_shape(calls[n])}
    candidates = {n for n in blocks if calls[n].output == "tensor" and any(a in blocks for a in _ancestors(n))}
    if not candidates:
        return []  # nothing to follow: no second forward pass (models gated block by block pay nothing)
    found = find_branches(model, example_input, candidates, blocks)
    outermost = _maximal({b.name for b in found})
    return _group_branches(model, calls, {b.name: b.block for b in found if b.name in outermost})


def _group_branches(model: nn.Module, calls: dict[str, Call], block_of: dict[str, str]) -> list[tuple[int, StageSpec]]:
    """Group branches by the parent of their block (the stage container: ``stages.1.blocks``), in call order.

    A sibling with parameters that holds no branch (a downsampling layer between blocks) splits the stage, as a
    fixed block does; a stage needs two branches or more, since a stage always runs at least one unit.
    """
    modules = dict(model.named_modules())
    by_parent: dict[str, dict[str, list[str]]] = {}
    for branch, block in block_of.items():
        by_parent.setdefault(_parent(block), {}).setdefault(block, []).append(branch)
    stages: list[tuple[int, StageSpec]] = []
    for parent, holders in by_parent.items():
        runs: list[list[str]] = [[]]
        for name in _called_children(modules, calls, parent):
            if name in holders:
                runs[-1].extend(sorted(holders[name], key=lambda n: calls[n].order))
            elif _has_parameters(modules[name]) and runs[-1]:
                runs.append([])
        runs = [run for run in runs if len(run) >= 2]
        stages += _stages(
            parent, runs, calls, lambda n: BlockSpec(name=n, input_kwarg=calls[n].input_kwarg, kind="branch")
        )
    return stages
