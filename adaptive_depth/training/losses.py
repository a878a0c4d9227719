"""The cooperative objective (docs/training.md) as pure functions of logits, so each term can be checked by hand."""

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


def sfsl_weights(scaling_factors: Sequence[float], gamma: float, also: Sequence[float] = ()) -> dict[float, float]:
    """Scaling-factor-sensitive weights ``w(s) = s^-gamma`` over the depths below the top one, normalised to mean 1.

    Args:
        scaling_factors: the trained depths (their weights below the top average 1).
        gamma: the SFSL exponent.
        also: other depths below the top (drawn at a training step) weighted by the same rule and normaliser.
    """
    top = max(scaling_factors, default=1.0)
    subs = [float(s) for s in scaling_factors if s < top]
    if not subs:
        return {}
    mean = sum(s ** (-gamma) for s in subs) / len(subs)
    return {s: s ** (-gamma) / mean for s in [*subs, *(float(s) for s in also if s < top)]}


@dataclass
class CooperativeLogits:
    """What one cooperative forward pass produces.

    Args:
        teammates: per teammate, its logits at every depth it ran on its batch (``{1.0: z(1), 0.5: z(0.5)...}``).
        leader: the Leader's logits (``None`` without a Leader; a frozen Leader's carry no gradient): one tensor
            when the Teammates share their images, or one per Teammate, on that Teammate's batch.
        peers: per teammate, the other Teammate's full-depth logits on its batch, when the Teammates see different
            images (``None``: the other Teammate's own full-depth logits are on the same images).
    """

    teammates: list[dict[float, torch.Tensor]]
    leader: torch.Tensor | list[torch.Tensor] | None = None
    peers: list[torch.Tensor] | None = None

    def leader_for(self, teammate: int) -> torch.Tensor | None:
        """The Leader's logits on ``teammate``'s images."""
        return self.leader[teammate] if isinstance(self.leader, list) else self.leader

    def peer_for(self, teammate: int, top: float) -> torch.Tensor | None:
        """The other Teammate's full-depth logits on ``teammate``'s images (``None`` with one Teammate)."""
        if len(self.teammates) < 2:
            return None
        return self.peers[teammate] if self.peers is not None else self.teammates[1 - teammate][top]


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
    ran = {s for by_depth in logits.teammates for s in by_depth}
    sfsl = sfsl_weights(config.scaling_factors, config.sfsl_gamma, also=sorted(ran))
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}

    def labels_of(t: int) -> torch.Tensor:  # [B, streams] when each Teammate has its own batch
        return labels[:, t] if labels.dim() == 2 else labels

    def ce(z: torch.Tensor, t: int = 0) -> torch.Tensor:
        return F.cross_entropy(z.float(), labels_of(t), label_smoothing=config.label_smoothing)

    def add(prefix: str, raw: dict[str, float], values: dict[str, object], scale: float) -> None:
        for name, w in _normalised(raw).items():
            key = f"{prefix}/{name}"
            terms[key] = values[name]()  # type: ignore[operator]
            weights[key] = w * scale

    top = config.top_scaling_factor  # 1.0: the full network
    n = len(logits.teammates)
    if logits.leader is not None and config.leader == "joint":
        # The Leader learns from the labels of each batch it saw, and (share-back) from the Teammates' mean there.
        batches = list(range(n)) if isinstance(logits.leader, list) else [0]

        def teammates_on(t: int) -> torch.Tensor:
            if not isinstance(logits.leader, list):
                return torch.stack([z[top] for z in logits.teammates]).mean(0)
            peer = logits.peer_for(t, top)  # on Teammate t's batch: t itself and its peer there
            return torch.stack([logits.teammates[t][top]] + ([peer] if peer is not None else [])).mean(0)

        add(
            "leader",
            {"ce": 1.0, "share_back": config.leader_share_back * r if n and top in ran else 0.0},
            {
                "ce": lambda: torch.stack([ce(logits.leader_for(t), t) for t in batches]).mean(),
                "share_back": lambda: torch.stack(
                    [kd_loss(logits.leader_for(t), teammates_on(t), tau) for t in batches]
                ).mean(),
            },
            1.0,
        )

    guided = logits.leader is not None and config.leader != "none"
    for t, by_depth in enumerate(logits.teammates):
        name = TEAMMATE_NAMES[t]
        leader = logits.leader_for(t)
        per_depth = 1.0 / len(by_depth)  # the depths run this step: all of S, or a sample of them
        if top not in by_depth:  # one depth drawn below the top: a student of the labels and the Leader
            for s, z in by_depth.items():
                add(
                    f"{name}/s={s:g}",
                    {"ce": 1.0, "guided": config.lambda_guided * r if guided else 0.0},
                    {"ce": lambda z=z, t=t: ce(z, t), "guided": lambda z=z, leader=leader: kd_loss(z, leader, tau)},
                    per_depth,
                )
            continue
        other = logits.peer_for(t, top)
        full = by_depth[top]
        add(
            f"{name}/s={top:g}",
            {
                "ce": 1.0,
                "guided": config.lambda_guided * r if guided else 0.0,
                "interactive": config.lambda_interactive * r if other is not None else 0.0,
            },
            {
                "ce": lambda full=full, t=t: ce(full, t),
                "guided": lambda full=full, leader=leader: kd_loss(full, leader, tau),
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
                    "guided": lambda z=z, leader=leader: kd_loss(z, leader, tau),
                    "ce": lambda z=z, t=t: ce(z, t),
                },
                sfsl[s] * per_depth,
            )
    total = sum((weights[k] * terms[k] for k in terms), torch.zeros((), device=labels.device))
    return CooperativeLoss(total=total, terms=terms, weights=weights)
