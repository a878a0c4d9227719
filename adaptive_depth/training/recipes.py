"""Named training recipes: the configurations docs/benchmarks.md compares, one flag each (``--recipe``).

A recipe is a set of :class:`TrainingConfig` field values. It sets defaults, not final values: a flag given next to
``--recipe`` still wins. Every recipe trains, recalibrates and evaluates the same ``scaling_factors``, so the model
it saves is switchable at every one of them whatever the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from .config import TrainingConfig

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "recipe_config"]


@dataclass(frozen=True)
class Recipe:
    """A named configuration: what it is for, and the TrainingConfig fields it sets."""

    summary: str
    overrides: dict[str, Any]


DEFAULT_RECIPE = "cooperative"
RECIPES: dict[str, Recipe] = {
    "cooperative": Recipe("a joint Leader and one Teammate trained at every depth (the default)", {}),
    "paper": Recipe(
        "the paper's configuration: a joint Leader and two Teammates that also learn from each other",
        {"interactive": True},
    ),
    "sandwich": Recipe(
        "the default with the sandwich rule: the smallest, the top and one random depth per step",
        {"sampled_depths": 1},
    ),
    "frozen-sandwich": Recipe(
        "for a model already fine-tuned on the task: it teaches itself as a fixed Leader (or --leader-model does), "
        "with the sandwich rule; as accurate as the default at 0.63x its time (R2)",
        {"leader": "frozen", "sampled_depths": 1},
    ),
    "random-depth": Recipe(
        "one network, LayerDrop-style: each step skips a random half of the blocks (cheapest per epoch)",
        {"train_depths": "top", "layer_drop": 0.5, "leader": "none", "interactive": False},
    ),
    "plain": Recipe(
        "one network at full depth on the labels only, cut to each depth afterwards (a baseline)",
        {"train_depths": "top", "leader": "none", "interactive": False},
    ),
    "random-depth-nested": Recipe(
        "one network, one nested depth a step (as deployed; the smallest and the full drawn more often)",
        {"train_depths": "sampled", "leader": "none", "interactive": False},
    ),
    "distill": Recipe(
        "one nested depth a step, taught by a fixed teacher run without gradients on the same batch: the model "
        "itself when it is already fine-tuned on the task, or --leader-model",
        {"train_depths": "sampled", "leader": "frozen", "interactive": False},
    ),
    "distill-cached": Recipe(
        "as distill, the teacher's outputs made once for 4 augmentations of each image: no teacher pass in training",
        {"train_depths": "sampled", "leader": "cached", "interactive": False},
    ),
    "distill-ema": Recipe(
        "one nested depth a step, taught from a quarter of training on by the moving average of itself at full depth",
        {"train_depths": "sampled", "leader": "ema", "interactive": False, "distill_start": 0.25},
    ),
    "cooperative-sampled": Recipe(
        "the default with the full depth and one sampled sub-network a step instead of every depth",
        {"train_depths": "top+sampled"},
    ),
}


def recipe_config(name: str, **values: Any) -> TrainingConfig:
    """The TrainingConfig of recipe ``name``, with ``values`` (any TrainingConfig field) taking precedence.

    Raises:
        ConfigError: an unknown recipe name.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    known = {f.name for f in fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown training config fields {unknown}; known: {sorted(known)}")
    return TrainingConfig(**{**RECIPES[name].overrides, **values})
