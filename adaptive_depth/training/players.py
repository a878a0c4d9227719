"""The players of cooperative training: two depth-gated Teammates and a full-depth Leader, run as one module."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..gates import unwrap_gates
from ..model import AdaptiveDepth
from .losses import CooperativeLogits

__all__ = ["CooperativeModel", "classifier_of", "logits_of", "make_teammates", "reinit_classifier"]


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


def classifier_of(model: nn.Module) -> nn.Module:
    """The classification head: timm's ``get_classifier()``, transformers' ``classifier``, else the last Linear."""
    inner = model.model if isinstance(model, AdaptiveDepth) else model
    get = getattr(inner, "get_classifier", None)
    head = get() if callable(get) else getattr(inner, "classifier", None)
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(inner).__name__} has no classification head (no nn.Linear) to train")
    return linears[-1]


def reinit_classifier(model: nn.Module, seed: int) -> None:
    """Re-initialise the classification head with its own default initialisation, from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in classifier_of(model).modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and any(True for _ in module.parameters(recurse=False)):
                reset()


def make_teammates(model: AdaptiveDepth | Sequence[AdaptiveDepth], count: int, seed: int) -> list[AdaptiveDepth]:
    """``count`` teammates: the models given, or copies of one model whose heads are re-initialised (seed + i).

    Two teammates that start identical stay identical; fresh heads make them disagree usefully.
    """
    models = [model] if isinstance(model, AdaptiveDepth) else list(model)
    if not models or not all(isinstance(m, AdaptiveDepth) for m in models):
        raise ConfigError("cooperative training takes an AdaptiveDepth model (or one per teammate)")
    if len(models) > count:
        raise ConfigError(f"got {len(models)} teammate models but the config trains {count}")
    while len(models) < count:
        twin = copy.deepcopy(models[0])
        reinit_classifier(twin, seed + len(models))
        models.append(twin)
    return models


def make_leader(teammate: AdaptiveDepth, seed: int) -> nn.Module:
    """A plain full-depth copy of ``teammate``'s base model (gates removed) with its own head (``seed``)."""
    leader = unwrap_gates(copy.deepcopy(teammate.model))
    reinit_classifier(leader, seed)
    return leader


class CooperativeModel(nn.Module):
    """Teammates (and a jointly trained Leader) in one module, so one forward and one backward train them all.

    One module means one ``accelerator.prepare`` and one DDP wrapper whose gradients are reduced once per step.

    Args:
        teammates: the depth-gated networks.
        scaling_factors: the depths each teammate runs at every step.
        leader: a Leader trained jointly (``None``: no Leader, or a frozen one run outside this module).
        layer_drop: in training mode, the top depth skips random blocks with this probability (LayerDrop-style).
        sampled_depths: in training mode, run the smallest and the top depth plus this many others drawn at random
            (the sandwich rule; ``None``: every depth).
    """

    def __init__(
        self,
        teammates: Sequence[AdaptiveDepth],
        scaling_factors: Sequence[float],
        leader: nn.Module | None = None,
        layer_drop: float = 0.0,
        sampled_depths: int | None = None,
    ) -> None:
        super().__init__()
        self.teammates = nn.ModuleList(teammates)
        self.leader = leader
        self.scaling_factors = sorted(scaling_factors, reverse=True)
        self.layer_drop = layer_drop
        self.sampled_depths = sampled_depths

    def depths_to_run(self) -> list[float]:
        """This step's depths, largest first: all of them, or (training, sandwich rule) top, smallest and a sample.

        The sample comes from torch's random number generator: seeded, checkpointed, the same on every process.
        """
        depths = self.scaling_factors
        k = self.sampled_depths
        if k is None or not self.training or len(depths) <= k + 2:
            return list(depths)
        middle = depths[1:-1]
        picked = [middle[i] for i in torch.randperm(len(middle))[:k].tolist()]
        return sorted({depths[0], depths[-1], *picked}, reverse=True)

    def forward(self, pixel_values: torch.Tensor) -> CooperativeLogits:
        leader = logits_of(self.leader(pixel_values)) if self.leader is not None else None
        top = self.scaling_factors[0]
        depths = self.depths_to_run()
        outputs = []
        for teammate in self.teammates:
            by_depth = {}
            for s in depths:
                if s == top and self.layer_drop > 0 and self.training:
                    teammate.drop_blocks(self.layer_drop)
                else:
                    teammate.set_scaling_factor(s)
                by_depth[s] = logits_of(teammate(pixel_values))
            teammate.set_scaling_factor(1.0)
            outputs.append(by_depth)
        return CooperativeLogits(teammates=outputs, leader=leader)
