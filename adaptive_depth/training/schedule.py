"""How long a run is and when its phases begin: steps from epochs, ``max_steps`` or a compute budget, the
learning-rate warm-up, and the ramp of the distillation terms."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..tuner import DepthTuner
from .compute import ForwardCost, plain_epoch_flops
from .config import TrainingConfig
from .players import CooperativeModel

__all__ = ["RunLength", "budget_steps", "distillation_ramp"]


def budget_steps(
    config: TrainingConfig,
    players: CooperativeModel,
    images: int,
    *,
    processes: int = 1,
    cache_teacher: nn.Module | None = None,
) -> int:
    """The optimizer steps ``config.compute_budget`` buys this recipe.

    The budget is ``compute_budget`` epochs of plain fine-tuning over ``images`` training images; a cached Leader's
    making is paid from it first; each step is priced at its expected cost
    (:meth:`CooperativeModel.expected_step_flops`) on every process, with gradient accumulation.

    Raises:
        ConfigError: no budget is set, or it buys no step.
    """
    if config.compute_budget is None:
        raise ConfigError("budget_steps() needs config.compute_budget")
    teammate: DepthTuner = players.teammates[0]  # type: ignore[assignment]
    budget = config.compute_budget * plain_epoch_flops(teammate, images)
    if cache_teacher is not None:
        budget -= images * config.leader_cache_draws * ForwardCost(cache_teacher, teammate.example_input(1)).full
    per_step = players.expected_step_flops(config.batch_size, teaching_share=1.0 - config.distill_start)
    per_step *= config.gradient_accumulation_steps * processes
    if budget < per_step:
        raise ConfigError(
            f"compute_budget={config.compute_budget} buys no training step of this recipe (one step costs "
            f"{per_step / 1e9:.3g} GFLOPs, the budget leaves {max(budget, 0) / 1e9:.3g}); give a larger budget"
        )
    return round(budget / per_step)


@dataclass(frozen=True)
class RunLength:
    """Optimizer steps of a run: in all, per epoch, in the learning-rate warm-up; and its epochs (the last partial)."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int

    @classmethod
    def of(cls, config: TrainingConfig, steps_per_epoch: int, budget: int | None = None) -> RunLength:
        """The length ``config`` asks for: ``budget`` steps (from :func:`budget_steps`), else ``max_steps``, else
        ``epochs``; the warm-up as ``warmup_ratio`` of it, else ``warmup_epochs``."""
        total = budget or config.max_steps or steps_per_epoch * config.epochs
        if config.warmup_ratio > 0:
            warmup = round(total * config.warmup_ratio)
        else:
            warmup = round(steps_per_epoch * config.warmup_epochs)
        return cls(total, steps_per_epoch, warmup)

    @property
    def epochs(self) -> int:
        """Epochs begun, the last one possibly partial."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


def distillation_ramp(config: TrainingConfig, run: RunLength, epochs_done: float) -> float:
    """The weight of the distillation terms after ``epochs_done`` (fractional) epochs, in [0, 1].

    0 for the first ``distill_start`` of the run, then a linear ramp over ``distill_warmup_ratio`` of the run (when
    set) or ``distill_warmup_epochs``.
    """
    length = run.total_steps / run.steps_per_epoch  # the run's length in epochs
    since = epochs_done - config.distill_start * length
    ramp = config.distill_warmup_ratio * length if config.distill_warmup_ratio > 0 else config.distill_warmup_epochs
    if since < 0:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, since / ramp)
