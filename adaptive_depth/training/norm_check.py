"""Per-depth BatchNorm statistics that are never worse than the training ones, checked on held-out training images.

Recalibration (``DepthTuner.recalibrate_norms``) estimates each depth's statistics afresh; it helps most where
training never ran that depth, but it can lose to the statistics of training at a depth that training ran often
(its running averages, updated at every step, already fit it) or when few calibration images are available. So each
depth is checked on a slice of the training split that training did not see (``TrainingConfig.norm_check_fraction``)
and keeps whichever set classifies it better; a tie keeps the recalibrated set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from accelerate import Accelerator

from ..model import AdaptiveDepth
from ..state import preserved
from .players import logits_of

__all__ = ["RECALIBRATED", "TRAINING", "keep_better_norms"]

RECALIBRATED, TRAINING = "recalibrated", "training"


@torch.no_grad()
def _correct(
    model: AdaptiveDepth, loader: Iterable[Sequence[torch.Tensor]], accelerator: Accelerator, s: float
) -> tuple[int, int]:
    """Correct predictions at depth ``s`` with its recalibrated statistics and with those of training."""
    norms = model.depth_norms
    hits = [0, 0]
    for images, labels, *_ in loader:
        for i, training in enumerate((False, True)):
            model.set_scaling_factor(s)
            if training and norms is not None:
                norms.use(None)  # the same blocks, the statistics of training
            with accelerator.autocast():
                predicted = logits_of(model(images)).argmax(-1)
            predicted, gathered = accelerator.gather_for_metrics((predicted, labels))
            hits[i] += int((predicted == gathered).sum())
    return hits[0], hits[1]


def keep_better_norms(
    model: AdaptiveDepth, loader: Iterable[Sequence[torch.Tensor]], accelerator: Accelerator, depths: Sequence[float]
) -> dict[float, str]:
    """At each recalibrated depth, keep the statistics (recalibrated or of training) more accurate on ``loader``.

    Where training's win, they replace that depth's recalibrated set (a copy, saved with the model like any other),
    so ``set_scaling_factor`` and the saved model use them.

    Args:
        model: a Teammate after :meth:`~adaptive_depth.tuner.DepthTuner.recalibrate_norms`.
        loader: held-out images of the training split, without augmentation.
        accelerator: gathers the predictions of every process.
        depths: the depths to check.

    Returns:
        For each depth, which statistics it keeps: :data:`RECALIBRATED` or :data:`TRAINING`.
    """
    norms = model.depth_norms
    if norms is None:
        return {}
    kept: dict[float, str] = {}
    done: dict[tuple[int, ...], str] = {}  # depths that run the same blocks share one set: check it once
    with preserved(model, train=False):
        for s in depths:
            key = tuple(model.depth_for(s))
            if key not in norms:
                continue
            if key not in done:
                recalibrated, training = _correct(model, loader, accelerator, s)
                done[key] = TRAINING if training > recalibrated else RECALIBRATED
                if done[key] == TRAINING:
                    model.set_scaling_factor(s)
                    norms.use(None)
                    norms.release()  # private copies of the statistics of training...
                    norms.capture(key)  # ...become this depth's set
            kept[s] = done[key]
    return kept
