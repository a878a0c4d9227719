"""Cooperative fine-tuning of a depth-switchable model, with Accelerate.

    accelerate launch --num_cpu_threads_per_process 2 examples/finetune.py     # embedded digits data, minutes on CPU
    accelerate launch examples/finetune.py --model resnet50 --dataset <hub id | imagefolder:PATH> \\
        --scaling-factors 0.25 0.5 0.75 1.0 --epochs 10 --output-dir out/ [--push-to-hub me/resnet50-adaptive]
    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py ...   # the same script on many GPUs

Trains a Leader and two Teammates together (docs/training.md), recalibrates BatchNorm statistics for every
trained depth, evaluates every player at every depth, and saves the better Teammate with a model card, the
per-depth table and an accuracy-vs-FLOPs plot: ``AdaptiveDepth.from_pretrained(output_dir)`` loads it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from adaptive_depth import AdaptiveDepth, AdaptiveDepthError, ConfigError
from adaptive_depth.loading import HubOptions, load_base_model, resolve
from adaptive_depth.model import pretrained_or_random
from adaptive_depth.training import (
    DIGITS,
    EMBEDDED_DATASETS,
    CooperativeTrainer,
    TrainingConfig,
    accelerator_kwargs,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.checkpoints import check_output_dir, prepare_output_dir
from adaptive_depth.training.config import LR_SCHEDULERS

DIGITS_IMAGE_SIZE = 32  # digits are 8x8: upsampling them to 224 px would only cost time
DIGITS_LEARNING_RATE = 1e-2  # measured: regnetx_002 from random init reaches 98% in 10 epochs, 78% at 1e-3
DIGITS_MODEL = "regnetx_002"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DIGITS_MODEL, help="timm name, Hub id or local folder (default: regnetx_002)")
    init = g.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true", help="pretrained weights are required (missing: error)")
    init.add_argument("--random-init", action="store_true", help="start from random weights on purpose")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input height = width (default: the model's; 32 for the digits data)",
    )
    g.add_argument("--policy", choices=["last", "spread"], default="last", help="which blocks a stage drops first")
    g.add_argument("--leader-model", default=None, help="a different Leader (timm / transformers, same labels)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=DIGITS,
        help="'digits' or 'digits-cluttered' (embedded), a Hub dataset id, or imagefolder:PATH",
    )
    g.add_argument("--image-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--train-split", default=None)
    g.add_argument("--eval-split", default=None)
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--max-eval-samples", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument(
        "--skip-bad-images", action="store_true", help="leave undecodable images out (named in a warning), not stop"
    )
    g.add_argument("--no-image-check", action="store_true", help="do not decode every image once before training")
    g.add_argument(
        "--metrics",
        nargs="+",
        choices=["top1", "top5"],
        default=None,
        help="default: top-1, plus top-5 when there are more than 5 classes",
    )
    g = p.add_argument_group("cooperative objective (docs/training.md)")
    d = TrainingConfig()
    g.add_argument("--scaling-factors", type=float, nargs="+", default=d.scaling_factors)
    g.add_argument("--leader", choices=["joint", "frozen", "none"], default=d.leader)
    g.add_argument("--no-interactive", action="store_true", help="one Teammate (ablation)")
    g.add_argument(
        "--teammate-data",
        choices=["shared", "views", "streams"],
        default=d.teammate_data,
        help="what the Teammates see: the same batch, their own augmentation of it, or their own images and order",
    )
    g.add_argument("--no-self-distillation", action="store_true", help="sub-networks learn from labels (ablation)")
    g.add_argument("--sfsl-gamma", type=float, default=d.sfsl_gamma, help="0 turns SFSL off (ablation)")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--lambda-guided", type=float, default=d.lambda_guided)
    g.add_argument(
        "--lambda-guided-sub",
        type=float,
        default=d.lambda_guided_sub,
        help="the sub-networks learn from the Leader too (not in the paper; 0: off)",
    )
    g.add_argument("--lambda-interactive", type=float, default=d.lambda_interactive)
    g.add_argument("--sub-ce-weight", type=float, default=d.sub_ce_weight)
    g.add_argument("--leader-share-back", type=float, default=d.leader_share_back)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="distillation ramp-up")
    g.add_argument("--no-per-depth-norms", action="store_true", help="skip per-depth BatchNorm recalibration")
    g = p.add_argument_group("cheaper training (docs/benchmarks.md, training cost)")
    g.add_argument(
        "--sampled-depths",
        type=int,
        default=None,
        help="sandwich rule: smallest and top depth plus this many random ones per step (default: every depth)",
    )
    g.add_argument(
        "--cache-leader-logits",
        action="store_true",
        help="with --leader frozen: compute the Leader's logits once, before training, and reuse them",
    )
    g.add_argument("--layer-drop", type=float, default=d.layer_drop, help="random-depth probability (a baseline)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=None,
        help=f"default {d.learning_rate:g}; {DIGITS_LEARNING_RATE:g} on the digits data (small images, random init)",
    )
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--lr-warmup-epochs", type=float, default=d.lr_warmup_epochs)
    g.add_argument(
        "--lr-scheduler-type", choices=LR_SCHEDULERS, default=d.lr_scheduler_type, help="transformers.get_scheduler"
    )
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: what `accelerate launch --mixed_precision` / `accelerate config` set",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("out/finetune"))
    g.add_argument("--overwrite-output-dir", action="store_true", help="write into a folder that holds a model")
    g.add_argument(
        "--checkpointing-steps", type=checkpointing_steps, default="epoch", help="'epoch', a number of steps, or 'no'"
    )
    g.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep training states after a finished run")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="push the deployed model to this repo")
    g.add_argument(
        "--report-to", default="all", help="accelerate trackers: all (installed ones), tensorboard, wandb, none"
    )
    g.add_argument("--no-latency", action="store_true", help="skip latency measurement in the report")
    return p.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    """The config from the flags: each ``--x-y`` flag sets the field ``x_y``; ``--no-x`` flags switch ``x`` off."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainingConfig) if getattr(args, f.name, None) is not None}
    if args.learning_rate is None and args.dataset in EMBEDDED_DATASETS:
        values["learning_rate"] = DIGITS_LEARNING_RATE
    switches = {
        "interactive": args.no_interactive,
        "self_distillation": args.no_self_distillation,
        "per_depth_norms": args.no_per_depth_norms,
    }
    return TrainingConfig(**values | {name: not off for name, off in switches.items()})


