"""The cooperative objective (DESIGN.md section 4) as pure functions of logits, so each term can be checked by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainingConfig

__all__ = ["TEAMMATE_NAMES", "CooperativeLogits", "CooperativeLoss", "cooperative_loss", "kd_loss", "sfsl_weights"]

TEAMMATE_NAMES = ("A", "B")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, mean over the batch; teacher detached."""
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.detach().float() / t, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (t * t)


def sfsl_weights(scaling_factors: Sequence[float], gamma: float) -> dict[float, float]:
    """Scaling-factor-sensitive weights ``w(s) = s^-gamma`` over the depths below the top one, normalised to mean 1."""
    top = max(scaling_factors, default=1.0)
    subs = [float(s) for s in scaling_factors if s < top]
    if not subs:
        return {}
    raw = {s: s ** (-gamma) for s in subs}
    mean = sum(raw.values()) / len(raw)
    return {s: w / mean for s, w in raw.items()}


@dataclass
class CooperativeLogits:
    """What one cooperative forward pass produces.

    Args:
        teammates: per teammate, its logits at every trained scaling factor (``{1.0: z(1), 0.5: z(0.5)...}``).
        leader: the Leader's logits (``None`` without a Leader); a frozen Leader's carry no gradient.
    """

    teammates: list[dict[float, torch.Tensor]]
    leader: torch.Tensor | None = None


@dataclass
class CooperativeLoss:
    """The total loss and its parts: ``total == sum(weights[k] * terms[k])``.

    Args:
        total: the scalar to back-propagate.
        terms: each term's unweighted value, named ``"leader/ce"``, ``"A/s=1/guided"``, ``"B/s=0.5/self"``...
        weights: each term's weight in ``total`` (SFSL, warm-up ramp and normalisation included).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]


def _normalised(raw: dict[str, float]) -> dict[str, float]:
    """Weights scaled to sum to one (a weighted mean of the terms); zero weights dropped."""
    raw = {k: v for k, v in raw.items() if v > 0}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def cooperative_loss(
    logits: CooperativeLogits, labels: torch.Tensor, config: TrainingConfig, ramp: float = 1.0
) -> CooperativeLoss:
    """The cooperative objective of one batch.

    Args:
        logits: the Leader's and the teammates' logits.
        labels: class indices.
        config: weights, temperature, switches.
        ramp: warm-up progress in [0, 1]: distillation terms are weighted by it, and the sub-networks' labels by
            ``1 - ramp`` in their place (see :class:`TrainingConfig`).
    """
    tau, r = config.temperature, min(max(float(ramp), 0.0), 1.0)
    depths = config.scaling_factors
    sfsl = sfsl_weights(depths, config.sfsl_gamma)
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}

    def ce(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.float(), labels, label_smoothing=config.label_smoothing)

    def add(prefix: str, raw: dict[str, float], values: dict[str, object], scale: float) -> None:
        for name, w in _normalised(raw).items():
            key = f"{prefix}/{name}"
            terms[key] = values[name]()  # type: ignore[operator]
            weights[key] = w * scale

    top = config.top_scaling_factor  # 1.0: the full network
    fulls = [z[top] for z in logits.teammates]
    if logits.leader is not None and config.leader == "joint":
        share = config.leader_share_back * r
        add(
            "leader",
            {"ce": 1.0, "share_back": share if len(fulls) else 0.0},
            {
                "ce": lambda: ce(logits.leader),
                "share_back": lambda: kd_loss(logits.leader, torch.stack(fulls).mean(0), tau),
            },
            1.0,
        )

    guided = logits.leader is not None and config.leader != "none"
    for t, by_depth in enumerate(logits.teammates):
        name = TEAMMATE_NAMES[t]
        other = fulls[1 - t] if len(fulls) > 1 else None
        full = by_depth[top]
        per_depth = 1.0 / len(by_depth)  # the depths run this step: all of S, or a sandwich sample of it
        add(
            f"{name}/s={top:g}",
            {
                "ce": 1.0,
                "guided": config.lambda_guided * r if guided else 0.0,
                "interactive": config.lambda_interactive * r if other is not None else 0.0,
            },
            {
                "ce": lambda full=full: ce(full),
                "guided": lambda full=full: kd_loss(full, logits.leader, tau),
                "interactive": lambda full=full, other=other: kd_loss(full, other, tau),
            },
            per_depth,
        )
        distils = config.self_distillation or other is not None or (guided and config.lambda_guided_sub > 0)
        for s in sorted((s for s in by_depth if s < top), reverse=True):
            z = by_depth[s]
            add(
                f"{name}/s={s:g}",
                {
                    "self": r if config.self_distillation else 0.0,
                    "interactive": config.lambda_interactive * r if other is not None else 0.0,
                    "guided": config.lambda_guided_sub * r if guided else 0.0,
                    "ce": config.sub_ce_weight + ((1.0 - r) if distils else 0.0),
                },
                {
                    "self": lambda z=z, full=full: kd_loss(z, full, tau),
                    "interactive": lambda z=z, other=other: kd_loss(z, other, tau),
                    "guided": lambda z=z: kd_loss(z, logits.leader, tau),
                    "ce": lambda z=z: ce(z),
                },
                sfsl[s] * per_depth,
            )
    total = sum((weights[k] * terms[k] for k in terms), torch.zeros((), device=labels.device))
    return CooperativeLoss(total=total, terms=terms, weights=weights)
