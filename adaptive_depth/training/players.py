"""The players of cooperative training: two depth-gated Teammates and a full-depth Leader, run as one module."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..gates import unwrap_gates
from ..model import AdaptiveDepth
from ..norms import batch_statistics, batchnorm_layers
from ..outputs import logits_of
from ..state import preserved
from .compute import BACKWARD_FACTOR, ComputeMeter, ForwardCost
from .config import LEADER_MODES, TOP_SHARE, TRAIN_DEPTHS
from .losses import CooperativeLogits
from .teacher_cache import TeacherCache

__all__ = [
    "CooperativeModel",
    "classifier_of",
    "logits_of",
    "make_leader",
    "make_teammates",
    "nested_depths",
    "reinit_classifier",
]


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


def nested_depths(model: AdaptiveDepth, smallest: float, top: float = 1.0, named: Sequence[float] = ()) -> list[float]:
    """The depths a user can deploy between ``smallest`` and ``top``: one scaling factor per distinct configuration.

    Under the model's depth policy every ``s`` runs a nested set of blocks (each stage keeps ``ceil(s * n)``), so the
    configuration changes only where ``s * n`` crosses an integer. Each distinct configuration in
    ``[smallest, top]`` is returned once, ascending, named by ``smallest``, ``top`` or a scaling factor of ``named``
    that gives it (the trained depths), else by a scaling factor inside its interval.
    """
    steps = {k / st.num_blocks for st in model.stages for k in range(1, st.num_blocks + 1)}
    points = sorted({smallest, top} | {s for s in steps if smallest < s < top})
    inside = [(a + b) / 2 for a, b in itertools.pairwise(points)]  # clear of the rounding of a breakpoint itself
    found: dict[tuple[int, ...], float] = {}
    for s in [top, smallest, *sorted(s for s in named if smallest <= s <= top), *points, *inside]:
        found.setdefault(tuple(model.depth_for(s)), s)
    return sorted(found.values())


class CooperativeModel(nn.Module):
    """Teammates and their Leader in one module, so one forward and one backward train them all.

    One module means one ``accelerator.prepare`` and one DDP wrapper whose gradients are reduced once per step.
    It is also the one place the Leader's logits come from, whatever the Leader is (``leader``, as
    ``TrainingConfig.leader``):

    - ``"joint"``: a full-depth network trained with the Teammates (its logits carry gradients);
    - ``"frozen"``: a fixed, already trained teacher, kept in eval mode and run without gradients;
    - ``"cached"``: that teacher's logits made once before training for several augmentation draws of every
      image (:class:`~adaptive_depth.training.teacher_cache.TeacherCache`), looked up by each image's key;
    - ``"ema"``: an exponential moving average of the first Teammate at full depth, run without gradients and with
      each batch's BatchNorm statistics (:func:`~adaptive_depth.norms.batch_statistics`; ``leader_model`` is timm's
      ``ModelEmaV3`` of it; :meth:`update_ema` after each optimizer step);
    - ``"none"``: no Leader.

    Every training forward charges its FLOPs to :attr:`compute` (forward + backward for what learns, one forward
    for what teaches).

    Args:
        teammates: the depth-gated networks.
        scaling_factors: the trained depths.
        leader_model: the Leader network (``None`` with ``leader="none"`` or ``"cached"``).
        leader: one of the modes above.
        layer_drop: in training mode, the top depth skips random blocks with this probability (LayerDrop-style).
        sampled_depths: in training mode, run the smallest and the top depth plus this many others drawn at random
            (the sandwich rule; ``None``: every depth).
        train_depths: in training mode, which depths run at each step (``TrainingConfig.train_depths``): ``"all"``
            (or the sandwich sample), ``"top"`` alone, one ``"sampled"`` depth, or ``"top+sampled"``.
        smallest_share: with ``"sampled"`` and ``"top+sampled"``, the share of the draws that go to the smallest
            trained depth (``TrainingConfig.smallest_share``).
        top_share: with ``"sampled"``, the share of the draws that go to the top depth (``TrainingConfig.top_share``).
        teammate_data: ``"streams"`` gives each Teammate its own images (the Leader runs on every Teammate's batch,
            and each Teammate's peer target is the other Teammate run on its batch); ``"shared"`` / ``"views"``
            one set of images.
    """

    def __init__(
        self,
        teammates: Sequence[AdaptiveDepth],
        scaling_factors: Sequence[float],
        leader_model: nn.Module | None = None,
        *,
        leader: str = "joint",
        layer_drop: float = 0.0,
        sampled_depths: int | None = None,
        train_depths: str = "all",
        teammate_data: str = "shared",
        smallest_share: float = 0.25,
        top_share: float = TOP_SHARE,
    ) -> None:
        super().__init__()
        if leader not in LEADER_MODES:
            raise ConfigError(f"leader must be one of {LEADER_MODES}, got {leader!r}")
        if train_depths not in TRAIN_DEPTHS:
            raise ConfigError(f"train_depths must be one of {TRAIN_DEPTHS}, got {train_depths!r}")
        if (leader_model is None) != (leader in ("none", "cached")):
            needs = "no Leader network" if leader in ("none", "cached") else "a Leader network"
            raise ConfigError(f"leader={leader!r} needs {needs}")
        self.teammates = nn.ModuleList(teammates)
        self.leader_model = leader_model
        self.leader = leader
        if leader_model is not None and leader != "joint":
            leader_model.requires_grad_(False).eval()
        # "ema": the averaged Teammate's BatchNorm layers, found once (the teacher runs with their batch statistics)
        self._teacher_norms = list(batchnorm_layers(leader_model.module).values()) if leader == "ema" else []
        # "cached": the teacher's outputs (a plain attribute: a buffer would be broadcast by DDP at every step)
        self.teacher_cache: TeacherCache | None = None
        self.scaling_factors = sorted(scaling_factors, reverse=True)
        self.layer_drop = layer_drop
        self.sampled_depths = sampled_depths
        self.train_depths = train_depths
        self.smallest_share = smallest_share
        self.top_share = top_share
        self.teammate_data = teammate_data
        self.compute = ComputeMeter()
        example = self.teammates[0].example_input(1) if teammates else None
        counted = [*teammates, getattr(leader_model, "module", leader_model)]  # an EMA runs its averaged Teammate
        self._costs = {id(m): ForwardCost(m, example) for m in counted if m is not None}  # one counting pass each
        self._nested: list[float] | None = None

    def train(self, mode: bool = True) -> CooperativeModel:
        """Train mode for the Teammates (and a joint Leader); any other Leader stays in eval mode."""
        super().train(mode)
        if self.leader_model is not None and self.leader != "joint":
            self.leader_model.eval()
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

    # ------------------------------------------------------------------ which depths run
    @property
    def nested(self) -> list[float]:
        """Every deployable depth from the smallest trained one to the top one (:func:`nested_depths`)."""
        if self._nested is None:
            depths = self.scaling_factors
            self._nested = nested_depths(self.teammates[0], depths[-1], depths[0], named=depths)
        return self._nested

    @staticmethod
    def _draw(pool: Sequence[float], favoured: Sequence[tuple[float, float]]) -> float:
        """One depth of ``pool``: each favoured ``(depth, share)`` with its share, the rest uniformly."""
        chosen = dict(favoured)
        rest = [s for s in pool if s not in chosen]
        weights = list(chosen.values())
        if rest:
            weights += [max(0.0, 1.0 - sum(weights)) / len(rest)] * len(rest)
        choices = [*chosen, *rest]
        if not sum(weights) > 0:
            raise ConfigError(
                f"no depth of {list(pool)} can be drawn: smallest_share and top_share are both 0 and there is no "
                "depth between them; give one of them a share"
            )
        return choices[int(torch.multinomial(torch.tensor(weights), 1))]

    def depths_to_run(self) -> list[float]:
        """This step's depths, largest first (in eval mode: every trained depth).

        ``"all"``: every trained depth, or the sandwich sample (the smallest, the top, ``sampled_depths`` others);
        ``"top"``: the top depth alone; ``"sampled"``: one nested depth, the smallest drawn with probability
        ``smallest_share``, the top with ``top_share``, the others uniformly; ``"top+sampled"``: the top depth and
        one nested depth below it (the smallest with probability ``smallest_share``). Draws come from torch's random
        number generator: seeded, checkpointed, the same on every process.
        """
        depths = self.scaling_factors
        if not self.training:
            return list(depths)
        top, smallest = depths[0], depths[-1]
        if self.train_depths == "top":
            return [top]
        if self.train_depths == "sampled":
            favoured = [(smallest, self.smallest_share), (top, self.top_share)] if smallest != top else [(top, 1.0)]
            return [self._draw(self.nested, favoured)]
        if self.train_depths == "top+sampled":
            below = [s for s in self.nested if s < top]
            return [top, self._draw(below, [(smallest, self.smallest_share)])] if below else [top]
        k = self.sampled_depths
        if k is None or len(depths) <= k + 2:
            return list(depths)
        middle = depths[1:-1]
        picked = [middle[i] for i in torch.randperm(len(middle))[:k].tolist()]
        return sorted({top, smallest, *picked}, reverse=True)

    # ------------------------------------------------------------------ compute
    def _charge(self, module: nn.Module, images: int, *, backward: bool) -> None:
        """Charge one forward of ``module`` at its current depth over ``images`` images (in training only)."""
        if self.training:
            self.compute.add(self._costs[id(module)](), images, backward=backward)

    def expected_step_flops(self, images: int, *, teaching_share: float = 1.0, draws: int = 1000) -> float:
        """The FLOPs one training step is expected to charge, for ``images`` images per Teammate, running nothing.

        The step's depths are drawn ``draws`` times (with torch's random state put back afterwards) and priced with
        each player's :class:`~adaptive_depth.training.compute.ForwardCost`, as :meth:`forward` would charge them.

        Args:
            images: the batch of one Teammate on this process.
            teaching_share: the fraction of steps in which a Leader that only teaches runs (after ``distill_start``).
            draws: samples of the random depths.
        """
        flops = 0.0
        with preserved(self, train=True), torch.random.fork_rng(devices=[]):
            for _ in range(draws):
                depths = self.depths_to_run()
                for teammate in self.teammates:
                    with preserved(teammate):
                        for s in depths:
                            self._set_depth(teammate, s)
                            flops += BACKWARD_FACTOR * self._costs[id(teammate)]()
        flops = flops / draws * images
        views = len(self.teammates) if self.teammate_data == "streams" else 1
        if self.teammate_data == "streams":  # each Teammate's peer runs without gradients on its batch
            flops += sum(self._costs[id(t)].full for t in self.teammates) * images
        if self.leader == "joint":
            flops += BACKWARD_FACTOR * self._costs[id(self.leader_model)].full * images * views
        elif self.leader in ("frozen", "ema"):
            teacher = getattr(self.leader_model, "module", self.leader_model)
            flops += self._costs[id(teacher)].full * images * views * teaching_share
        return flops

    # ------------------------------------------------------------------ the Leader
    def leader_logits(self, pixel_values: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor | None:
        """The Leader's logits for a batch, by whichever route its mode takes (``None`` without a Leader).

        Args:
            pixel_values: the batch.
            keys: with ``leader="cached"``, each image's cache key (image index and augmentation draw), as the
                training loader yields it.
        """
        if self.leader == "none":
            return None
        if self.leader == "cached":
            if self.teacher_cache is None:
                raise ConfigError("the teacher's outputs are not cached yet: the trainer makes them before training")
            if keys is None:
                raise ConfigError(
                    "cached teacher outputs need each image's cache key: build the loaders with "
                    "make_loaders(..., teacher_draws=K) so that the training batches are (images, labels, keys)"
                )
            return self.teacher_cache.logits(keys)
        model = self.leader_model
        images = len(pixel_values)
        if self.leader == "joint":
            self._charge(model, images, backward=True)
            return logits_of(model(pixel_values))
        with torch.no_grad():
            if self.leader == "ema":
                ema = model.module  # type: ignore[union-attr]  # timm's ModelEmaV3 holds the averaged Teammate
                with preserved(ema), batch_statistics(self._teacher_norms):
                    ema.set_scaling_factor(self.scaling_factors[0])
                    self._charge(ema, images, backward=False)
                    return logits_of(ema(pixel_values))
            self._charge(model, images, backward=False)
            return logits_of(model(pixel_values))

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """``leader="ema"``: move the average towards the first Teammate (timm's ``ModelEmaV3.update``)."""
        if self.leader == "ema":
            self.leader_model.update(self.teammates[0], step=step)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ the Teammates
    def _set_depth(self, teammate: AdaptiveDepth, s: float) -> None:
        """Switch a Teammate to depth ``s`` of this step (a random depth at the top one with ``layer_drop``)."""
        if s == self.scaling_factors[0] and self.layer_drop > 0 and self.training:
            teammate.drop_blocks(self.layer_drop)
        else:
            teammate.set_scaling_factor(s)

    def _run(self, teammate: AdaptiveDepth, x: torch.Tensor, depths: Sequence[float]) -> dict[float, torch.Tensor]:
        """One Teammate's logits at every depth of this step (random depth at the top one, if asked)."""
        by_depth = {}
        with preserved(teammate):
            for s in depths:
                self._set_depth(teammate, s)
                self._charge(teammate, len(x), backward=True)
                by_depth[s] = logits_of(teammate(x))
        return by_depth

    @torch.no_grad()
    def _peer(self, teammate: AdaptiveDepth, x: torch.Tensor) -> torch.Tensor:
        """A Teammate's full-depth logits on another Teammate's batch: a target, so without gradients."""
        with preserved(teammate):
            teammate.set_scaling_factor(self.scaling_factors[0])
            self._charge(teammate, len(x), backward=False)
            return logits_of(teammate(x))

    def forward(
        self, pixel_values: torch.Tensor, keys: torch.Tensor | None = None, *, teach: bool = True
    ) -> CooperativeLogits:
        """Every player's logits on the batch.

        Args:
            pixel_values: ``[B, C, H, W]`` (every Teammate sees it), or ``[B, T, C, H, W]``: one view per Teammate
                (``TrainingConfig.teammate_data``: the same images under their own augmentation, or each
                Teammate's own images).
            keys: the images' cache keys (``[B]``), for cached teacher outputs.
            teach: ``False`` while distillation is off (before ``distill_start``): a Leader that only teaches
                (frozen, cached, EMA) is not run; a joint one still learns from the labels.
        """
        skip_leader = not teach and self.leader != "joint"
        n = len(self.teammates)
        if pixel_values.dim() == 5:
            if pixel_values.shape[1] != n:
                raise ConfigError(f"got {pixel_values.shape[1]} views per image for {n} Teammate(s)")
            views = list(pixel_values.unbind(1))
        else:
            views = [pixel_values] * n
        depths = self.depths_to_run()
        outputs = [self._run(teammate, x, depths) for teammate, x in zip(self.teammates, views)]
        if self.teammate_data != "streams" or n < 2:  # one set of images: one Leader pass, peers as they are
            return CooperativeLogits(outputs, None if skip_leader else self.leader_logits(views[0], keys))
        leader = None if self.leader == "none" or skip_leader else [self.leader_logits(x) for x in views]
        peers = [self._peer(self.teammates[1 - t], x) for t, x in enumerate(views)]
        return CooperativeLogits(outputs, leader, peers)  # type: ignore[arg-type]
