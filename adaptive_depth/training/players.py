"""The players of cooperative training: two depth-gated Teammates and a full-depth Leader, run as one module."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..gates import unwrap_gates
from ..model import AdaptiveDepth
from ..state import preserved
from .losses import CooperativeLogits

__all__ = [
    "LEADER_ROUTES",
    "CooperativeModel",
    "classifier_of",
    "logits_of",
    "make_leader",
    "make_teammates",
    "reinit_classifier",
]

LEADER_ROUTES = ("joint", "frozen", "cached", "none")


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


def make_teammates(
    model: AdaptiveDepth | Sequence[AdaptiveDepth], count: int, seed: int, *, fresh_heads: bool = True
) -> list[AdaptiveDepth]:
    """``count`` teammates: the models given, or copies of one model (their heads re-initialised, seed + i).

    Two teammates that start identical stay identical unless they see different data; fresh heads make them
    disagree. A head already trained for the task (``fresh_heads=False``) is kept: no player loses it.
    """
    models = [model] if isinstance(model, AdaptiveDepth) else list(model)
    if not models or not all(isinstance(m, AdaptiveDepth) for m in models):
        raise ConfigError("cooperative training takes an AdaptiveDepth model (or one per teammate)")
    if len(models) > count:
        raise ConfigError(f"got {len(models)} teammate models but the config trains {count}")
    while len(models) < count:
        twin = copy.deepcopy(models[0])
        if fresh_heads:
            reinit_classifier(twin, seed + len(models))
        models.append(twin)
    return models


def make_leader(teammate: AdaptiveDepth, seed: int, *, fresh_head: bool = True) -> nn.Module:
    """A plain full-depth copy of ``teammate``'s base model (gates removed), with its own head (``seed``) unless
    the teammate's head is already trained for the task (``fresh_head=False``)."""
    leader = unwrap_gates(copy.deepcopy(teammate.model))
    if fresh_head:
        reinit_classifier(leader, seed)
    return leader


