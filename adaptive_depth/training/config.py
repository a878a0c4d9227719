"""Every knob of training in one dataclass that round-trips through JSON and is saved with the model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SCALING_FACTORS
from ..errors import ConfigError
from ..policy import check_scaling_factor

__all__ = ["LEADER_MODES", "TEAMMATE_DATA", "TRAIN_DEPTHS", "TrainingConfig"]

LEADER_MODES = ("joint", "frozen", "cached", "ema", "none")
TEAMMATE_DATA = ("shared", "views", "streams")
TRAIN_DEPTHS = ("all", "top", "sampled", "top+sampled")
TOP_SHARE = 0.25  # default share of the sampled steps for the top depth (the smallest: ``smallest_share``)
# what a saved config without these keys was trained with (the defaults before the budget curves changed them)
EARLIER_DEFAULTS = {"leader": "joint", "train_depths": "all", "smallest_share": 0.25}
# transformers.get_scheduler names that need no extra arguments
LR_SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class TrainingConfig:
    """Training of an adaptive-depth model (docs/training.md).

    The defaults train one network at one nested depth a step, drawn from the depths it will be deployed at, on the
    labels (the ``random-depth-nested`` recipe: on top at s <= 0.5 of the budget curves, at about one pass a step).
    ``leader`` and ``train_depths="all"`` turn on the cooperative method (the ``cooperative`` recipe) whose objective
    follows.

    Objective (each network's loss is a weighted mean of its terms; the weights sum to one):

    - Leader ``L`` (``leader="joint"``): ``CE(z_L, y)``, plus ``leader_share_back * KD(z_L || mean(z_A(1), z_B(1)))``.
    - Teammate ``T`` at full depth: ``CE`` + ``lambda_guided * KD(z_T(1) || z_L)``
      + ``lambda_interactive * KD(z_T(1) || z_O(1))``.
    - Teammate ``T`` at each ``s < 1``: ``KD(z_T(s) || z_T(1))`` (self-distillation)
      + ``lambda_interactive * KD(z_T(s) || z_O(1))`` + ``lambda_guided_sub * KD(z_T(s) || z_L)``
      + ``sub_ce_weight * CE``.
    - A teammate's loss: ``[L_T(1) + sum_s w(s) L_T(s)] / |S|`` with SFSL weights ``w(s) = s^-gamma``, mean 1.
    - ``KD(p || q) = tau^2 KL(softmax(q / tau) || softmax(p / tau))``, teacher ``q`` detached.
    - Warm-up: for the first ``distill_warmup_epochs`` the distillation terms ramp linearly from 0 to their weight,
      and the sub-networks learn from the labels in their place (peers are random at the start).

    Args:
        scaling_factors: the depths trained together, each in (0, 1]; 1.0 is added unless ``full_depth=False``.
        full_depth: train the full network too. ``False`` trains exactly ``scaling_factors``, the largest of them
            in the full network's role (the "each depth trained alone" baseline: one depth, labels only).
        leader: ``"joint"`` (trained with the teammates), ``"frozen"`` (a fixed teacher run without gradients on
            each batch), ``"cached"`` (that fixed teacher's outputs made once before training, for
            ``leader_cache_draws`` augmentations of each image: no teacher pass during training), ``"ema"`` (an
            exponential moving average of the Teammate at full depth, ``ema_decay``: no teacher to train) or
            ``"none"`` (no teacher: the default).
        interactive: two Teammates that learn from each other, as in the paper (``--interactive``). Default
            ``False``: one Teammate, which was as accurate or more at every depth in the measurements, at about
            half the cost (docs/benchmarks.md).
        self_distillation: sub-networks learn from their own full network; ``False``: from the labels.
        sfsl_gamma: SFSL exponent; 0 weights every depth equally (SFSL off).
        temperature: distillation temperature ``tau``.
        lambda_guided, lambda_interactive: weights of the guided and interactive terms.
        lambda_guided_sub: weight of guided learning for the sub-networks too, ``KD(z_T(s) || z_L)`` (not in the
            paper, where only the full depth learns from the Leader; 0 turns it off).
        sub_ce_weight: weight of a cross-entropy term on each sub-network (0: none, as in the paper). Default 1:
            without labels the sub-networks only chase their peers, and from random initialisation the
            Teammates stalled at 64-68% top-1 on the digits data where the Leader reached 99% (docs/training.md).
        leader_share_back: weight of the teammates' full-depth mean distilled back into the Leader.
        distill_warmup_epochs: epochs over which the distillation terms ramp up (0: full weight from the start).
        distill_warmup_ratio: the same as a fraction of training (overrides ``distill_warmup_epochs`` when > 0).
        epochs, learning_rate, weight_decay, batch_size (per process), gradient_accumulation_steps,
        warmup_epochs, max_grad_norm: optimisation (AdamW from ``timm.optim.create_optimizer_v2``: no weight
            decay on norms, biases and the parameters timm models exempt).
        warmup_ratio: the learning-rate warm-up as a fraction of training (overrides ``warmup_epochs`` when > 0,
            as in transformers' ``TrainingArguments``).
        lr_scheduler_type: ``transformers.get_scheduler`` name: linear warm-up, then ``"cosine"`` decay (default),
            ``"linear"``, ``"constant_with_warmup"``...
        label_smoothing: of every cross-entropy term.
        seed: everything random (heads, data order, augmentation) derives from it.
        per_depth_norms: recalibrate BatchNorm statistics for every trained depth after training.
        norm_check_fraction: the share of the training split (at most 1,000 images) held out of training to check
            each depth's recalibrated statistics against those of training: a depth keeps whichever classifies it
            better, so per-depth statistics are never worse there (0: no check, recalibrated statistics kept).
        leader_cache_draws, leader_cache_top_k: ``leader="cached"``: augmentation draws fixed per image, and
            the teacher's logits kept per draw (fp16).
        leader_cache: ``leader="cached"``: a file to keep the cache in, reused by later runs on the same data with
            the same teacher (any seed, any budget); one made from anything else is refused.
        ema_decay: ``leader="ema"``: the average's decay per step (timm's ``ModelEmaV3``, with its warm-up).
        distill_start: the fraction of training before distillation begins (labels only until then; the ramp of
            ``distill_warmup_epochs`` follows). An EMA teacher needs time to become one.
        sampled_depths: the sandwich rule: at each step the teammates run at the smallest and the top depth plus
            this many depths drawn at random from the others (``None``: every trained depth, every step). A
            teammate's loss is then the SFSL-weighted mean over the depths run.
        layer_drop: LayerDrop-style random depth: at every step the top-depth forward of each teammate skips each
            gateable block with this probability (one block per stage always runs). 0: off. With
            ``scaling_factors=[1.0]`` and no peers it is the random-depth baseline. Under DDP the skipped blocks
            differ per step, so the trainer's own Accelerator finds unused parameters.
        train_depths: which depths run at each training step: ``"all"`` (every trained depth, or the sandwich
            sample), ``"top"`` (the top depth alone: plain fine-tuning, or random depth with ``layer_drop``),
            ``"sampled"`` (one depth per step, drawn from every deployable depth between the smallest trained one
            and the top: the smallest with probability ``smallest_share``, the top with ``top_share``, the others
            uniformly: one pass a step; the default) or ``"top+sampled"`` (the top depth and one drawn below it).
            Every ``scaling_factors`` depth gets its BatchNorm statistics, evaluation and a place in the card
            whatever ran.
        smallest_share: with ``train_depths="sampled"`` or ``"top+sampled"``, the share of the steps that train
            the smallest depth, at most ``1 - top_share``. Half (the default) put the smallest depth 2 to 4 points
            above a quarter at small training budgets, the larger depths level (docs/benchmarks.md).
        top_share: with ``train_depths="sampled"``, the share of the steps that train the top depth (a quarter by
            default; the blocks only the top depth runs train in these steps alone).
        max_steps: optimizer steps to train, instead of ``epochs`` (the schedule ends there; the last epoch may be
            partial).
        compute_budget: training compute in epochs of plain fine-tuning (full depth, forward and backward, over
            the training set), instead of ``epochs`` or ``max_steps``: the trainer runs as many steps as this recipe
            can afford at its expected cost per step, so that every recipe given the same budget spends the same
            FLOPs (``adaptive_depth.training.compute``; a cached Leader's making is paid from it).
        recalibration_batches: training batches read per depth by the recalibration.
        teammate_data: what the Teammates see at each step: ``"shared"`` (the same batch), ``"views"`` (the same
            images, each Teammate with its own augmentation draws) or ``"streams"`` (each Teammate its own images
            in its own order, with its own augmentation; the Leader and the peer then also run on each
            Teammate's batch, which costs a Leader pass and a no-gradient peer pass per Teammate).
    """

    scaling_factors: list[float] = field(
        default_factory=lambda: list(DEFAULT_SCALING_FACTORS), metadata={"help": "trained depths (1.0 is added)"}
    )
    full_depth: bool = field(default=True, metadata={"help": "train the full network too"})
    leader: str = field(default="none", metadata={"help": "the Leader", "choices": LEADER_MODES})
    interactive: bool = field(
        default=False, metadata={"help": "two Teammates that learn from each other (the paper's configuration)"}
    )
    self_distillation: bool = field(default=True, metadata={"help": "sub-networks learn from their full depth"})
    sfsl_gamma: float = field(default=1.0, metadata={"help": "SFSL exponent, w(s) = s^-gamma (0: off)"})
    temperature: float = field(default=2.0, metadata={"help": "distillation temperature tau"})
    lambda_guided: float = field(default=1.0, metadata={"help": "weight of KD from the Leader (full depth)"})
    lambda_interactive: float = field(default=1.0, metadata={"help": "weight of KD from the other Teammate"})
    lambda_guided_sub: float = field(default=0.0, metadata={"help": "weight of KD from the Leader, sub-networks"})
    sub_ce_weight: float = field(default=1.0, metadata={"help": "weight of the labels for the sub-networks"})
    leader_share_back: float = field(default=0.0, metadata={"help": "weight of the Teammates' KD into the Leader"})
    distill_warmup_epochs: float = field(default=1.0, metadata={"help": "epochs over which distillation ramps up"})
    distill_warmup_ratio: float = field(default=0.0, metadata={"help": "the same as a fraction of training"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases)"})
    batch_size: int = field(default=64, metadata={"help": "images per step and process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear learning-rate warm-up"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "the same as a fraction of training"})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers.get_scheduler name", "choices": LR_SCHEDULERS}
    )
    max_grad_norm: float | None = field(default=5.0, metadata={"help": "gradient clipping norm"})
    label_smoothing: float = field(default=0.0, metadata={"help": "of every cross-entropy"})
    seed: int = field(default=0, metadata={"help": "heads, data order, augmentation"})
    per_depth_norms: bool = field(default=True, metadata={"help": "recalibrate BatchNorm per depth after training"})
    recalibration_batches: int = field(default=20, metadata={"help": "batches per depth for the recalibration"})
    norm_check_fraction: float = field(
        default=0.1, metadata={"help": "training split held out to check per-depth statistics (0: no check)"}
    )
    leader_cache_draws: int = field(default=4, metadata={"help": "cached Leader: augmentation draws per image"})
    leader_cache_top_k: int = field(default=10, metadata={"help": "cached Leader: logits kept per draw"})
    leader_cache: str | None = field(default=None, metadata={"help": "cached Leader: file to keep the cache in"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA Leader: decay per step"})
    distill_start: float = field(default=0.0, metadata={"help": "fraction of training before distillation begins"})
    sampled_depths: int | None = field(default=None, metadata={"help": "sandwich rule: random depths per step"})
    layer_drop: float = field(default=0.0, metadata={"help": "random depth: probability to skip a block"})
    teammate_data: str = field(default="shared", metadata={"help": "what the Teammates see", "choices": TEAMMATE_DATA})
    train_depths: str = field(
        default="sampled",
        metadata={"help": "depths run per step: all, top, sampled, top+sampled", "choices": TRAIN_DEPTHS},
    )
    smallest_share: float = field(
        default=0.5, metadata={"help": "sampled depths: share of the steps that train the smallest depth"}
    )
    top_share: float = field(
        default=TOP_SHARE, metadata={"help": "sampled depths: share of the steps that train the top depth"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps instead of epochs"})
    compute_budget: float | None = field(
        default=None, metadata={"help": "training FLOPs, in plain fine-tuning epochs (instead of epochs)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.scaling_factors, list | tuple) or not self.scaling_factors:
            raise ConfigError(f"scaling_factors must be a list of values in (0, 1], got {self.scaling_factors!r}")
        full = {1.0} if self.full_depth else set()
        self.scaling_factors = sorted({check_scaling_factor(s) for s in self.scaling_factors} | full)
        if self.leader not in LEADER_MODES:
            raise ConfigError(f"leader must be one of {LEADER_MODES}, got {self.leader!r}")
        for name in (
            "sfsl_gamma",
            "lambda_guided",
            "lambda_interactive",
            "lambda_guided_sub",
            "sub_ce_weight",
            "leader_share_back",
        ):
            self._check_number(name, minimum=0.0)
        self._check_number("temperature", minimum=0.0, inclusive=False)
        self._check_number("distill_warmup_epochs", minimum=0.0)
        self._check_number("warmup_epochs", minimum=0.0)
        self._check_number("learning_rate", minimum=0.0, inclusive=False)
        self._check_number("weight_decay", minimum=0.0)
        self._check_number("label_smoothing", minimum=0.0)
        self._check_number("layer_drop", minimum=0.0)
        self._check_number("smallest_share", minimum=0.0)
        self._check_number("top_share", minimum=0.0)
        if self.smallest_share + self.top_share > 1.0:
            raise ConfigError(
                f"smallest_share + top_share must be at most 1 (they are shares of the sampled steps), got "
                f"smallest_share={self.smallest_share!r} and top_share={self.top_share!r}: lower one of them"
            )
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler_type must be one of {LR_SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.teammate_data not in TEAMMATE_DATA:
            raise ConfigError(f"teammate_data must be one of {TEAMMATE_DATA}, got {self.teammate_data!r}")
        if self.train_depths not in TRAIN_DEPTHS:
            raise ConfigError(f"train_depths must be one of {TRAIN_DEPTHS}, got {self.train_depths!r}")
        if self.teammate_data != "shared" and not self.interactive:
            raise ConfigError(
                f"teammate_data={self.teammate_data!r} gives each of two Teammates its own data: it needs "
                "interactive=True (--interactive)"
            )
        if self.leader == "cached" and self.teammate_data != "shared":
            raise ConfigError(
                f"leader='cached' looks the teacher's outputs up for one view per image; teammate_data="
                f"{self.teammate_data!r} gives each Teammate its own: use teammate_data='shared' or leader='frozen'"
            )
        for name in ("warmup_ratio", "distill_warmup_ratio", "norm_check_fraction"):
            self._check_number(name, minimum=0.0)
            if getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.compute_budget is not None:
            self._check_number("compute_budget", minimum=0.0, inclusive=False)
            if self.max_steps is not None:
                raise ConfigError("give compute_budget or max_steps, not both: each sets the length of training")
        if not 0 <= self.distill_start < 1 or not 0 < self.ema_decay < 1:
            raise ConfigError(
                f"distill_start must be in [0, 1) and ema_decay in (0, 1), got {self.distill_start!r} and "
                f"{self.ema_decay!r}"
            )
        if self.train_depths == "sampled" and self.interactive:
            raise ConfigError(
                "train_depths='sampled' (the default) runs one depth per step, which gives a second Teammate no "
                "full-depth peer to learn from: for two Teammates set train_depths='all' (--recipe paper sets it) or "
                "'top+sampled'"
            )
        if self.train_depths in ("sampled", "top+sampled") and (self.layer_drop > 0 or self.sampled_depths is not None):
            raise ConfigError(
                f"train_depths={self.train_depths!r} draws its own depths: it takes neither layer_drop nor "
                "sampled_depths (those go with train_depths='top' and 'all': --recipe random-depth and --recipe "
                "sandwich set them)"
            )
        k = self.sampled_depths
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"sampled_depths must be None (every depth) or an integer >= 0, got {k!r}")
        if self.layer_drop >= 1:
            raise ConfigError(f"layer_drop must be in [0, 1), got {self.layer_drop!r}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for name in (
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "recalibration_batches",
            "leader_cache_draws",
            "leader_cache_top_k",
            "max_steps",
        ):
            value = getattr(self, name)
            if name == "max_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_grad_norm is not None:
            self._check_number("max_grad_norm", minimum=0.0, inclusive=False)
        has_sub = len(self.scaling_factors) > 1 and self.train_depths == "all"
        if has_sub and not (self.self_distillation or self.interactive or self.sub_ce_weight > 0):
            raise ConfigError(
                "the sub-networks would get no loss: enable self_distillation or interactive, or set sub_ce_weight > 0"
            )

    def _check_number(self, name: str, *, minimum: float, inclusive: bool = True) -> None:
        value = getattr(self, name)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < minimum or (not inclusive and value == minimum):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ConfigError(f"{name} must be a number {bound}, got {value!r}")

    @property
    def top_scaling_factor(self) -> float:
        """The largest trained depth: the network the others distil from (1.0 unless ``full_depth=False``)."""
        return self.scaling_factors[-1]

    @property
    def sub_scaling_factors(self) -> list[float]:
        """The trained depths below the top one."""
        return self.scaling_factors[:-1]

    @property
    def leaves_parameters_unused(self) -> bool:
        """True if some blocks get no gradient in some steps (random or sampled depth, or a top depth below 1).

        DDP must then be created with ``find_unused_parameters=True`` (``accelerator_kwargs`` does it).
        """
        return self.layer_drop > 0 or self.top_scaling_factor < 1.0 or self.train_depths == "sampled"

    @property
    def data_streams(self) -> int:
        """Views per training image the loaders must give (one per Teammate unless they share the batch)."""
        return self.num_teammates if self.teammate_data != "shared" else 1

    @property
    def loader_options(self) -> dict[str, Any]:
        """What :func:`~adaptive_depth.training.make_loaders` needs of this config: batch size, seed, one stream per
        Teammate that sees its own views or images, each Teammate's own order with ``"streams"``, and draw mode for
        a cached Leader (``make_loaders(data, model, **config.loader_options)``)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "streams": self.data_streams,
            "own_order": self.teammate_data == "streams",
            "teacher_draws": self.leader_cache_draws if self.leader == "cached" else None,
            "norm_check": self.norm_check_fraction if self.per_depth_norms else 0.0,
        }

    @property
    def num_teammates(self) -> int:
        """Two with interactive learning, else one."""
        return 2 if self.interactive else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    def to_json_string(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from a dict written by :meth:`to_dict`; an unknown key is an error (a typo would go unnoticed).

        A dict of the earlier spelling (``lr_warmup_epochs`` for the learning-rate warm-up, ``warmup_epochs`` for the
        distillation ramp, ``cache_leader_logits``) is read with today's names, so the meaning of a saved value never
        changes; for the same reason a dict without ``leader``, ``train_depths`` or ``smallest_share`` (written
        before the field existed) gets the value those versions trained with (a joint Leader, every depth, the
        smallest depth a quarter of the sampled steps), not today's default.
        """
        data = {**EARLIER_DEFAULTS, **data}
        if "lr_warmup_epochs" in data:
            if "warmup_epochs" in data:
                data["distill_warmup_epochs"] = data.pop("warmup_epochs")
            data["warmup_epochs"] = data.pop("lr_warmup_epochs")
        if data.pop("cache_leader_logits", False) and data.get("leader") == "frozen":
            data["leader"] = "cached"  # the earlier switch for a frozen Leader's cached outputs
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the JSON to ``path``."""
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        """Read a file written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
