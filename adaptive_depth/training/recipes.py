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

__all__ = ["AUTO", "AUTO_RULE", "COOPERATIVE", "DEFAULT_RECIPE", "RECIPES", "Recipe", "pick_recipe", "recipe_config"]


@dataclass(frozen=True)
class Recipe:
    """A named configuration: what it is for, and the TrainingConfig fields it sets."""

    summary: str
    overrides: dict[str, Any]


COOPERATIVE: dict[str, Any] = {"train_depths": "all", "leader": "joint", "interactive": False}
"""The cooperative method's fields: a joint Leader, one Teammate, every trained depth at every step."""

NESTED: dict[str, Any] = {"train_depths": "sampled", "leader": "none", "interactive": False}
"""The one-pass nested recipes' fields: one network, one nested depth a step (the recipes add shares or a teacher)."""

MEASURED_SHARE = 0.25
"""The smallest depth's share of the sampled steps the one-pass teacher recipes were measured with (the earlier
default): they keep it, since the budget curves that moved the default to a half did not measure them there."""

DEFAULT_RECIPE = "random-depth-nested"
"""The recipe TrainingConfig() is: on top at s <= 0.5 of the budget curves in both regimes (docs/benchmarks.md)."""

RECIPES: dict[str, Recipe] = {
    "random-depth-nested": Recipe(
        "one network, one nested depth a step, as deployed (the smallest drawn half the time, the full a quarter): "
        "the default",
        {**NESTED, "smallest_share": 0.5},
    ),
    "nested-top-half": Recipe(
        "the default's one nested depth a step with the full depth in half the steps and the smallest in a quarter: "
        "for long runs (--recipe auto picks it from 64 epochs of compute)",
        {**NESTED, "smallest_share": 0.25, "top_share": 0.5},
    ),
    "cooperative": Recipe(
        "the cooperative method: a joint Leader and one Teammate trained at every depth each step (3-4x a step)",
        COOPERATIVE,
    ),
    "paper": Recipe(
        "the paper's configuration: a joint Leader and two Teammates that also learn from each other",
        {**COOPERATIVE, "interactive": True},
    ),
    "sandwich": Recipe(
        "the cooperative method with the sandwich rule: the smallest, the top and one random depth per step",
        {**COOPERATIVE, "sampled_depths": 1},
    ),
    "frozen-sandwich": Recipe(
        "for a model already fine-tuned on the task: it teaches itself as a fixed Leader (or --leader-model does), "
        "with the sandwich rule",
        {**COOPERATIVE, "leader": "frozen", "sampled_depths": 1},
    ),
    "random-depth": Recipe(
        "one network, LayerDrop-style: each step skips a random half of the blocks (arbitrary subsets, not nested)",
        {"train_depths": "top", "layer_drop": 0.5, "leader": "none", "interactive": False},
    ),
    "plain": Recipe(
        "one network at full depth on the labels only, cut to each depth afterwards (a baseline)",
        {"train_depths": "top", "leader": "none", "interactive": False},
    ),
    "distill": Recipe(
        "one nested depth a step, taught by a fixed teacher run without gradients on the same batch: the model "
        "itself when it is already fine-tuned on the task, or --leader-model",
        {**NESTED, "smallest_share": MEASURED_SHARE, "leader": "frozen"},
    ),
    "distill-cached": Recipe(
        "as distill, the teacher's outputs made once for 4 augmentations of each image: no teacher pass in training",
        {**NESTED, "smallest_share": MEASURED_SHARE, "leader": "cached"},
    ),
    "distill-ema": Recipe(
        "one nested depth a step, taught from a quarter of training on by the moving average of itself at full depth",
        {**NESTED, "smallest_share": MEASURED_SHARE, "leader": "ema", "distill_start": 0.25},
    ),
    "cooperative-sampled": Recipe(
        "the cooperative method with the full depth and one sampled sub-network a step instead of every depth",
        {**COOPERATIVE, "train_depths": "top+sampled", "smallest_share": MEASURED_SHARE},
    ),
}


