"""Cooperative fine-tuning of a depth-switchable model, with Accelerate.

    accelerate launch --num_cpu_threads_per_process 2 examples/finetune.py     # embedded digits data, minutes on CPU
    accelerate launch examples/finetune.py --model resnet50 --dataset <hub id | imagefolder:PATH> \\
        --scaling-factors 0.25 0.5 0.75 1.0 --epochs 10 --output-dir out/ [--push-to-hub me/resnet50-adaptive]
    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py ...   # the same script on many GPUs
    accelerate launch examples/finetune.py --recipe random-depth --epochs 36 ...   # a named configuration

Trains a Leader and a depth-switchable Teammate together (``--interactive``: two Teammates, the paper's
configuration; docs/training.md), recalibrates BatchNorm statistics for every trained depth, evaluates every
player at every depth, and saves the (better) Teammate with a model card, the per-depth table and an
accuracy-vs-FLOPs plot: ``AdaptiveDepth.from_pretrained(output_dir)`` loads it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from transformers import HfArgumentParser

from adaptive_depth import AdaptiveDepth, AdaptiveDepthError, ConfigError
from adaptive_depth.loading import HubOptions, load_base_model, resolve
from adaptive_depth.model import pretrained_or_random
from adaptive_depth.policy import POLICIES
from adaptive_depth.report import PLOT_NAME
from adaptive_depth.training import (
    DIGITS,
    EMBEDDED_DATASETS,
    CooperativeTrainer,
    TrainingConfig,
    accelerator_kwargs,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.checkpoints import check_output_dir, check_resume, prepare_output_dir
from adaptive_depth.training.evaluate import TrainingResult
from adaptive_depth.training.recipes import DEFAULT_RECIPE, RECIPES

DIGITS_IMAGE_SIZE = 32  # digits are 8x8: upsampling them to 224 px would only cost time
DIGITS_LEARNING_RATE = 1e-2  # measured: regnetx_002 from random init reaches 98% in 10 epochs, 78% at 1e-3
DIGITS_MODEL = "regnetx_002"


@dataclass
class ScriptArguments:
    """The script's own flags; the training ones are the fields of ``TrainingConfig`` (both spellings work:
    ``--learning-rate`` and ``--learning_rate``; ``--no-self-distillation`` switches a default-on field off)."""

    model: str = field(default=DIGITS_MODEL, metadata={"help": "timm name, Hub id or local folder"})
    recipe: str = field(
        default=DEFAULT_RECIPE,
        metadata={
            "help": "training recipe, defaults for the training flags (a flag given too wins): "
            + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()),
            "choices": list(RECIPES),
        },
    )
    pretrained: bool = field(default=False, metadata={"help": "pretrained weights are required (missing: error)"})
    random_init: bool = field(default=False, metadata={"help": "start from random weights on purpose"})
    image_size: int | None = field(default=None, metadata={"help": "input size (default: the model's; 32 on digits)"})
    policy: str = field(default="last", metadata={"help": "which blocks a stage drops first", "choices": POLICIES})
    leader_model: str | None = field(default=None, metadata={"help": "a different Leader (same labels)"})
    dataset: str = field(
        default=DIGITS, metadata={"help": f"{' / '.join(EMBEDDED_DATASETS)}, a Hub id, imagefolder:PATH"}
    )
    image_column: str | None = field(default=None, metadata={"help": "default: detected"})
    label_column: str | None = field(default=None, metadata={"help": "default: detected"})
    train_split: str | None = field(default=None, metadata={"help": "default: train"})
    eval_split: str | None = field(
        default=None, metadata={"help": "default: validation/valid/val/test, or 20%% held out"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "a seeded subset"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "a seeded subset"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    skip_bad_images: bool = field(default=False, metadata={"help": "leave undecodable images out (named)"})
    image_check: bool = field(default=True, metadata={"help": "decode every image once before training"})
    metrics: list[str] | None = field(
        default=None, metadata={"help": "top1, top5 (default: top-5 too with more than 5 classes)"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16, bf16 (default: accelerate's)", "choices": ["no", "fp16", "bf16"]}
    )
    output_dir: Path = field(default=Path("out/finetune"), metadata={"help": "where the model is saved"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace what adaptive-depth wrote there"})
    checkpointing_steps: str = field(default="epoch", metadata={"help": "'epoch', a number of steps, or 'no'"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep at most this many checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder, or 'latest'"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep this run's checkpoints after it finished"})
    push_to_hub: str | None = field(default=None, metadata={"help": "push the deployed model to this repo id"})
    report_to: str = field(default="none", metadata={"help": "accelerate trackers: none, all, tensorboard, wandb..."})
    latency: bool = field(default=True, metadata={"help": "measure latency at batch 1 in the report"})
    verbose: bool = field(default=False, metadata={"help": "show the libraries' INFO logs too"})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingConfig]:
    """The script's arguments and the training config, every field of both from the command line."""
    parser = HfArgumentParser(
        (ScriptArguments, TrainingConfig), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(learning_rate=None)  # unset: the dataset's default (1e-2 on the embedded data)
    chosen, _ = parser.parse_known_args(argv)  # the recipe first: its values are the other flags' defaults
    parser.set_defaults(**RECIPES[chosen.recipe].overrides)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    script = ScriptArguments(**{f.name: values.pop(f.name) for f in fields(ScriptArguments)})
    if script.pretrained and script.random_init:
        parser.error("--pretrained and --random-init exclude each other")
    try:
        script.checkpointing_steps = checkpointing_steps(script.checkpointing_steps)  # type: ignore[assignment]
    except ValueError as e:
        parser.error(f"--checkpointing-steps: {e}")
    unknown = sorted(set(script.metrics or []) - {"top1", "top5"})
    if unknown:
        parser.error(f"--metrics takes top1 and top5, got {unknown}")
    if values["learning_rate"] is None:
        values["learning_rate"] = (
            DIGITS_LEARNING_RATE if script.dataset in EMBEDDED_DATASETS else TrainingConfig.learning_rate
        )
    return script, TrainingConfig(**values)


def checkpointing_steps(value: str | int) -> str | int:
    """``--checkpointing-steps``: ``epoch``, ``no`` or a positive number of optimizer steps."""
    if value in ("epoch", "no") or (isinstance(value, int) and value > 0):
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"expected 'epoch', 'no' or a positive number of steps, got {value!r}")


