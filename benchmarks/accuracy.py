"""Accuracy benchmark: the cooperative method against its ablations and every baseline (issue 4, part 2).

Same data, model, epochs and optimiser for every method; every method evaluated at every scaling factor with the
same per-depth BatchNorm recalibration, in one run; output as a Markdown table (mean and spread over seeds), a
JSON file and an accuracy-vs-FLOPs plot.

    python benchmarks/accuracy.py                                   # digits, regnetx_002, 10 epochs, seeds 0 1
    python benchmarks/accuracy.py --methods cooperative random-depth plain --seeds 0
    python benchmarks/accuracy.py --model resnet50 --dataset imagefolder:PATH --image-size 224 --epochs 10  # GPU

Methods (each a TrainingConfig of the same trainer, see docs/benchmarks.md):
    cooperative        the full method (Leader, two Teammates, self + interactive + guided learning, SFSL)
    no-leader          ablation: no guided learning
    one-teammate       ablation: no interactive learning
    no-sfsl            ablation: every depth weighted equally
    sandwich           cheaper mode: the smallest and top depth plus one random depth per step (not in the default)
    frozen-leader      cheaper mode: the Leader trained first on its own, then a fixed teacher (not in the default)
    frozen-leader-cached   the same, its logits computed once before training (not in the default)
    (no per-depth BN)  ablation read off the cooperative run: accuracy with the statistics of training
    plain              the full network fine-tuned alone, then cut to depth s
    random-depth       LayerDrop-style: a random subset of blocks skipped at each step
    two-path           ADN-style: full network on labels, the smallest one distilled from it
    alone              each depth fine-tuned on its own (one run per depth)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from adaptive_depth.model import pretrained_or_random
from adaptive_depth.report import pareto_plot
from adaptive_depth.training import (
    CooperativeTrainer,
    DepthResult,
    TrainingConfig,
    load_image_classification_data,
    make_loaders,
)

SINGLE = {"leader": "none", "interactive": False}  # one network, no peers
METHODS: dict[str, dict[str, Any]] = {
    "cooperative": {},
    "no-leader": {"leader": "none"},
    "one-teammate": {"interactive": False},
    "no-sfsl": {"sfsl_gamma": 0.0},
    "sandwich": {"sampled_depths": 1},  # cheaper: smallest and top depth plus one random depth per step
    "frozen-leader": {"leader": "frozen"},  # cheaper: the Leader trained first (plain), then fixed
    "frozen-leader-cached": {"leader": "frozen", "cache_leader_logits": True},  # ...and run once, before training
    "plain": {"scaling_factors": [1.0], **SINGLE},
    "random-depth": {"scaling_factors": [1.0], "layer_drop": 0.5, **SINGLE},
    "two-path": {"sub_ce_weight": 0.0, "warmup_epochs": 0.0, **SINGLE},  # scaling factors: smallest and 1
    "alone": {"full_depth": False, **SINGLE},  # one run per depth
}
NO_BN = "cooperative, no per-depth BN"
# The comparison (under 30 minutes on 2 CPU cores); the cheaper modes on request.
CHEAPER = ("sandwich", "frozen-leader", "frozen-leader-cached")
DEFAULT_METHODS = [m for m in METHODS if m not in CHEAPER]


@dataclass
class Run:
    """One method, one seed: top-1 per depth, GFLOPs per depth, and the training wall time.

    ``top1`` is the mean over the method's Teammates: the trainer deploys the better one by accuracy on the held-out
    set, and reporting that maximum on the same set would favour two-Teammate methods. ``top1_deployed`` keeps it.
    """

    method: str
    seed: int
    top1: dict[float, float] = field(default_factory=dict)
    gflops: dict[float, float] = field(default_factory=dict)
    seconds: float = 0.0
    top1_deployed: dict[float, float] = field(default_factory=dict)


def teammate_scores(results: list[DepthResult], deployed: str, depths: list[float]) -> dict[str, dict[float, float]]:
    """Per depth: the Teammates' mean top-1, the deployed one's, their mean with training BN statistics, and GFLOPs."""
    scores: dict[str, dict[float, float]] = {"top1": {}, "deployed": {}, "trained_norms": {}, "gflops": {}}
    for s in depths:
        at_s = [r for r in results if r.player != "leader" and r.scaling_factor == s]
        scores["top1"][s] = statistics.mean(r.top1 for r in at_s)
        scores["deployed"][s] = next(r.top1 for r in at_s if r.player == deployed)
        scores["gflops"][s] = at_s[0].gflops
        trained_norms = [r.top1_trained_norms for r in at_s if r.top1_trained_norms is not None]
        if trained_norms:
            scores["trained_norms"][s] = statistics.mean(trained_norms)
    return scores


def configs(method: str, base: TrainingConfig, depths: list[float]) -> list[tuple[TrainingConfig, list[float]]]:
    """The training configs of a method, in order, and the depths each is evaluated at.

    A frozen-Leader method first trains its Leader (the "plain" config, evaluated at full depth only).
    """
    overrides = dict(METHODS[method])
    if method == "alone":
        return [(replace(base, **overrides, scaling_factors=[s]), [s]) for s in depths if s < 1.0]
    if method == "two-path":
        overrides["scaling_factors"] = [min(depths), 1.0]
    if overrides.get("leader") == "frozen":
        return [(replace(base, **METHODS["plain"]), [1.0]), (replace(base, **overrides), depths)]
    return [(replace(base, **overrides), depths)]


def run_method(method: str, seed: int, args: argparse.Namespace, data: Any) -> list[Run]:
    """Train and evaluate one method with one seed (two runs for the cooperative: with and without per-depth BN)."""
    base = TrainingConfig(
        scaling_factors=args.scaling_factors, epochs=args.epochs, learning_rate=args.learning_rate,
        batch_size=args.batch_size, seed=seed, **args.set,
    )  # fmt: skip
    depths = base.scaling_factors
    run, no_bn = Run(method, seed), Run(NO_BN, seed)
    leader = None  # a frozen Leader, trained by the first config of a frozen-Leader method
    for config, eval_depths in configs(method, base, depths):
        set_seed(seed)
        model = pretrained_or_random(
            args.model, weights=args.weights, seed=seed, num_classes=data.num_classes,
            scaling_factors=config.scaling_factors, input_size=args.input_size, policy=args.policy,
        )  # fmt: skip
        loaders = make_loaders(
            data, model, batch_size=config.batch_size, seed=seed, input_size=model.config.input_size,
            with_index=config.cache_leader_logits,
        )  # fmt: skip
        trainer = CooperativeTrainer(
            model, config, loaders.train, loaders.eval, accelerator=Accelerator(), leader=leader,
            num_classes=data.num_classes, top5=False, recalibration_loader=loaders.recalibration,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        run.seconds += time.perf_counter() - start  # a frozen Leader's own training is part of the cost
        result = trainer.evaluate(latency=False, scaling_factors=eval_depths)
        if METHODS[method].get("leader") == "frozen" and config.leader == "none":
            leader = result.model.export(1.0).eval()  # the trained Leader, as a plain network
            continue
        scores = teammate_scores(result.results, result.deployed, eval_depths)
        run.top1.update(scores["top1"])
        run.top1_deployed.update(scores["deployed"])
        run.gflops.update(scores["gflops"])
        no_bn.top1.update(scores["trained_norms"])
        no_bn.gflops.update({s: scores["gflops"][s] for s in scores["trained_norms"]})
        logging.info("%s seed %d: %s (%.0f s)", method, seed, run.top1, run.seconds)
    if method == "alone":  # the full depth "alone" is the plain full network
        run.top1[1.0] = float("nan")
    if method == "cooperative":
        no_bn.seconds = run.seconds
        return [run, no_bn]
    return [run]


def summary(runs: list[Run], depths: list[float]) -> dict[str, dict[float, tuple[float, float, int]]]:
    """Per method and depth: mean top-1, standard deviation over seeds, number of seeds."""
    table: dict[str, dict[float, tuple[float, float, int]]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        rows = [r for r in runs if r.method == method]
        table[method] = {}
        for s in depths:
            values = [r.top1[s] for r in rows if s in r.top1 and r.top1[s] == r.top1[s]]  # NaN: not trained
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                table[method][s] = (statistics.mean(values), spread, len(values))
    return table


def markdown(runs: list[Run], depths: list[float]) -> str:
    """Top-1 (mean ± std over seeds) per method and depth, the training time, and the gap to the plain network."""
    table = summary(runs, depths)
    seconds = {m: statistics.mean(r.seconds for r in runs if r.method == m) for m in table}
    head = " | ".join(f"s={s:g}" for s in depths)
    lines = [f"| method | {head} | training time (s) |", "|---|" + "---|" * len(depths) + "---|"]
    for method, cells in table.items():
        row = " | ".join(
            f"{cells[s][0]:.2f} ± {cells[s][1]:.2f}" if s in cells and cells[s][2] > 1 else
            (f"{cells[s][0]:.2f}" if s in cells else "-")
            for s in depths
        )  # fmt: skip
        lines.append(f"| {method} | {row} | {seconds[method]:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="regnetx_002")
    p.add_argument("--weights", choices=["auto", "pretrained", "random"], default="auto")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scaling-factors", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--policy", choices=["last", "spread"], default="last", help="which blocks a stage drops first")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="TrainingConfig fields for every method, e.g. temperature=4 sfsl_gamma=2 (values parsed as JSON)",
    )
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--output-dir", type=Path, default=Path("out/benchmarks/accuracy"))
    args = p.parse_args(argv)
    args.input_size = [3, args.image_size, args.image_size]
    args.set = dict(_field(item, p) for item in args.set)
    return args


def _field(item: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """``FIELD=VALUE`` of ``--set``: a TrainingConfig field and its JSON value (a bare word is a string)."""
    name, sep, raw = item.partition("=")
    known = {f.name for f in fields(TrainingConfig)}
    if not sep or name not in known:
        parser.error(f"--set takes FIELD=VALUE with FIELD one of {sorted(known)}, got {item!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def main(argv: list[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_image_classification_data(
        args.dataset, seed=0, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples
    )
    start = time.perf_counter()
    runs = [r for seed in args.seeds for method in args.methods for r in run_method(method, seed, args, data)]
    depths = sorted(set(args.scaling_factors) | {1.0})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(runs, depths)
    title = f"{args.model} on {data.source}: top-1 (%) on {len(data.eval)} held-out images, seeds {args.seeds}"
    print(f"\n## {title}, {args.epochs} epochs, {(time.perf_counter() - start) / 60:.1f} min\n\n{table}")
    (args.output_dir / "accuracy.md").write_text(f"{title}\n\n{table}\n", encoding="utf-8")
    (args.output_dir / "accuracy.json").write_text(json.dumps([asdict(r) for r in runs], indent=2), encoding="utf-8")
    points = [
        {
            "player": method,
            "scaling_factor": s,
            "top1": mean,
            "gflops": next(r.gflops[s] for r in runs if s in r.gflops),
        }
        for method, cells in summary(runs, depths).items()
        for s, (mean, _, _) in cells.items()
    ]
    pareto_plot(points, args.output_dir / "accuracy.png", title=title.split(":")[0])
    return runs


if __name__ == "__main__":
    main()