AUTO = "auto"
"""``--recipe auto``: the recipe on top of the budget curves at the training budget given (:func:`pick_recipe`)."""

AUTO_RULE: tuple[tuple[float, str, str], ...] = (
    (
        64.0,
        "nested-top-half",
        "it was level with the default or above it at s <= 0.5, five seeds each: at 64 above it on digit-pairs "
        "(98.4% against 98.2% at s = 0.5), level on digits-cluttered (98.4% against 98.4%) and Fashion-MNIST "
        "photographs (87.9% against 87.7%); at 128 above it on Fashion-MNIST (88.2% against 87.6%) and digit-pairs "
        "(99.2% against 99.0%), level on digits-cluttered (98.5% against 98.7%)",
    ),
)
"""``(from_budget, recipe, why)``, by rising budget in epochs of plain fine-tuning compute; below the first (with none,
at every budget), :data:`DEFAULT_RECIPE`. ``why`` is what :func:`pick_recipe` prints: the measurement behind the
switch, whose tables, seeds and intervals are in docs/benchmarks.md (*Budget curves*, R1, *The full depth's share,
measured*). The curves cross once: where steps are few the default's half of the steps at the smallest depth pays
most; from 64 the blocks only the full depth runs are what it undertrains, so ``nested-top-half`` gives them half the
steps, and at 128 (the longest budget measured) it is level with the default or above it on every task and copy."""


def pick_recipe(
    name: str, *, epochs: float | None = None, compute_budget: float | None = None, max_steps: int | None = None
) -> tuple[str, str]:
    """The recipe to train with, and why: ``name`` itself, or for ``auto`` the recipe :data:`AUTO_RULE` gives at
    the training budget (``compute_budget`` if given, else ``epochs``: an epoch of either one-pass recipe costs at
    most a plain fine-tuning epoch). With ``max_steps`` (a length in steps, whose compute is unknown until the data
    is read) ``auto`` picks :data:`DEFAULT_RECIPE` and says so.

    Raises:
        ConfigError: an unknown recipe name.
    """
    if name != AUTO:
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted([*RECIPES, AUTO])}")
        return name, f"--recipe {name}"
    if max_steps is not None and compute_budget is None:
        return DEFAULT_RECIPE, (
            f"--recipe auto picked {DEFAULT_RECIPE}: max_steps = {max_steps} says nothing of the compute before the "
            "data is read, and this recipe is on top at the short budgets; to pick by budget give --epochs or "
            "--compute-budget (or name a recipe with --recipe)"
        )
    budget, unit = (compute_budget, "compute_budget") if compute_budget is not None else (epochs, "epochs")
    if budget is None:
        budget, unit = TrainingConfig.epochs, "epochs (the default)"
    picked, why = DEFAULT_RECIPE, "among the depth recipes it was on top or level at s <= 0.5 at every budget measured"
    if AUTO_RULE:
        why = f"below {AUTO_RULE[0][0]:g} epochs of compute it was on top or level at s <= 0.5 in the budget curves"
    for start, recipe, reason in AUTO_RULE:
        if budget >= start:
            picked, why = recipe, f"from {start:g} epochs of compute {reason}"
    return picked, f"--recipe auto picked {picked} for {unit} = {budget:g}: {why} (docs/benchmarks.md)"


def recipe_config(name: str, **values: Any) -> TrainingConfig:
    """The TrainingConfig of recipe ``name`` (``auto``: :func:`pick_recipe` by ``values``' budget), with ``values``
    (any TrainingConfig field) taking precedence.

    Raises:
        ConfigError: an unknown recipe name.
    """
    name, _ = pick_recipe(
        name,
        epochs=values.get("epochs"),
        compute_budget=values.get("compute_budget"),
        max_steps=values.get("max_steps"),
    )
    known = {f.name for f in fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown training config fields {unknown}; known: {sorted(known)}")
    return TrainingConfig(**{**RECIPES[name].overrides, **values})
