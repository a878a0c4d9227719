"""Training cost benchmark: what a step of each recipe costs, in time and in FLOPs, and whether any of it is waste.

In one run, on one batch per recipe: each recipe's optimisation step (``CooperativeTrainer.training_step``: its
forwards, the objective, one backward, clipping, AdamW) timed against a plain fine-tuning step, beside the training
FLOPs the budget curves charge it (``adaptive_depth.training.compute``). A recipe that draws a depth per step runs
``--steps-per-round`` steps per timed call, so its time and FLOPs are means over the draws. The cooperative recipe's
step is also timed against the sum of its parts measured separately (each network at each depth on its own
cross-entropy, and the optimizer step): the target is no waste.

    python benchmarks/training_cost.py                         # regnetx_002, digits batch 64 at 32 px, CPU
    python benchmarks/training_cost.py --model resnet50 --image-size 224 --batch-size 64 --device cuda
    python benchmarks/training_cost.py --recipes random-depth-nested plain --repeats 3 --json cost.json

Weights are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from adaptive_depth.budget import describe_device
from adaptive_depth.latency import measure_latencies_ms
from adaptive_depth.model import pretrained_or_random
from adaptive_depth.training import CooperativeTrainer, load_image_classification_data, make_loaders
from adaptive_depth.training.players import logits_of
from adaptive_depth.training.recipes import RECIPES, recipe_config

PLAIN = "plain"
COOPERATIVE = "cooperative"  # the recipe whose step is checked against the sum of its parts
WASTE_TARGET = 1.15


def build_trainer(recipe: str, args: argparse.Namespace, data: Any) -> CooperativeTrainer:
    """A trainer of one recipe on the digits loaders, ready to step (a cached teacher's table is made here)."""
    config = recipe_config(recipe, batch_size=args.batch_size)
    model = pretrained_or_random(
        args.model, weights="random", seed=0, num_classes=data.num_classes, input_size=args.input_size
    )
    leader = model.export(1.0) if config.leader in ("frozen", "cached") else None  # any trained one costs the same
    loaders = make_loaders(data, model, **config.loader_options, input_size=args.input_size)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    trainer = CooperativeTrainer(
        model, config, loaders.train, accelerator=accelerator, leader=leader, recalibration_loader=loaders.recalibration
    )
    if config.leader == "cached":
        trainer.make_leader_cache()  # once, before training: not part of a step (its FLOPs are left out below)
    trainer.module.train()
    return trainer


def steps(trainer: CooperativeTrainer, count: int) -> Callable[[], None]:
    """``count`` optimisation steps on one batch of the trainer's own loader (with its teacher-cache keys, if any)."""
    device = trainer.accelerator.device
    images, labels, *keys = (t.to(device) for t in next(iter(trainer.train_loader)))

    def run() -> None:
        for _ in range(count):
            trainer.training_step(images, labels, 1.0, *keys)

    return run


def _forward_backward(
    network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, depth: float | None
) -> Callable[[], None]:
    """One network at one depth on its own cross-entropy: a forward and a backward pass."""

    def run() -> None:
        if depth is not None:
            network.set_scaling_factor(depth)
        F.cross_entropy(logits_of(network(images)), labels).backward()

    return run


def parts(trainer: CooperativeTrainer) -> dict[str, Callable[[], None]]:
    """The separately timed parts of a cooperative step: each network at each depth, and the optimizer step."""
    device = trainer.accelerator.device
    images, labels = (t.to(device) for t in next(iter(trainer.train_loader))[:2])
    runs: dict[str, Callable[[], None]] = {}
    if trainer.leader is not None and trainer.config.leader == "joint":
        runs["Leader"] = _forward_backward(trainer.leader, images, labels, None)
    for name, teammate in zip("AB", trainer.teammates):
        for s in trainer.config.scaling_factors:
            runs[f"Teammate {name} s={s:g}"] = _forward_backward(teammate, images, labels, s)

    def optimizer_step() -> None:
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    runs["optimizer"] = optimizer_step
    return runs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every recipe's step: milliseconds and training FLOPs per image, and the cooperative step's parts."""
    data = load_image_classification_data("digits", seed=0)
    trainers = {recipe: build_trainer(recipe, args, data) for recipe in args.recipes}
    device = next(iter(trainers.values())).accelerator.device
    before = {recipe: trainer.compute.total for recipe, trainer in trainers.items()}
    runs = {recipe: steps(trainer, args.steps_per_round) for recipe, trainer in trainers.items()}
    split = {f"part: {k}": v for k, v in parts(trainers[COOPERATIVE]).items()} if COOPERATIVE in trainers else {}
    ms = measure_latencies_ms({**runs, **split}, device=device, warmup=args.warmup, repeats=args.repeats, grad=True)
    stepped = (args.warmup + args.repeats) * args.steps_per_round * args.batch_size  # images each recipe stepped on
    rows = {
        recipe: {
            "ms_per_step": ms[recipe] / args.steps_per_round,
            "gflops_per_image": (trainer.compute.total - before[recipe]) / stepped / 1e9,
        }
        for recipe, trainer in trainers.items()
    }
    return {
        "where": f"{args.model}, batch {args.batch_size} at {args.image_size} px, {describe_device(device)}, "
        f"mixed precision {args.mixed_precision}",
        "rounds": f"median of {args.repeats} interleaved rounds of {args.steps_per_round} steps after {args.warmup} "
        "warm-up rounds",
        "recipes": rows,
        "parts_ms": {k.removeprefix("part: "): v for k, v in ms.items() if k.startswith("part: ")},
    }


def markdown(result: dict[str, Any]) -> str:
    """The report: one row per recipe against the plain step, then the cooperative step against its parts."""
    rows, plain = result["recipes"], result["recipes"].get(PLAIN)
    lines = [f"## Training cost: {result['where']}", "", result["rounds"], ""]
    lines += [
        "| recipe | ms per step | vs plain step | training GFLOPs per image | vs plain FLOPs |",
        "|---|---|---|---|---|",
    ]
    for recipe, row in rows.items():
        time_ratio = f"{row['ms_per_step'] / plain['ms_per_step']:.2f}x" if plain else "-"
        flops_ratio = f"{row['gflops_per_image'] / plain['gflops_per_image']:.2f}x" if plain else "-"
        lines.append(
            f"| {recipe} | {row['ms_per_step']:.1f} | {time_ratio} | {row['gflops_per_image']:.3f} | {flops_ratio} |"
        )
    if result["parts_ms"]:
        lines += ["", f"| part of a {COOPERATIVE} step, each measured on its own | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["parts_ms"].items()]
        whole, part_sum = rows[COOPERATIVE]["ms_per_step"], sum(result["parts_ms"].values())
        ratio = whole / part_sum
        verdict = "meets" if ratio <= WASTE_TARGET else "misses"
        lines += [
            "",
            f"{COOPERATIVE} step {whole:.1f} ms vs the sum of its parts {part_sum:.1f} ms: {ratio:.3f}x ({verdict} "
            f"the target <= {WASTE_TARGET})",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="regnetx_002")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--warmup", type=int, default=2, help="rounds discarded before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    p.add_argument(
        "--steps-per-round", type=int, default=4, help="steps per timed call: a sampled depth is averaged over them"
    )
    p.add_argument("--json", default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    args.input_size = [3, args.image_size, args.image_size]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = measure(args)
    print("\n" + markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