def build_model(
    args: ScriptArguments, config: TrainingConfig, num_classes: int, seed: int, input_size: list[int] | None
) -> AdaptiveDepth:
    """One teammate: pretrained weights when they can be had (required with --pretrained), else random init."""
    weights = "pretrained" if args.pretrained else "random" if args.random_init else "auto"
    return pretrained_or_random(
        args.model,
        weights=weights,
        seed=seed,  # the new head's initialisation
        num_classes=num_classes,
        policy=args.policy,
        scaling_factors=config.scaling_factors,
        input_size=input_size,
    )


def own_teacher(model: AdaptiveDepth, name: str) -> torch.nn.Module:
    """``--leader frozen`` without ``--leader-model``: the starting model itself, at full depth, as the fixed teacher.

    This is the user with a model already fine-tuned on the task who makes it depth-switchable: the teacher costs one
    forward without gradient per step and needs no training (docs/benchmarks.md, R2). It needs a head trained for
    these classes; a new head would teach noise.
    """
    if not model.config.base_model.trained_head:
        raise ConfigError(
            f"--leader frozen without --leader-model makes {name!r} its own teacher, but its head is new (not trained "
            "for this dataset's classes); start from a model fine-tuned on this dataset, or name a trained teacher "
            "with --leader-model NAME"
        )
    return model.export(1.0).eval()


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    configure_logging(args.verbose)
    work_offline_if_the_hub_is_unreachable()
    # Every bad input is an error here, before any model is built or any step is taken.
    resume = args.resume_from_checkpoint is not None
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume=resume)
    data = load_image_classification_data(
        args.dataset,
        image_column=args.image_column,
        label_column=args.label_column,
        train_split=args.train_split,
        eval_split=args.eval_split,
        seed=config.seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        check_images=args.image_check,
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
    configure_logging(args.verbose, accelerator.is_main_process)
    checkpoints_in = None if args.checkpointing_steps == "no" else args.output_dir
    if resume:  # the checkpoint exists, is complete and fits these settings: checked before anything is removed
        check_resume(checkpoints_in, args.resume_from_checkpoint, config.to_dict(), accelerator.num_processes)
    set_seed(config.seed)
    image_size = args.image_size or (DIGITS_IMAGE_SIZE if data.source in EMBEDDED_DATASETS else None)
    input_size = [3, image_size, image_size] if image_size else None
    with accelerator.main_process_first():  # one process downloads, the others read the cache
        teammates = [build_model(args, config, data.num_classes, config.seed, input_size)]
        if config.num_teammates > 1:  # same weights source as the first, its own head initialisation
            args.random_init = args.random_init or not teammates[0].config.base_model.pretrained
            teammates.append(build_model(args, config, data.num_classes, config.seed + 1, input_size))
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
    if config.leader == "frozen" and leader is None:
        leader = own_teacher(teammates[0], args.model)
    for teammate in teammates:  # class names travel with the saved model (config.json, card, exports)
        teammate.set_labels(data.class_names)
    size = teammates[0].config.input_size
    if accelerator.is_main_process:
        print(teammates[0].depth_summary())
    loaders = make_loaders(data, teammates[0], **config.loader_options, input_size=size, num_workers=args.num_workers)

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
        output_dir=checkpoints_in,
        checkpoint_steps=checkpoint_steps,
        recalibration_loader=loaders.recalibration,
        save_total_limit=args.save_total_limit,
    )
    if accelerator.is_main_process:  # everything checked: now clear what --overwrite-output-dir replaces
        prepare_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume=resume)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers("adaptive-depth-finetune", config=config.to_dict() | {"model": args.model})
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    result = trainer.evaluate(latency=args.latency)
    wall = time.perf_counter() - start
    result.report.wall_time_s = round(wall, 1)
    result.report.dataset = data.source
    trainer.save(result, args.output_dir, push_to_hub=args.push_to_hub)
    if args.report_to != "none":
        log_results(accelerator, result, args.output_dir)
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


