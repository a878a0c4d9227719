"""Accuracy, FLOPs and latency of every player at every trained depth."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError
from ..flops import count_flops
from ..latency import measure_latency_ms
from ..model import AdaptiveDepth
from ..report import DepthResult, TrainingReport
from ..state import preserved
from .players import logits_of

__all__ = ["TrainingResult", "evaluate_accuracy", "measure_costs", "score_players"]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    scaling_factors: Sequence[float],
    *,
    num_classes: int,
    top5: bool | None = None,
    desc: str = "eval",
) -> dict[float, tuple[float, float | None]]:
    """Top-1 and top-5 accuracy (percent) at each depth, over every process's share of ``loader``.

    ``model`` is an :class:`AdaptiveDepth` (possibly wrapped by ``accelerator.prepare``) or a plain model
    (evaluated at full depth only). Predictions are gathered with ``gather_for_metrics``, so the duplicate
    samples that pad the last batch across processes are not counted twice. ``top5`` defaults to
    ``num_classes > 5``; without it the second accuracy is ``None``.
    """
    top5 = num_classes > 5 if top5 is None else top5
    inner = accelerator.unwrap_model(model)
    adaptive = isinstance(inner, AdaptiveDepth)
    k = min(5, num_classes) if top5 else 1
    results = {}
    with preserved(model, train=False):
        for s in scaling_factors if adaptive else [1.0]:
            if adaptive:
                inner.set_scaling_factor(s)
            correct1 = correct5 = total = 0
            bar = tqdm(loader, desc=f"{desc} s={s:g}", leave=False, disable=not accelerator.is_local_main_process)
            for images, labels in bar:
                with accelerator.autocast():
                    top = logits_of(model(images)).topk(k, dim=-1).indices
                top, labels = accelerator.gather_for_metrics((top, labels))
                if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
                    found = sorted(set(labels.tolist()))[:8]
                    raise DataError(
                        f"evaluation labels must be classes 0..{num_classes - 1}, got {found} (-1 marks an image "
                        "without a label): every such image would count as an error. Evaluate "
                        "on labeled images of the training classes (load_image_classification_data does both)"
                    )
                hits = top == labels[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                total += len(labels)
            if total == 0:
                raise ValueError("the evaluation data is empty")
            results[s] = (100.0 * correct1 / total, 100.0 * correct5 / total if top5 else None)
    return results


def measure_costs(
    model: nn.Module, example: torch.Tensor, scaling_factors: Sequence[float], *, latency: bool = True
) -> dict[float, tuple[float, float | None]]:
    """``{s: (GFLOPs, latency ms or None)}`` of one image at each depth (full depth only for a plain model).

    An adaptive model's latencies are its :meth:`~adaptive_depth.AdaptiveDepth.profile` (every depth timed in
    interleaved rounds, so the depths are compared under the same load), which the model keeps: a model saved after
    evaluation carries the profile of the device it was evaluated on.
    """
    adaptive = isinstance(model, AdaptiveDepth)
    depths = list(scaling_factors) if adaptive else [1.0]
    latencies: dict[float, float] = {}
    out: dict[float, tuple[float, float | None]] = {}
    with preserved(model, train=False):
        if latency:
            latencies = (
                model.profile(example, scaling_factors=depths)
                if adaptive
                else {1.0: measure_latency_ms(model, example)}
            )
        for s in depths:
            if adaptive:
                model.set_scaling_factor(s)
            out[s] = (count_flops(model, example) / 1e9, latencies.get(s))
    return out


@dataclass
class TrainingResult:
    """What a cooperative run produced: the deployed Teammate and the report saved with it.

    Args:
        model: the deployed teammate (the better one by mean top-1 over the trained depths).
        report: every player at every depth (accuracy, FLOPs, latency), the loss per epoch, the settings.
    """

    model: AdaptiveDepth
    report: TrainingReport

    @property
    def deployed(self) -> str:
        """The deployed Teammate's name, ``"A"`` or ``"B"``."""
        return self.report.deployed

    @property
    def results(self) -> list[DepthResult]:
        """Every player at every depth."""
        return self.report.results

    @property
    def history(self) -> list[float]:
        """The mean loss of every epoch."""
        return self.report.loss_per_epoch

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.report.steps

    def table(self) -> str:
        """The per-depth table as Markdown, the one the model card shows."""
        return self.report.table()


def score_players(
    players: Sequence[tuple[str, nn.Module]],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    depths: Sequence[float],
    *,
    num_classes: int,
    top5: bool | None,
    latency: bool,
    trained_norms: dict[str, dict[float, tuple[float, float | None]]],
) -> list[DepthResult]:
    """Accuracy, FLOPs and latency of named players: the Teammates at every depth, the Leader at the top one.

    Args:
        players: ``(name, model)``; the one named ``"leader"`` teaches at full depth and is scored there.
        loader, accelerator, num_classes, top5: as :func:`evaluate_accuracy`.
        depths: the depths to score the Teammates at.
        latency: also measure latency (FLOPs are always counted).
        trained_norms: per Teammate, the accuracy each depth had with the statistics of training.
    """
    results: list[DepthResult] = []
    example = None
    for name, player in players:
        at = depths if name != "leader" else list(depths)[-1:]
        scores = evaluate_accuracy(player, loader, accelerator, at, num_classes=num_classes, top5=top5, desc=name)
        if example is None and isinstance(player, AdaptiveDepth):
            example = player.example_input(1)  # costs do not depend on the pixels
        cost = measure_costs(player, example, list(scores), latency=latency)
        for s, (top1, top5_) in scores.items():
            gflops, ms = cost.get(s, (None, None))
            trained = trained_norms.get(name, {}).get(s, (None,))[0]
            results.append(DepthResult(name, s, top1, top5_, trained, gflops, ms))
    return results