def checkpointing_steps(value: str) -> str | int:
    """``--checkpointing-steps``: ``epoch``, ``no`` or a positive number of optimizer steps."""
    if value in ("epoch", "no"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'epoch', 'no' or a positive number of steps, got {value!r}")


def build_model(args: argparse.Namespace, num_classes: int, seed: int, input_size: list[int] | None) -> AdaptiveDepth:
    """One teammate: pretrained weights when they can be had (required with --pretrained), else random init."""
    weights = "pretrained" if args.pretrained else "random" if args.random_init else "auto"
    return pretrained_or_random(
        args.model,
        weights=weights,
        seed=seed,  # the new head's initialisation
        num_classes=num_classes,
        policy=args.policy,
        scaling_factors=args.scaling_factors,
        input_size=input_size,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Every bad input is an error here, before any model is built or any step is taken.
    config = training_config(args)
    if config.leader == "frozen" and not args.leader_model:
        raise ConfigError("--leader frozen needs --leader-model: a model already trained on this dataset's labels")
    resume = args.resume_from_checkpoint is not None
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume=resume)
    data = load_image_classification_data(
        args.dataset,
        image_column=args.image_column,
        label_column=args.label_column,
        train_split=args.train_split,
        eval_split=args.eval_split,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        check_images=not args.no_image_check,
        skip_bad_images=args.skip_bad_images,
    )
    top5 = "top5" in args.metrics if args.metrics else None
    if top5 and data.num_classes <= 5:
        raise ConfigError(f"top-5 accuracy needs more than 5 classes; {data.source} has {data.num_classes}")

    accelerator = Accelerator(
        **accelerator_kwargs(config),  # gradient accumulation; DDP told of blocks a training mode leaves unused
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "logs")
        ),
    )
    set_seed(config.seed)
    image_size = args.image_size or (DIGITS_IMAGE_SIZE if data.source in EMBEDDED_DATASETS else None)
    input_size = [3, image_size, image_size] if image_size else None
    with accelerator.main_process_first():  # one process downloads, the others read the cache
        teammates = [build_model(args, data.num_classes, config.seed, input_size)]
        if config.num_teammates > 1:  # same weights source as the first, its own head initialisation
            args.random_init = args.random_init or not teammates[0].config.base_model.pretrained
            teammates.append(build_model(args, data.num_classes, config.seed + 1, input_size))
        leader = None
        if args.leader_model:
            hub = HubOptions()
            leader = load_base_model(
                resolve(args.leader_model, hub),
                pretrained=True,
                hub=hub,
                model_kwargs={},
                num_classes=None if args.leader == "frozen" else data.num_classes,
            ).model
    for teammate in teammates:  # class names travel with the saved model (config.json, card, exports)
        teammate.set_labels(data.class_names)
    size = teammates[0].config.input_size
    if accelerator.is_main_process:
        print(teammates[0].depth_summary())
    loaders = make_loaders(
        data,
        teammates[0],
        batch_size=config.batch_size,
        seed=config.seed,
        input_size=size,
        num_workers=args.num_workers,
        with_index=config.cache_leader_logits,
        streams=config.data_streams,
        own_order=config.teammate_data == "streams",
    )

    checkpoint_steps = args.checkpointing_steps if isinstance(args.checkpointing_steps, int) else None
    trainer = CooperativeTrainer(
        teammates,
        config,
        loaders.train,
        loaders.eval,
        leader=leader,
        accelerator=accelerator,
        num_classes=data.num_classes,
        top5=top5,
        output_dir=None if args.checkpointing_steps == "no" else args.output_dir,
        checkpoint_steps=checkpoint_steps,
        recalibration_loader=loaders.recalibration,
    )
    if accelerator.is_main_process:  # everything checked: now clear what --overwrite-output-dir replaces
        prepare_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume=resume)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers("adaptive-depth-finetune", config=config.to_dict() | {"model": args.model})
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    result = trainer.evaluate(latency=not args.no_latency)
    wall = time.perf_counter() - start
    result.report.wall_time_s = round(wall, 1)
    result.report.dataset = data.source
    trainer.save(result, args.output_dir, push_to_hub=args.push_to_hub)
    if not args.keep_checkpoints:
        trainer.remove_checkpoints()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(
            f"\n{data.source}: {len(data.train)} training / {len(data.eval)} evaluation images, "
            f"{data.num_classes} classes, {accelerator.num_processes} process(es), {wall / 60:.1f} min"
        )
        print(result.table())
        print(
            f"\nsaved the deployed model (teammate {result.deployed}) to {args.output_dir}; load it with "
            f"AdaptiveDepth.from_pretrained({str(args.output_dir)!r})"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdaptiveDepthError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
