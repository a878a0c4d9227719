"""Cooperative training with Accelerate: one ``prepare``, one backward per step, exact resume, any process count."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..errors import ConfigError
from ..model import AdaptiveDepth
from ..policy import check_scaling_factor
from ..report import TrainingReport
from ..state import preserved
from .checkpoints import (
    Progress,
    check_resume,
    checkpoint_dirs,
    load_checkpoint,
    recorded_settings,
    remove_run_checkpoints,
    save_checkpoint,
)
from .compute import ComputeMeter
from .config import TrainingConfig
from .evaluate import TrainingResult, evaluate_accuracy, score_players
from .losses import TEAMMATE_NAMES, CooperativeLoss, cooperative_loss
from .norm_check import keep_better_norms
from .output_dir import write_run_files
from .parallel import accelerator_kwargs, check_accelerator
from .players import CooperativeModel, logits_of, make_leader, make_teammates
from .schedule import RunLength, budget_steps, distillation_ramp
from .teacher_cache import TeacherCache, load_or_make_cache

__all__ = ["CooperativeTrainer", "TrainingResult"]


class CooperativeTrainer:
    """Runs the whole cooperative schedule: train, recalibrate per-depth norms, evaluate, pick the deployed model.

    Args:
        model: the :class:`AdaptiveDepth` model to train; with ``config.interactive`` a second teammate is a
            copy with a re-initialised head, unless two models are given.
        config: the objective and the optimisation.
        train_loader: batches of ``(images, labels)``; its sampler / dataset may have ``set_epoch``.
        eval_loader: held-out batches for the report (``None``: no evaluation).
        leader: the Leader network (default: a copy of the base model with ``config.leader="joint"``); with
            ``config.leader="frozen"`` or ``"cached"`` it must already be trained on the same labels (with
            ``"ema"`` the average of the first Teammate is made here).
        accelerator: the ``Accelerator`` to use (default: ``Accelerator(**accelerator_kwargs(config))``).
        num_classes: classes of the task (default: read from the model's logits).
        top5: report top-5 accuracy (default: when there are more than 5 classes).
        output_dir: where checkpoints go (``output_dir/checkpoints/step_N``).
        checkpoint_steps: save the training state every this many optimizer steps (``None``: at each epoch end
            when ``output_dir`` is set).
        recalibration_loader: un-augmented training batches for per-depth BatchNorm statistics (default:
            ``train_loader``).
        norm_check_loader: un-augmented training images held out of training (``Loaders.norm_check``): each
            recalibrated depth keeps the statistics, recalibrated or of training, that classify them better.
        log_every: optimizer steps between tracker logs.
        save_total_limit: keep at most this many of this run's checkpoints (the newest); ``None``: all.
        settings: what else decides the run besides ``config`` (a script's model, dataset, input size...), as JSON
            values: recorded in every checkpoint with the mixed precision, and a resume with other values is refused.

    Raises:
        ConfigError: a setup that could not train (no full batch, an Accelerator that DDP would fail with...).
    """

    def __init__(
        self,
        model: AdaptiveDepth | Sequence[AdaptiveDepth],
        config: TrainingConfig,
        train_loader: DataLoader,
        eval_loader: DataLoader | None = None,
        *,
        leader: nn.Module | None = None,
        accelerator: Accelerator | None = None,
        num_classes: int | None = None,
        top5: bool | None = None,
        output_dir: str | Path | None = None,
        checkpoint_steps: int | None = None,
        recalibration_loader: DataLoader | None = None,
        norm_check_loader: DataLoader | None = None,
        log_every: int = 10,
        save_total_limit: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, TrainingConfig):
            raise ConfigError(f"config must be a TrainingConfig, got {type(config).__name__}")
        for name, value in (("checkpoint_steps", checkpoint_steps), ("save_total_limit", save_total_limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.save_total_limit = save_total_limit
        self.config = config
        self.accelerator = acc = accelerator or Accelerator(**accelerator_kwargs(config))
        check_accelerator(self.accelerator, config)
        self.settings = recorded_settings(settings, acc)
        first = model if isinstance(model, AdaptiveDepth) else next(iter(model), None)
        fresh = not (isinstance(first, AdaptiveDepth) and first.config.base_model.trained_head)
        self.teammates = make_teammates(model, config.num_teammates, config.seed + 1, fresh_heads=fresh)
        for t in self.teammates:
            t.config.scaling_factors = list(config.scaling_factors)
        if config.leader in ("frozen", "cached") and leader is None:
            raise ConfigError(f"leader={config.leader!r} needs a trained Leader: pass leader=<your trained model>")
        if config.leader == "joint" and leader is None:
            leader = make_leader(self.teammates[0], config.seed + config.num_teammates + 1, fresh_head=fresh)
        if config.leader == "ema":
            leader = ModelEmaV3(self.teammates[0], decay=config.ema_decay, use_warmup=True)
        # A cached teacher stays outside the prepared module (it only makes the table), so it is moved here: on a
        # GPU the table is made from images on the accelerator's device.
        cached = config.leader == "cached" and leader is not None
        self.cache_teacher = leader.eval().to(acc.device) if cached else None
        module = CooperativeModel(
            self.teammates,
            config.scaling_factors,
            leader if config.leader not in ("none", "cached") else None,
            leader=config.leader,
            layer_drop=config.layer_drop,
            sampled_depths=config.sampled_depths,
            train_depths=config.train_depths,
            teammate_data=config.teammate_data,
            smallest_share=config.smallest_share,
            top_share=config.top_share,
        )
        self.num_classes = num_classes
        self.top5 = top5
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_steps = checkpoint_steps
        self.log_every = log_every
        self.progress = Progress()

        # timm's factory: AdamW without weight decay on norms, biases and the parameters timm models exempt
        optimizer = create_optimizer_v2(module, opt="adamw", lr=config.learning_rate, weight_decay=config.weight_decay)
        self.module, self.optimizer, self.train_loader = acc.prepare(module, optimizer, train_loader)
        self.players: CooperativeModel = acc.unwrap_model(self.module)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        self.recalibration_loader = acc.prepare(recalibration_loader) if recalibration_loader is not None else None
        self.norm_check_loader = acc.prepare(norm_check_loader) if norm_check_loader is not None else None
        self.norms_kept: dict[str, dict[str, str]] = {}  # per Teammate and depth: recalibrated or training
        if len(self.train_loader) == 0:
            images = len(train_loader.dataset) if hasattr(train_loader, "dataset") else "too few"  # type: ignore[arg-type]
            raise ConfigError(
                f"the training data gives no full batch: {images} images for batches of {config.batch_size} per "
                f"process on {acc.num_processes} process(es) (an incomplete last batch is dropped), so the run would "
                "train nothing. Use a smaller --batch-size or more data"
            )
        budget = None
        if config.compute_budget is not None:
            images = len(self.train_loader.dataset)  # type: ignore[arg-type]
            budget = budget_steps(
                config, self.players, images, processes=acc.num_processes, cache_teacher=self.cache_teacher
            )
        per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps)
        self.run = RunLength.of(config, per_epoch, budget)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer, num_warmup_steps=self.run.warmup_steps,
            num_training_steps=self.run.total_steps,
        )  # fmt: skip

    # ------------------------------------------------------------------ training
    def _set_epoch(self, loader: Any, epoch: int) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)

    def _ramp(self, epoch: int, batch: int) -> float:
        """The distillation weight at ``batch`` of ``epoch`` (:func:`~.schedule.distillation_ramp`)."""
        return distillation_ramp(self.config, self.run, epoch + batch / max(1, len(self.train_loader)))

    def training_step(
        self, images: torch.Tensor, labels: torch.Tensor, ramp: float, keys: torch.Tensor | None = None
    ) -> CooperativeLoss:
        """Forward every player at every depth, compute the cooperative loss and back-propagate it once.

        Args:
            images, labels: the batch.
            ramp: distillation warm-up progress in [0, 1].
            keys: the images' teacher-cache keys (with ``leader="cached"``; the loader yields them).
        """
        acc = self.accelerator
        with acc.autocast():
            logits = self.module(images, keys, teach=ramp > 0)
        loss = cooperative_loss(logits, labels, self.config, ramp)
        acc.backward(loss.total)
        if acc.sync_gradients and self.config.max_grad_norm is not None:
            acc.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        if acc.sync_gradients and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
            self.players.update_ema(self.progress.step + 1)
        self.optimizer.zero_grad()
        return loss

    @property
    def leader(self) -> nn.Module | None:
        """The network that teaches at full depth, if any: joint, frozen, the source of a cache, or the average."""
        if self.cache_teacher is not None:
            return self.cache_teacher
        model = self.players.leader_model
        return model.module if isinstance(model, ModelEmaV3) else model

    @property
    def compute(self) -> ComputeMeter:
        """Training FLOPs charged so far on this process (``training_flops()`` sums every process)."""
        return self.players.compute

    def training_flops(self) -> float:
        """Training FLOPs of the run so far, over every process (:mod:`~adaptive_depth.training.compute`)."""
        total = torch.tensor(self.compute.total, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(total, "sum"))

    def make_leader_cache(self, *, charge: bool = True) -> TeacherCache:
        """``leader="cached"``: the fixed teacher's top-k logits on every augmentation draw of every image.

        Read from ``config.leader_cache`` when that file holds a cache of this dataset, augmentation and teacher
        (another is refused), else made (sharded over the processes) and written there. The making is charged to
        this run's compute either way (``charge=False``: already charged, a resumed run).
        """
        acc, config, teacher = self.accelerator, self.config, self.cache_teacher
        if teacher is None:
            raise ConfigError("leader='cached' needs a trained Leader: pass leader=<your trained model>")
        example = self.teammates[0].example_input(1)
        with acc.autocast():
            dataset = getattr(self.train_loader, "dataset", None)
            cache = load_or_make_cache(teacher, dataset, config, example, lambda x: logits_of(teacher(x)), acc)
        self.players.teacher_cache = cache
        if charge:
            self.compute.teacher += cache.making_flops / acc.num_processes  # summed over processes in the report
        return cache

    def checkpoint_dirs(self) -> list[Path]:
        """Complete training states in ``output_dir/checkpoints``, oldest first."""
        return checkpoint_dirs(self.output_dir)

    def _state(self) -> dict[str, Any]:
        return {
            "progress": asdict(self.progress),
            "compute": asdict(self.compute),
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "settings": self.settings,
            "processes": self.accelerator.num_processes,
        }

    def save_checkpoint(self) -> Path | None:
        """Save the full training state (models, optimizer, scheduler, RNG, progress) on the way."""
        if self.output_dir is None:
            return None
        path = save_checkpoint(self.accelerator, self.output_dir, self._state(), self.progress.step)
        if self.save_total_limit is not None and self.accelerator.is_main_process:
            own = checkpoint_dirs(self.output_dir, run_id=self.progress.run_id)
            for old in own[: max(0, len(own) - self.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, checkpoint: str | Path) -> None:
        # refused (other settings, another number of processes) before anything is loaded into the players
        path = check_resume(
            self.output_dir, checkpoint, self.config.to_dict(), self.accelerator.num_processes, settings=self.settings
        )
        state = load_checkpoint(self.accelerator, path)
        self.progress = Progress(**state["progress"])
        self.players.compute = ComputeMeter(**state.get("compute", {}))
        self.scheduler.load_state_dict(state["scheduler"])
        self.accelerator.print(f"resumed from {path}: epoch {self.progress.epoch}, step {self.progress.step}")

    def train(self, resume_from_checkpoint: str | Path | None = None) -> None:
        """Run the schedule: ``config.max_steps`` steps, else ``config.epochs`` epochs (continuing a saved state)."""
        acc = self.accelerator
        if resume_from_checkpoint is not None:
            self._resume(resume_from_checkpoint)
        if self.config.leader == "cached" and self.players.teacher_cache is None:
            self.make_leader_cache(charge=self.progress.step == 0)  # a resumed run was charged when it began
        self.module.train()
        total = self.run.total_steps
        bar = tqdm(total=total, initial=self.progress.step, desc="train", disable=not acc.is_local_main_process)
        while self.progress.step < total:
            epoch = self.progress.epoch
            self._set_epoch(self.train_loader, epoch)
            skip = self.progress.batches_done
            loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            # Summed on the device: reading it back every step would wait for the GPU each time.
            loss_sum = torch.tensor(self.progress.loss_sum, device=acc.device)
            for batch_index, (images, labels, *keys) in enumerate(loader, start=skip):
                with acc.accumulate(self.module):
                    loss = self.training_step(images, labels, self._ramp(epoch, batch_index), *keys)
                loss_sum += loss.total.detach()
                self.progress.batches_done = batch_index + 1
                if not acc.sync_gradients:
                    continue
                self.progress.step += 1
                bar.update(1)
                if self.progress.step % self.log_every == 0:
                    mean = acc.reduce(loss.total.detach(), "mean").item()
                    bar.set_postfix(loss=f"{mean:.4f}")
                    acc.log(
                        {"loss": mean, "lr": self.scheduler.get_last_lr()[0]}
                        | {f"loss/{k}": v.item() for k, v in loss.terms.items()},
                        step=self.progress.step,
                    )
                done = self.progress.batches_done == len(self.train_loader) or self.progress.step >= total
                if self.checkpoint_steps and self.progress.step % self.checkpoint_steps == 0 and not done:
                    self.progress.loss_sum = loss_sum.item()
                    self.save_checkpoint()
                if self.progress.step >= total:  # max_steps: the schedule ends inside this epoch
                    break
            mean = acc.reduce(loss_sum / max(1, self.progress.batches_done), "mean").item()
            self.progress.history.append(mean)
            acc.print(f"epoch {epoch + 1}/{self.run.epochs}: mean loss {mean:.4f}")
            self.progress.epoch, self.progress.batches_done, self.progress.loss_sum = epoch + 1, 0, 0.0
            if self.output_dir is not None and (
                not self.checkpoint_steps or self.progress.step % self.checkpoint_steps == 0
            ):
                self.save_checkpoint()
        bar.close()

    # ------------------------------------------------------------------ after training
    def recalibrate(self, scaling_factors: Sequence[float] | None = None) -> None:
        """Per-depth BatchNorm statistics for every teammate (averaged over processes).

        Args:
            scaling_factors: the depths to recalibrate (default: the trained ones).
        """
        loader = self.recalibration_loader or self.train_loader
        self._set_epoch(loader, 0)
        for teammate in self.teammates:
            teammate.recalibrate_norms(
                loader,
                scaling_factors or self.config.scaling_factors,
                max_batches=self.config.recalibration_batches,
                reduce=lambda t: self.accelerator.reduce(t, "mean"),
            )

    def evaluate(self, *, latency: bool = True, scaling_factors: Sequence[float] | None = None) -> TrainingResult:
        """Accuracy, FLOPs (and latency, batch 1) of every player at every depth; picks the deployed teammate.

        Args:
            latency: also measure latency at batch 1 (FLOPs are always counted).
            scaling_factors: the depths to evaluate (default: the trained ones); baselines trained at fewer depths
                are evaluated at all of them, each with its own recalibrated BatchNorm statistics.
        """
        if self.eval_loader is None:
            raise ConfigError("evaluate() needs an eval_loader")
        acc, config = self.accelerator, self.config
        depths = sorted({check_scaling_factor(s) for s in scaling_factors or config.scaling_factors})
        num_classes = self.num_classes or self._infer_num_classes()
        before: dict[str, dict[float, tuple[float, float | None]]] = {}
        names = list(TEAMMATE_NAMES[: len(self.teammates)])
        if config.per_depth_norms:
            for name, t in zip(names, self.teammates):
                before[name] = evaluate_accuracy(  # only top-1 is reported for the training statistics
                    t, self.eval_loader, acc, depths, num_classes=num_classes, top5=False, desc=name
                )
            self.recalibrate(depths)
            if self.norm_check_loader is not None:
                for name, t in zip(names, self.teammates):
                    kept = keep_better_norms(t, self.norm_check_loader, acc, depths)
                    self.norms_kept[name] = {f"{s:g}": choice for s, choice in kept.items()}
        players: list[tuple[str, nn.Module]] = list(zip(names, self.teammates))
        if self.leader is not None:
            players.append(("leader", self.leader))
        results = score_players(
            players, self.eval_loader, acc, depths, num_classes=num_classes, top5=self.top5, latency=latency,
            trained_norms=before,
        )  # fmt: skip
        means = {n: sum(r.top1 for r in results if r.player == n) / len(depths) for n in names}
        deployed = max(names, key=lambda n: means[n])
        model = self.teammates[names.index(deployed)]
        model.config.base_model.trained_head = True  # fine-tuned for these classes: a later run keeps its head
        report = TrainingReport(
            config=config.to_dict(),
            deployed=deployed,
            results=results,
            loss_per_epoch=list(self.progress.history),
            steps=self.progress.step,
            processes=acc.num_processes,
            training_flops=self.training_flops(),
            norms_kept=self.norms_kept or None,
        )
        model.config.extra["training"] = report.to_dict()
        return TrainingResult(model, report)

    def _infer_num_classes(self) -> int:
        teammate = self.teammates[0]
        with preserved(teammate, train=False), torch.no_grad():
            return int(logits_of(teammate(teammate.example_input(1))).shape[-1])

    def save(self, result: TrainingResult, output_dir: str | Path, *, push_to_hub: str | None = None) -> None:
        """Save the deployed model (main process only) and optionally push it; everyone waits for the save."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            result.model.config.extra["training"] = result.report.to_dict()
            out = Path(output_dir)
            result.model.save_pretrained(out)
            write_run_files(out, self.config, result.results)
            if push_to_hub:
                result.model.push_to_hub(push_to_hub)
        acc.wait_for_everyone()

    def remove_checkpoints(self) -> None:
        """Delete this run's training states (after it finished), on the main process; other runs' stay."""
        if self.accelerator.is_main_process:
            remove_run_checkpoints(self.output_dir, self.progress.run_id)
