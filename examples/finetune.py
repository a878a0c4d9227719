"""Fine-tuning of a depth-switchable model, every depth together, with Accelerate.

    accelerate launch --num_cpu_threads_per_process 2 examples/finetune.py     # embedded digits data, minutes on CPU
    accelerate launch examples/finetune.py --model resnet50 --dataset <hub id | imagefolder:PATH> \\
        --scaling-factors 0.25 0.5 0.75 1.0 --epochs 10 --output-dir out/ [--push-to-hub me/resnet50-adaptive]
    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py ...   # the same script on many GPUs
    accelerate launch examples/finetune.py --recipe cooperative ...   # a named configuration (--help lists them)

By default (``--recipe auto``: the recipe on top of the budget curves at s <= 0.5 for the budget given, printed at
the start) one network trains at one nested depth a step, the depths it will be deployed at, the smallest drawn half
the time and the full a quarter: about one forward and backward pass a step (``--recipe random-depth-nested``), on
top or level below 64 epochs of compute; from 64, the same with the full depth in half the steps and the smallest in
a quarter (``--recipe nested-top-half``), level or above there (docs/benchmarks.md).
``--recipe cooperative`` trains a Leader and a depth-switchable Teammate together (``--recipe paper``: two
Teammates; docs/training.md). Then BatchNorm statistics are recalibrated for every trained depth, every network is
evaluated at every depth, and the (better) Teammate is saved with a model card, the per-depth table and an
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
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from transformers import HfArgumentParser

from adaptive_depth import AdaptiveDepth, AdaptiveDepthError, ConfigError, pretrained_or_random
from adaptive_depth.policy import POLICIES
from adaptive_depth.training import (
    DIGITS,
    EMBEDDED_DATASETS,
    LOGS_DIR,
    PLOT_NAME,
    CooperativeTrainer,
    ImageClassificationData,
    OutputDir,
    TrainingConfig,
    TrainingResult,
    accelerator_kwargs,
    load_image_classification_data,
    load_leader,
    make_loaders,
    published_dataset_name,
)
from adaptive_depth.training.recipes import AUTO, RECIPES, pick_recipe

DIGITS_IMAGE_SIZE = 32  # digits are 8x8: upsampling them to 224 px would only cost time
DIGITS_LEARNING_RATE = 1e-2  # measured: regnetx_002 from random init reaches 98% in 10 epochs, 78% at 1e-3
DIGITS_MODEL = "regnetx_002"
FIXED_LEADERS = ("frozen", "cached")  # a teacher trained before this run: its own head, no training here
# The names transformers' example scripts and TrainingArguments use, accepted for ours (docs/training.md).
ALIASES = {
    "--num_train_epochs": ("epochs", int),
    "--per_device_train_batch_size": ("batch_size", int),
    "--model_name_or_path": ("model", str),
    "--dataset_name": ("dataset", str),
}
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass
class ScriptArguments:
    """The script's own flags; the training ones are the fields of ``TrainingConfig`` (both spellings work:
    ``--learning-rate`` and ``--learning_rate``; ``--no-self-distillation`` switches a default-on field off)."""

    model: str = field(default=DIGITS_MODEL, metadata={"help": "timm name, Hub id or local folder"})
    recipe: str = field(
        default=AUTO,
        metadata={
            "help": "training recipe, defaults for the training flags (a flag given too wins): "
            + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items())
            + f"; {AUTO} (the default): the one on top of the budget curves at the --epochs or --compute-budget given",
            "choices": [*RECIPES, AUTO],
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
        default=None, metadata={"help": "default: validation/valid/val/test with labels, or 20%% held out"}
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
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "push the deployed model to this repo id (alone: to --hub-model-id, else the output folder's name)",
            "nargs": "?",
            "const": "true",
        },
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "the repo id --push-to-hub pushes to"})
    report_to: str = field(
        default="none", metadata={"help": "accelerate trackers: none, all, or names (tensorboard,wandb...)"}
    )
    latency: bool = field(default=True, metadata={"help": "measure latency at batch 1 in the report"})
    verbose: bool = field(default=False, metadata={"help": "show the libraries' INFO logs too"})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingConfig]:
    """The script's arguments and the training config, every field of both from the command line."""
    parser = HfArgumentParser(
        (ScriptArguments, TrainingConfig), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for alias, (dest, kind) in ALIASES.items():  # no default of their own: the canonical flag's stays
        parser.add_argument(alias, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"same as --{dest}")
    for precision in ("bf16", "fp16"):
        parser.add_argument(f"--{precision}", action="store_true", help=f"same as --mixed-precision {precision}")
    parser.set_defaults(learning_rate=None)  # unset: the dataset's default (1e-2 on the embedded data)
    chosen, _ = parser.parse_known_args(argv)  # the recipe first: its values are the other flags' defaults
    try:
        recipe, _ = pick_recipe(
            chosen.recipe, epochs=chosen.epochs, compute_budget=chosen.compute_budget, max_steps=chosen.max_steps
        )
    except ConfigError as e:
        parser.error(str(e))
    parser.set_defaults(**RECIPES[recipe].overrides)
    values = vars(parser.parse_args(argv))
    precisions = [p for p in ("bf16", "fp16") if values.pop(p)]
    script = ScriptArguments(**{f.name: values.pop(f.name) for f in fields(ScriptArguments)})
    if script.pretrained and script.random_init:
        parser.error("--pretrained and --random-init exclude each other")
    if len(precisions) > 1:
        parser.error("--bf16 and --fp16 exclude each other")
    if precisions and script.mixed_precision not in (None, precisions[0]):
        parser.error(f"--{precisions[0]} and --mixed-precision {script.mixed_precision} disagree")
    script.mixed_precision = precisions[0] if precisions else script.mixed_precision
    try:
        script.checkpointing_steps = checkpointing_steps(script.checkpointing_steps)  # type: ignore[assignment]
        script.push_to_hub = push_target(script.push_to_hub, script.hub_model_id, script.output_dir)
        trackers(script.report_to)
    except ValueError as e:
        parser.error(str(e))
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
    raise ValueError(f"--checkpointing-steps: expected 'epoch', 'no' or a positive number of steps, got {value!r}")


def push_target(push_to_hub: str | None, hub_model_id: str | None, output_dir: Path) -> str | None:
    """The repo id to push to: ``--push-to-hub REPO``, or transformers' ``--push_to_hub [true] --hub_model_id REPO``
    (without ``--hub_model_id``: the output folder's name, as transformers does); ``None``: no push."""
    flag = (push_to_hub or "").lower()
    if push_to_hub is None or flag in FALSE:
        if hub_model_id:
            raise ValueError(f"--hub-model-id {hub_model_id} names the repo to push to: add --push-to-hub")
        return None
    if flag in TRUE:
        return hub_model_id or output_dir.resolve().name
    if hub_model_id and hub_model_id != push_to_hub:
        raise ValueError(f"--push-to-hub {push_to_hub} and --hub-model-id {hub_model_id} name two repos; give one")
    return push_to_hub


def trackers(report_to: str) -> list[str] | None:
    """``--report-to`` as accelerate's ``log_with``: every tracker named must be known and installed, as transformers'
    Trainer checks (accelerate would drop a missing one without a word, and the run would log nothing)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
            known = sorted(LOGGER_TYPE_TO_CLASS)
            raise ValueError(f"--report-to {name!r}: no such tracker; choose none, all, or one of {known}")
        if name != "all" and name not in installed:
            raise ValueError(
                f"--report-to {name}: {name} is not installed (pip install {name.replace('_', '-')}), so nothing "
                "would be logged; install it, or pass --report-to none"
            )
    return names or None


def load_data(args: ScriptArguments, config: TrainingConfig) -> ImageClassificationData:
    """The training and evaluation images, every one decoded once and every label checked, before a model is built."""
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
    if args.metrics and "top5" in args.metrics and data.num_classes <= 5:
        raise ConfigError(f"top-5 accuracy needs more than 5 classes; {data.source} has {data.num_classes}")
    return data


def weights(args: ScriptArguments) -> str:
    """``pretrained_or_random``'s ``weights``: required (``--pretrained``), random on purpose, or auto."""
    return "pretrained" if args.pretrained else "random" if args.random_init else "auto"


def image_size(args: ScriptArguments, data: ImageClassificationData) -> int | None:
    """``--image-size``, else 32 px on the embedded datasets, else ``None`` (the model's own)."""
    return args.image_size or (DIGITS_IMAGE_SIZE if data.source in EMBEDDED_DATASETS else None)


def run_settings(args: ScriptArguments, data: ImageClassificationData) -> dict[str, Any]:
    """This script's choices that shape the training, recorded in every checkpoint (beside the training config and
    the mixed precision) so that a resume with others is refused. Flags that act only on evaluation, saving or
    speed (``--max-eval-samples``, ``--metrics``, ``--num-workers``...) may change."""
    return {
        "model": args.model,
        "weights": weights(args),
        "leader_model": args.leader_model,
        "policy": args.policy,
        "image_size": image_size(args, data),
        "dataset": args.dataset,
        "train_split": data.train_split,
        "eval_split": data.eval_split,
        "image_column": data.image_column,
        "label_column": data.label_column,
        "max_train_samples": args.max_train_samples,
        "training_images": len(data.train),
        "classes": data.num_classes,
    }


def build_model(
    args: ScriptArguments, config: TrainingConfig, num_classes: int, seed: int, input_size: list[int] | None
) -> AdaptiveDepth:
    """One teammate: pretrained weights when they can be had (required with --pretrained), else random init."""
    return pretrained_or_random(
        args.model,
        weights=weights(args),
        seed=seed,  # the new head's initialisation
        num_classes=num_classes,
        policy=args.policy,
        scaling_factors=config.scaling_factors,
        input_size=input_size,
    )


def build_players(
    args: ScriptArguments, config: TrainingConfig, data: ImageClassificationData, accelerator: Accelerator
) -> tuple[list[AdaptiveDepth], torch.nn.Module | None]:
    """The Teammates (class names set) and the Leader the trainer does not make itself (``None``: it makes it)."""
    size = image_size(args, data)
    input_size = [3, size, size] if size else None
    with accelerator.main_process_first():  # one process downloads, the others read the cache
        teammates = [build_model(args, config, data.num_classes, config.seed, input_size)]
        if config.num_teammates > 1:  # same weights source as the first, its own head initialisation
            args.random_init = args.random_init or not teammates[0].config.base_model.pretrained
            teammates.append(build_model(args, config, data.num_classes, config.seed + 1, input_size))
        leader = None
        if args.leader_model:
            fixed = config.leader in FIXED_LEADERS
            leader = load_leader(args.leader_model, num_classes=None if fixed else data.num_classes)
    if config.leader in FIXED_LEADERS and leader is None:
        leader = own_teacher(teammates[0], args.model)
    for teammate in teammates:  # class names travel with the saved model (config.json, card, exports)
        teammate.set_labels(data.class_names)
    if accelerator.is_main_process:
        print(teammates[0].depth_summary())
    return teammates, leader


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
    # Every bad input is an error before a model is built, and nothing in the output folder changes before the
    # models and the trainer exist: a refused run loses nothing.
    output = OutputDir(
        args.output_dir, overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint
    )
    data = load_data(args, config)
    log_with = trackers(args.report_to)
    accelerator = Accelerator(
        **accelerator_kwargs(config),  # gradient accumulation; DDP told of blocks a training mode leaves unused
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(args.output_dir / LOGS_DIR)
        ),
    )
    configure_logging(args.verbose, accelerator.is_main_process)
    if args.recipe == AUTO and accelerator.is_main_process:  # which recipe the budget picked, and why
        budget = {"epochs": config.epochs, "compute_budget": config.compute_budget, "max_steps": config.max_steps}
        print(pick_recipe(AUTO, **budget)[1])
    settings = run_settings(args, data)
    checkpoint = output.checkpoint_to_resume(config, settings, accelerator)  # complete, and of these settings
    set_seed(config.seed)
    teammates, leader = build_players(args, config, data, accelerator)
    size = teammates[0].config.input_size
    loaders = make_loaders(data, teammates[0], **config.loader_options, input_size=size, num_workers=args.num_workers)
    trainer = CooperativeTrainer(
        teammates,
        config,
        loaders.train,
        loaders.eval,
        leader=leader,
        accelerator=accelerator,
        num_classes=data.num_classes,
        top5="top5" in args.metrics if args.metrics else None,
        output_dir=None if args.checkpointing_steps == "no" else args.output_dir,
        checkpoint_steps=args.checkpointing_steps if isinstance(args.checkpointing_steps, int) else None,
        recalibration_loader=loaders.recalibration,
        norm_check_loader=loaders.norm_check,
        save_total_limit=args.save_total_limit,
        settings=settings,
    )
    with output.claim(accelerator):  # this run's alone from here; --overwrite-output-dir has cleared its part
        if log_with:
            accelerator.init_trackers("adaptive-depth-finetune", config=config.to_dict() | {"model": args.model})
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        result = trainer.evaluate(latency=args.latency)
        result.report.wall_time_s = round(time.perf_counter() - start, 1)
        result.report.dataset, result.report.eval_split = published_dataset_name(data.source), data.eval_source
        output.save(trainer, result, push_to_hub=args.push_to_hub)
        if log_with:
            log_results(accelerator, result, args.output_dir)
        output.finish(trainer, keep_checkpoints=args.keep_checkpoints)
    accelerator.end_training()
    if accelerator.is_main_process:
        print_summary(args, data, result, accelerator.num_processes)
    return 0


def print_summary(args: ScriptArguments, data: ImageClassificationData, result: TrainingResult, processes: int) -> None:
    """What was trained on what, the per-depth table, and where the model is."""
    minutes = (result.report.wall_time_s or 0) / 60
    scored = f"the {data.eval_split!r} split" if data.eval_split else f"held out of {data.train_split!r}"
    print(
        f"\n{data.source}: {len(data.train)} training images ({data.train_split!r} split) / {len(data.eval)} "
        f"evaluation images ({scored}), {data.num_classes} classes, {processes} process(es), {minutes:.1f} min"
    )
    print(result.table())
    print(
        f"\nsaved the deployed model (teammate {result.deployed}) to {args.output_dir}; load it with "
        f"AdaptiveDepth.from_pretrained({str(args.output_dir)!r})"
    )


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
