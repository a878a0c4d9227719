"""Discovery: find the stages and skippable blocks of any vision model.

Order (STYLE.md, "discovery order"):

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
   not the stage that holds it); outside candidates, the innermost passing module.
3. **A user override** (``block_patterns``): regexes on module names that replace steps 1-2.

Blocks are grouped into stages by parent container; a *fixed* (shape-changing) sibling block, such as
ResNet's first block with its downsample, opens a new stage and counts in it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import BlockSpec, StageSpec
from .errors import ConfigError, NoGateableBlocksError
from .state import preserved

__all__ = ["Discovery", "discover"]

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """What one module saw during the probe forward pass."""

    order: int
    calls: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


@dataclass
class Discovery:
    """Result of :func:`discover`: the stages and how they were found."""

    stages: list[StageSpec]
    method: str


def _main_input(call: _Call) -> tuple[torch.Tensor | None, str | None]:
    """The tensor a block transforms, and the keyword it came by (None: first positional argument)."""
    if call.args:
        return (call.args[0], None) if isinstance(call.args[0], torch.Tensor) else (None, None)
    if isinstance(call.kwargs.get("hidden_states"), torch.Tensor):
        return call.kwargs["hidden_states"], "hidden_states"
    for key, value in call.kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, key
    return None, None


def _main_output(output: Any) -> tuple[torch.Tensor | None, str, int]:
    """The tensor a block returns, whether it came alone or first in a tuple, and the tuple length."""
    if isinstance(output, torch.Tensor):
        return output, "tensor", 1
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return output[0], "tuple", len(output)
    return None, "tensor", 1


def _probe(model: nn.Module, example_input: torch.Tensor) -> dict[str, _Call]:
    """Run one forward pass and record the first call of every submodule, in call order."""
    calls: dict[str, _Call] = {}
    handles = []

    def pre_hook(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in calls:
                calls[name].calls += 1
            else:
                calls[name] = _Call(order=len(calls), calls=1, args=args, kwargs=dict(kwargs))

        return hook

    def post_hook(name: str):
        def hook(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
            if calls[name].calls == 1:
                calls[name].output = output

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:
        raise ConfigError(
            f"the probe forward pass on an input of shape {tuple(example_input.shape)} failed ({e}); "
            "pass an input the model accepts with `example_input=` (or `input_size=`)"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _keeps_shape(call: _Call) -> bool:
    x, _ = _main_input(call)
    y, _, _ = _main_output(call.output)
    return x is not None and y is not None and y.shape == x.shape and y.dtype == x.dtype


# A residual block may end in an activation: ``act(x + f(x))``. With zero weights it gives ``act(x)``.
_TRAILING_ACTIVATIONS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda t: t,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.gelu,
    lambda t: F.gelu(t, approximate="tanh"),
    F.hardswish,
    F.elu,
    F.mish,
)


def _is_residual(module: nn.Module, call: _Call) -> bool:
    """True if the module passes its input through when all its parameters are zero.

    A residual block ``act(x + f(x))`` becomes ``act(x)`` for the identity or a standard activation (ReLU,
    LeakyReLU, SiLU, GELU...). A plain conv or norm layer gives zeros, and a gating module such as
    squeeze-excitation gives ``x / 2``; neither passes.
    """
    x, _ = _main_input(call)
    params = dict(module.named_parameters())
    if not params or x is None or not x.is_floating_point() or float(x.float().std()) == 0.0:
        return False  # nothing to zero, or an input too degenerate to tell (e.g. after a zero-init layer)
    if not bool((x > 0).any()):
        return False  # ReLU(x) would be all zeros, like the output of a zeroed conv
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    try:
        with torch.no_grad():
            y, _, _ = _main_output(functional_call(module, zeros, call.args, call.kwargs))
    except Exception:  # an exotic module that cannot run with zero weights is not a block we can reason about
        return False
    if y is None or y.shape != x.shape or not torch.isfinite(y).all():
        return False
    x, y = x.float(), y.float()
    atol = 1e-4 * float(x.abs().max())  # relative: freshly initialised models can carry tiny activations
    return any(torch.allclose(y, act(x), rtol=1e-4, atol=atol) for act in _TRAILING_ACTIVATIONS)


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


def _is_inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def _maximal(names: set[str]) -> set[str]:
    """The names not nested inside another name of the set."""
    return {n for n in names if not any(_is_inside(n, other) for other in names)}


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
        below = {n for n in passing if _is_inside(n, name)}
        leaves = [n for n in below if not any(_is_inside(other, n) for other in below)]
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
    calls = _probe(model, example_input)
    modules = dict(model.named_modules())

    def passes(name: str, *, residual_test: bool = True) -> bool:
        call = calls.get(name)
        if call is None or call.calls != 1 or not _keeps_shape(call):
            return False
        if not any(True for _ in modules[name].parameters()):
            return False
        return not residual_test or _is_residual(modules[name], call)

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
        shape_keeping = {n for n in calls if n not in candidates and _keeps_shape(calls[n])}
        free = {n for n in shape_keeping if not any(_is_inside(n, u) or _is_inside(u, n) for u in units) and passes(n)}
        generic = _select_units(free)
        method = "metadata" if units else "probe"
        units |= generic
    if not units:
        hint = (
            f"no module matched {list(block_patterns)!r} and kept its input's shape"
            if block_patterns
            else "it has no residual block whose output keeps its input's shape (plain conv stacks such as "
            "VGG cannot skip layers)"
        )
        raise NoGateableBlocksError(
            f"{type(model).__name__} has nothing to gate: {hint}. If you know its blocks, name them with "
            "block_patterns=[r'<regex on module names>']"
        )
    stages = _group_stages(model, calls, units)
    if all(stage.num_blocks <= max(1, stage.num_fixed) for stage in stages):
        raise NoGateableBlocksError(
            f"{type(model).__name__} has nothing to gate: every stage holds a single block "
            f"({', '.join(s.name for s in stages)}), and a stage always keeps at least one block. "
            "Name smaller blocks with block_patterns=[r'<regex on module names>'] if the model has them"
        )
    return Discovery(stages=stages, method=method)


def _group_stages(model: nn.Module, calls: dict[str, _Call], units: set[str]) -> list[StageSpec]:
    """Group blocks by parent, in call order.

    A sibling with parameters that is not a block (ResNet's first block with its downsample, a DLA tree's
    first branch) is a *fixed* block: it opens a new stage and counts in it, so that ``s = 0.5`` of a
    ``[fixed, block]`` stage skips the block.
    """
    modules = dict(model.named_modules())
    by_parent: dict[str, list[str]] = {}
    for unit in units:
        by_parent.setdefault(_parent(unit), [])
    for parent in by_parent:
        for child in modules[parent]._modules:
            name = f"{parent}.{child}" if parent else child
            call = calls.get(name)
            if call is None or call.calls != 1:
                continue
            is_unit = name in units
            fixed = (
                not is_unit
                and any(True for _ in modules[name].parameters())
                and not any(_is_inside(u, name) for u in units)
            )
            if is_unit or fixed:
                by_parent[parent].append(name)
    stages: list[tuple[int, StageSpec]] = []
    for parent, names in by_parent.items():
        names.sort(key=lambda n: calls[n].order)
        runs: list[list[str]] = []
        for name in names:
            if name not in units or not runs:
                runs.append([])
            runs[-1].append(name)
        runs = [run for run in runs if any(n in units for n in run)]
        for i, run in enumerate(runs):
            blocks = [_block_spec(n, calls[n], n in units) for n in run]
            label = parent or "<root>"
            stages.append((calls[run[0]].order, StageSpec(f"{label}#{i}" if len(runs) > 1 else label, blocks)))
    return [stage for _, stage in sorted(stages, key=lambda t: t[0])]


def _block_spec(name: str, call: _Call, gateable: bool) -> BlockSpec:
    _, input_kwarg = _main_input(call)
    _, output, output_len = _main_output(call.output)
    return BlockSpec(name=name, gateable=gateable, input_kwarg=input_kwarg, output=output, output_len=output_len)