class CooperativeModel(nn.Module):
    """Teammates and their Leader in one module, so one forward and one backward train them all.

    One module means one ``accelerator.prepare`` and one DDP wrapper whose gradients are reduced once per step.
    It is also the one place the Leader's logits come from, whatever the Leader is (``leader_mode``):

    - ``"joint"``: a full-depth network trained with the Teammates (its logits carry gradients);
    - ``"frozen"``: a fixed, already trained teacher, kept in eval mode and run without gradients;
    - ``"cached"``: the frozen teacher's logits computed once before training (:meth:`cache_leader_logits`) and
      looked up by each image's dataset index;
    - ``"none"``: no Leader.

    Args:
        teammates: the depth-gated networks.
        scaling_factors: the depths each teammate runs at every step.
        leader: the Leader network (``None`` with ``leader_mode="none"``).
        leader_mode: one of the modes above.
        layer_drop: in training mode, the top depth skips random blocks with this probability (LayerDrop-style).
        sampled_depths: in training mode, run the smallest and the top depth plus this many others drawn at random
            (the sandwich rule; ``None``: every depth).
        top_only: in training mode, run the top depth alone (``TrainingConfig.train_depths="top"``): plain
            fine-tuning, or random depth with ``layer_drop``; the other depths are for evaluation.
        own_images: each Teammate's view is of other images (``teammate_data="streams"``): the Leader runs on
            every Teammate's batch, and each Teammate's peer target is the other Teammate run on its batch.
    """

    def __init__(
        self,
        teammates: Sequence[AdaptiveDepth],
        scaling_factors: Sequence[float],
        leader: nn.Module | None = None,
        *,
        leader_mode: str = "joint",
        layer_drop: float = 0.0,
        sampled_depths: int | None = None,
        own_images: bool = False,
        top_only: bool = False,
    ) -> None:
        super().__init__()
        if leader_mode not in LEADER_ROUTES:
            raise ConfigError(f"leader_mode must be one of {LEADER_ROUTES}, got {leader_mode!r}")
        if (leader is None) != (leader_mode == "none"):
            raise ConfigError(f"leader_mode={leader_mode!r} needs {'no' if leader_mode == 'none' else 'a'} Leader")
        self.teammates = nn.ModuleList(teammates)
        self.leader = leader
        self.leader_mode = leader_mode
        if leader is not None and leader_mode != "joint":
            leader.requires_grad_(False).eval()
        self.leader_table: torch.Tensor | None = None  # "cached": logits per dataset index (a plain attribute:
        # a buffer would be broadcast by DDP at every step)
        self.scaling_factors = sorted(scaling_factors, reverse=True)
        self.layer_drop = layer_drop
        self.sampled_depths = sampled_depths
        self.own_images = own_images
        self.top_only = top_only

    def train(self, mode: bool = True) -> CooperativeModel:
        """Train mode for the Teammates (and a joint Leader); a frozen Leader stays in eval mode."""
        super().train(mode)
        if self.leader is not None and self.leader_mode != "joint":
            self.leader.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names its timm players exempt from weight decay (position embeddings, class tokens...).

        ``timm.optim.create_optimizer_v2`` reads this, as it does from a timm model; 1-D parameters (norms, biases)
        are exempt anyway.
        """
        names: set[str] = set()
        for prefix, module in self.named_modules():
            exempt = getattr(module, "no_weight_decay", None)
            if module is not self and callable(exempt) and not isinstance(module, CooperativeModel):
                names |= {f"{prefix}.{name}" for name in exempt()}
        return names

    def depths_to_run(self) -> list[float]:
        """This step's depths, largest first: all of them, or (training) the top one alone or the sandwich sample.

        The sample comes from torch's random number generator: seeded, checkpointed, the same on every process.
        """
        depths = self.scaling_factors
        if self.top_only and self.training:
            return depths[:1]
        k = self.sampled_depths
        if k is None or not self.training or len(depths) <= k + 2:
            return list(depths)
        middle = depths[1:-1]
        picked = [middle[i] for i in torch.randperm(len(middle))[:k].tolist()]
        return sorted({depths[0], depths[-1], *picked}, reverse=True)

    def leader_logits(self, pixel_values: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor | None:
        """The Leader's logits for a batch, by whichever route its mode takes (``None`` without a Leader)."""
        if self.leader_mode == "none":
            return None
        if self.leader_mode == "cached":
            if self.leader_table is None:
                raise ConfigError("the Leader's logits are not cached yet: call cache_leader_logits() before training")
            if indices is None:
                raise ConfigError(
                    "cached Leader logits need each image's dataset index: build the loaders with "
                    "make_loaders(..., with_index=True) or a dataset that returns (image, label, index)"
                )
            self.leader_table = self.leader_table.to(pixel_values.device)
            return self.leader_table[indices.to(pixel_values.device)]
        if self.leader_mode == "frozen":
            with torch.no_grad():
                return logits_of(self.leader(pixel_values))
        return logits_of(self.leader(pixel_values))

    @torch.no_grad()
    def cache_leader_logits(
        self,
        batches: Iterable[Sequence[torch.Tensor]],
        num_images: int,
        gather: Callable[[Any], Any] = lambda x: x,
    ) -> torch.Tensor:
        """Run the frozen Leader once over ``batches`` of ``(images, labels, indices)`` and keep its logits.

        Args:
            batches: un-augmented training images with their dataset indices (each process its share).
            num_images: size of the training set (rows of the table).
            gather: collects ``(indices, logits)`` from every process (``accelerator.gather``), so each process
                holds the whole table.
        """
        if self.leader is None or self.leader_mode != "cached":
            raise ConfigError("cache_leader_logits() needs leader_mode='cached' and a frozen Leader")
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in batches:
            if len(batch) < 3:
                raise ConfigError(
                    "caching the Leader's logits needs batches of (images, labels, indices): build the loaders with "
                    "make_loaders(..., with_index=True)"
                )
            found.append(gather((batch[2], logits_of(self.leader(batch[0])).float())))
        indices = torch.cat([i for i, _ in found])
        logits = torch.cat([z for _, z in found])
        table = torch.zeros(num_images, logits.shape[-1], device=logits.device)
        table[indices] = logits
        self.leader_table = table
        return table

    def _run(self, teammate: AdaptiveDepth, x: torch.Tensor, depths: Sequence[float]) -> dict[float, torch.Tensor]:
        """One Teammate's logits at every depth of this step (random depth at the top one, if asked)."""
        by_depth = {}
        with preserved(teammate):
            for s in depths:
                if s == self.scaling_factors[0] and self.layer_drop > 0 and self.training:
                    teammate.drop_blocks(self.layer_drop)
                else:
                    teammate.set_scaling_factor(s)
                by_depth[s] = logits_of(teammate(x))
        return by_depth

    @torch.no_grad()
    def _peer(self, teammate: AdaptiveDepth, x: torch.Tensor) -> torch.Tensor:
        """A Teammate's full-depth logits on another Teammate's batch: a target, so without gradients."""
        with preserved(teammate):
            return logits_of(teammate.set_scaling_factor(self.scaling_factors[0])(x))

    def forward(self, pixel_values: torch.Tensor, indices: torch.Tensor | None = None) -> CooperativeLogits:
        """Every player's logits on the batch.

        Args:
            pixel_values: ``[B, C, H, W]`` (every Teammate sees it), or ``[B, T, C, H, W]``: one view per Teammate
                (``TrainingConfig.teammate_data``: the same images under their own augmentation, or each
                Teammate's own images).
            indices: the images' dataset indices (``[B]`` or ``[B, T]``), for cached Leader logits.
        """
        n = len(self.teammates)
        if pixel_values.dim() == 5:
            if pixel_values.shape[1] != n:
                raise ConfigError(f"got {pixel_values.shape[1]} views per image for {n} Teammate(s)")
            views = list(pixel_values.unbind(1))
            view_indices = list(indices.unbind(1)) if indices is not None else [None] * n
        else:
            views, view_indices = [pixel_values] * n, [indices] * n
        depths = self.depths_to_run()
        outputs = [self._run(teammate, x, depths) for teammate, x in zip(self.teammates, views)]
        if not self.own_images:  # one set of images (shared, or views of it): one Leader pass, peers as they are
            return CooperativeLogits(outputs, self.leader_logits(views[0], view_indices[0]))
        leader = [self.leader_logits(x, i) for x, i in zip(views, view_indices)]
        peers = [self._peer(self.teammates[1 - t], x) for t, x in enumerate(views)] if n == 2 else None
        return CooperativeLogits(outputs, None if self.leader_mode == "none" else leader, peers)  # type: ignore[arg-type]