def work_offline_if_the_hub_is_unreachable() -> None:
    """One quick look at the Hub; if it cannot be reached, every library reads its cache only (no retries)."""
    import huggingface_hub.constants
    from huggingface_hub.utils import get_session

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
    except Exception as e:  # DNS, refused, timeout: whatever it is, the Hub is not there
        if os.environ.get("RANK", "0") == "0":  # launched processes: one notice (the processes are not set up yet)
            logging.getLogger("finetune").warning(
                "the Hugging Face Hub cannot be reached (%s): working offline, from the local cache only",
                type(e).__name__,
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True


def configure_logging(verbose: bool, main_process: bool = True) -> None:
    """Progress, warnings and the results on screen; the libraries' INFO chatter only with ``--verbose``.

    Called again once the processes are known: only the main one speaks (the random-init notice, warnings).
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also where a library configured logging first (basicConfig: a no-op)
    if not verbose:
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
    if not main_process:
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("adaptive_depth").setLevel(logging.ERROR)


def log_results(accelerator: Accelerator, result: TrainingResult, output_dir: Path) -> None:
    """Per-depth accuracy (and the accuracy-vs-FLOPs plot, where a tracker takes images) to the trackers."""
    accelerator.log({f"eval/top1/{r.player}/s={r.scaling_factor:g}": r.top1 for r in result.results}, step=result.steps)
    plot = output_dir / PLOT_NAME
    if accelerator.is_main_process and plot.is_file():
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(plot).convert("RGB"))
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"accuracy_vs_flops": image[None]}, step=result.steps, dataformats="NHWC")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdaptiveDepthError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
