"""Training cost benchmark: what one cooperative step costs, and whether any of it is waste.

In one run, on one batch: the time of a full cooperative optimisation step (forward of every player at every depth,
the objective, one backward, clipping, AdamW) against the sum of its parts measured separately (a forward and
backward of each network at each depth on its own cross-entropy, and the optimizer step), and against a plain
fine-tuning step of one network. The cheaper modes are measured alongside: a frozen Leader (no Leader backward),
no Leader, one Teammate, and the sandwich rule (fewer depths per step).

    python benchmarks/training_cost.py                         # regnetx_002, digits batch 64 at 32 px, CPU
    python benchmarks/training_cost.py --model resnet50 --image-size 224 --batch-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from adaptive_depth.budget import describe_device
from adaptive_depth.latency import measure_latencies_ms
from adaptive_depth.model import pretrained_or_random
from adaptive_depth.training import CooperativeTrainer, TrainingConfig, load_image_classification_data, make_loaders
from adaptive_depth.training.players import logits_of

SINGLE = {"leader": "none", "interactive": False}
MODES: dict[str, dict[str, Any]] = {
    "cooperative": {},
    "frozen Leader": {"leader": "frozen"},
    "frozen Leader, cached logits": {"leader": "cached"},
    "no Leader": {"leader": "none"},
    "one Teammate": {"interactive": False},
    "sandwich (smallest, top + 1 random depth)": {"sampled_depths": 1},
    "plain (one network, full depth)": {"scaling_factors": [1.0], **SINGLE},
}
WASTE_TARGET = 1.15


def _step(trainer: CooperativeTrainer, batch: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    return lambda: trainer.training_step(*batch[:2], ramp=1.0, indices=batch[2])


def _forward_backward(
    network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, depth: float | None
) -> Callable[[], Any]:
    """One network at one depth on its own cross-entropy: a forward and a backward pass."""

    def run() -> None:
        if depth is not None:
            network.set_scaling_factor(depth)
        F.cross_entropy(logits_of(network(images)), labels).backward()

    return run


def parts(trainer: CooperativeTrainer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The separately timed parts of a cooperative step: each network at each depth, and the optimizer step."""
    runs: dict[str, Callable[[], Any]] = {}
    if trainer.leader is not None and trainer.config.leader == "joint":
        runs["part: Leader"] = _forward_backward(trainer.leader, images, labels, None)
    for name, teammate in zip("AB", trainer.teammates):
        for s in trainer.config.scaling_factors:
            runs[f"part: {name} s={s:g}"] = _forward_backward(teammate, images, labels, s)

    def optimizer_step() -> None:
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    runs["part: optimizer"] = optimizer_step
    return runs


def build_trainer(mode: str, args: argparse.Namespace, data: Any) -> CooperativeTrainer:
    """A trainer of one mode on the digits loaders (weights are random: the cost does not depend on them)."""
    config = TrainingConfig(batch_size=args.batch_size, **MODES[mode])
    model = pretrained_or_random(
        args.model, weights="random", seed=0, num_classes=data.num_classes, input_size=args.input_size
    )
    leader = model.export(1.0) if config.leader in ("frozen", "cached") else None  # any trained one costs the same
    loaders = make_loaders(data, model, **config.loader_options, input_size=args.input_size)
    trainer = CooperativeTrainer(
        model, config, loaders.train, accelerator=Accelerator(cpu=args.device == "cpu"), leader=leader,
        recalibration_loader=loaders.recalibration,
    )  # fmt: skip
    if config.leader == "cached":
        trainer.make_leader_cache()  # once, before training: not part of a step
    trainer.module.train()
    return trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="regnetx_002")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    args.input_size = [3, args.image_size, args.image_size]
    logging.basicConfig(level=logging.WARNING)
    data = load_image_classification_data("digits", seed=0)
    trainers = {mode: build_trainer(mode, args, data) for mode in MODES}
    device = trainers["cooperative"].accelerator.device
    batch = tuple(t.to(device) for t in next(iter(trainers["cooperative"].train_loader)))
    images, labels = batch[:2]
    runs = {mode: _step(trainer, batch) for mode, trainer in trainers.items()}
    runs |= parts(trainers["cooperative"], images, labels)
    ms = measure_latencies_ms(runs, device=device, warmup=args.warmup, repeats=args.repeats, grad=True)

    plain = ms["plain (one network, full depth)"]
    part_sum = sum(v for k, v in ms.items() if k.startswith("part: "))
    print(
        f"\n## Training cost: {args.model}, batch {args.batch_size} at {args.image_size} px, {describe_device(device)}"
    )
    print(f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds\n")
    print("| mode | ms per step | vs plain step |\n|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {ms[mode]:.1f} | {ms[mode] / plain:.2f}x |")
    print("\n| part of a cooperative step | ms |\n|---|---|")
    for key, value in ms.items():
        if key.startswith("part: "):
            print(f"| {key.removeprefix('part: ')} | {value:.1f} |")
    ratio = ms["cooperative"] / part_sum
    verdict = "meets" if ratio <= WASTE_TARGET else "misses"
    print(
        f"\ncooperative step {ms['cooperative']:.1f} ms vs the sum of its parts {part_sum:.1f} ms: {ratio:.3f}x "
        f"({verdict} the target <= {WASTE_TARGET})"
    )
    return ms


if __name__ == "__main__":
    main()
