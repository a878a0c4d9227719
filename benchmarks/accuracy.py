"""Accuracy benchmark: the cooperative method against its variants and every baseline, where users start.

Two regimes, one run each (``--regime``):

- **r1**, a pretrained checkpoint fine-tuned on a new task: every method starts from ``--model`` (``--weights``).
- **r2**, a model already fine-tuned on its task made depth-adaptive: a plain fine-tune comes first (``--base-epochs``,
  its time reported), then every method starts from it, head included (its Leader is that model).

Every method is trained with the same data, model, optimiser and epochs, evaluated at every scaling factor with the
same per-depth BatchNorm recalibration, in one run, over several seeds; random depth and two-path are also run with
the wall time of the cooperative method (more epochs), so a method that costs more is compared at equal compute too.
Output: a Markdown table (mean ± std over seeds, training time, ratio to plain fine-tuning), a JSON file and a plot.

    python benchmarks/pretrain.py                                                 # the offline pretrained checkpoint
    HF_HUB_OFFLINE=1 python benchmarks/accuracy.py --model hf-hub:adaptive-depth-offline/regnetx_002.fractal256_32px \\
        --weights pretrained --dataset digits-cluttered --regime r1 --seeds 0 1 2
    python benchmarks/accuracy.py --methods cooperative random-depth plain --seeds 0   # from random weights, on digits

Budget curves (``--budgets``, benchmarks/budgets.py): every method at each training-compute budget, in epochs of
plain fine-tuning FLOPs, each run's schedule ending at its budget; top-1 per depth with 95% bootstrap intervals over
paired seeds, the share of seeds in which ``--reference`` wins, and a plot of top-1 at s = 0.25 / 0.5 / 1 against
compute; runs made apart (one process per seed) merge with ``--merge .../budgets.json``:

    HF_HUB_OFFLINE=1 python benchmarks/accuracy.py --model hf-hub:adaptive-depth-offline/regnetx_002.fractal256_32px \
        --weights pretrained --dataset digits-cluttered --regime r1 --budgets 1 2 4 8 16 --seeds 0 \
        --output-dir out/budgets/r1-seed0

Methods (each a TrainingConfig of the same trainer; see docs/benchmarks.md):
    cooperative        the cooperative method: a joint Leader and one Teammate, every depth every step (the default
                       of TrainingConfig until the budget curves; "default" in runs saved before)
    paper              the paper's configuration: a joint Leader, two Teammates on the same batches
    one-teammate       the cooperative method with one Teammate (no interactive learning)
    views, streams     two Teammates on their own augmentation of the same images / on their own images and order
    sandwich           the cooperative method with the sandwich rule (smallest, top and one random depth per step)
    inplace-sandwich   one network, sandwich rule, sub-networks taught by the full depth only (US-Nets / Once-for-All)
    frozen-leader      a fixed teacher: in r1 trained plainly first (its time counted), in r2 the fine-tuned model
    frozen-sandwich    the same fixed teacher, with the sandwich rule
    no-leader, no-sfsl ablations of the cooperative method; "(no per-depth BN)" is read off its run
    plain              the full network fine-tuned alone, then cut to depth s
    random-depth       LayerDrop-style: a random subset of blocks skipped at each step
    random-depth-kd    the same, also distilled from the frozen-leader teacher (labels and teacher, one pass a step)
    random-depth-nested one nested depth a step (as deployed), the smallest drawn half the time, the full a quarter:
                       TrainingConfig() as a user gets it
    nested-smallest-quarter the same with the smallest depth drawn a quarter of the time (the earlier default)
    nested-smallest-three-quarters  the same with the smallest depth drawn in three steps of four (the top in the rest)
    nested-top-half    the same with the full depth drawn half the time and the smallest a quarter (the blocks only
                       the full depth runs train in half the steps, as with random depth): --recipe auto's pick from
                       64 epochs of compute
    cooperative-sampled the cooperative method with the full depth and one sampled sub-network a step
    distill            one nested depth a step, labels and a fixed teacher run without gradients on the same batch
    distill-cached     the same teacher's outputs made once for 4 augmentation draws per image (no teacher pass)
    distill-ema        one nested depth a step taught by the EMA of itself at full depth, from a quarter of training
    two-path           ADN-style: full network on labels, the smallest one distilled from it
    alone              each depth fine-tuned on its own (one run per depth)
    random-depth@wall, two-path@wall, random-depth-kd@wall   the same with the cooperative method's training time
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from adaptive_depth import AdaptiveDepth
from adaptive_depth.model import pretrained_or_random
from adaptive_depth.training import (
    CooperativeTrainer,
    TrainingConfig,
    accelerator_kwargs,
    load_image_classification_data,
    make_loaders,
)
from adaptive_depth.training.recipes import COOPERATIVE, DEFAULT_RECIPE, RECIPES
from adaptive_depth.training.teacher_cache import weights_digest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when imported by path in tests
from accuracy_report import Run, load_runs, teammate_scores, write_report
from budgets import BudgetRun, is_budget_report, load_budget_runs, run_budgets, write_budget_report

SINGLE = {"train_depths": "all", "leader": "none", "interactive": False}  # one network, no peers, every depth
METHODS: dict[str, dict[str, Any]] = {
    "cooperative": RECIPES["cooperative"].overrides,
    "paper": RECIPES["paper"].overrides,
    "one-teammate": COOPERATIVE,
    "views": {**COOPERATIVE, "interactive": True, "teammate_data": "views"},
    "streams": {**COOPERATIVE, "interactive": True, "teammate_data": "streams"},
    "sandwich": RECIPES["sandwich"].overrides,  # cooperative, with the smallest, the top and one random depth
    "inplace-sandwich": {"sampled_depths": 1, "sub_ce_weight": 0.0, **SINGLE},
    "frozen-leader": {**COOPERATIVE, "leader": "frozen"},
    "frozen-sandwich": RECIPES["frozen-sandwich"].overrides,
    "frozen-leader-cached": {**COOPERATIVE, "leader": "cached"},
    "no-leader": {**COOPERATIVE, "leader": "none"},
    "no-sfsl": {**COOPERATIVE, "sfsl_gamma": 0.0},
    "plain": RECIPES["plain"].overrides,  # trained at full depth only, cut to (and recalibrated at) every depth
    "random-depth": RECIPES["random-depth"].overrides,
    "random-depth-kd": {**RECIPES["random-depth"].overrides, "leader": "frozen"},  # and a fixed teacher's logits
    **{
        name: RECIPES[name].overrides
        for name in (
            "random-depth-nested",
            "nested-top-half",
            "cooperative-sampled",
            "distill",
            "distill-cached",
            "distill-ema",
        )
    },  # one pass a step (a teacher's forward without gradients at most), or cooperative with one sub-network
    "nested-smallest-quarter": {**RECIPES["random-depth-nested"].overrides, "smallest_share": 0.25},  # earlier default
    "nested-smallest-three-quarters": {**RECIPES["random-depth-nested"].overrides, "smallest_share": 0.75},
    "two-path": {"sub_ce_weight": 0.0, "distill_warmup_epochs": 0.0, **SINGLE},  # scaling factors: smallest and 1
    "alone": {"full_depth": False, **SINGLE},  # one run per depth
}
WALL = "@wall"  # suffix: the baseline again with the cooperative method's training time
AT_WALL = ("random-depth", "two-path", "random-depth-kd")
NO_BN = "cooperative, no per-depth BN"
DEFAULT_METHODS = [
    "cooperative", "paper", "streams", "sandwich", "plain", "random-depth", "two-path", "alone",
    "random-depth@wall", "two-path@wall",
]  # fmt: skip
CHOICES = [*METHODS, *(m + WALL for m in AT_WALL)]
CHEAPER = ("frozen-leader-cached",)  # on request only
BUDGET_METHODS = [
    "plain", "random-depth", "random-depth-nested", "two-path", "cooperative", "cooperative-sampled", "distill",
    "distill-cached", "distill-ema",
]  # fmt: skip


def configs(method: str, base: TrainingConfig, depths: list[float]) -> list[tuple[TrainingConfig, list[float]]]:
    """The training configs of a method, in order, and the depths each is evaluated at.

    A frozen-Leader method of regime r1 first trains its Leader (the "plain" config, evaluated at full depth only).
    """
    overrides = dict(METHODS[method.removesuffix(WALL)])
    if method == "alone":
        return [(replace(base, **overrides, scaling_factors=[s]), [s]) for s in depths if s < 1.0]
    if method.startswith("two-path"):
        overrides["scaling_factors"] = [min(depths), 1.0]
    return [(replace(base, **overrides), depths)]


class Benchmark:
    """One regime over seeds: each method trained and scored the same way (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, data: Any) -> None:
        self.args, self.data = args, data
        # r2: the plain fine-tune every method starts from, its result and its training time, per seed
        self.bases: dict[int, AdaptiveDepth] = {}
        self.base_results: dict[int, Any] = {}
        self.base_seconds: dict[int, float] = {}

    @property
    def depths(self) -> list[float]:
        """The depths every method is scored at."""
        return sorted(set(self.args.scaling_factors) | {1.0})

    def start(self, seed: int, config: TrainingConfig, *, checkpoint: bool) -> AdaptiveDepth:
        """A fresh model to train: the checkpoint itself, or (r2) a copy of its plain fine-tune."""
        if not checkpoint:
            model = copy.deepcopy(self._base(seed))
            model.reset_norms()  # trained further: its per-depth statistics are estimated again at the end
            model.config.scaling_factors = list(config.scaling_factors)
            return model
        return pretrained_or_random(
            self.args.model, weights=self.args.weights, seed=seed, num_classes=self.data.num_classes,
            scaling_factors=config.scaling_factors, input_size=self.args.input_size, policy=self.args.policy,
        )  # fmt: skip

    def start_digest(self) -> str:
        """The identity of the weights every run starts from (seed 0's build of ``--model``, new head included):
        reports with different digests refuse to merge."""
        return weights_digest(
            self.start(0, self.base_config(0, {}, epochs=1, lr=self.args.learning_rate), checkpoint=True)
        )

    def train(
        self, config: TrainingConfig, seed: int, eval_depths: list[float], leader: Any = None, *, checkpoint: bool
    ) -> tuple[Any, float]:
        """Train one config from the checkpoint or its fine-tune; returns the trainer's result and the seconds.

        The result's report holds the run's training FLOPs (``report.training_flops``).
        """
        set_seed(seed)
        model = self.start(seed, config, checkpoint=checkpoint)
        loaders = make_loaders(self.data, model, **config.loader_options, input_size=model.config.input_size)
        trainer = CooperativeTrainer(
            model, config, loaders.train, loaders.eval, accelerator=Accelerator(**accelerator_kwargs(config)),
            leader=leader, num_classes=self.data.num_classes, top5=False, recalibration_loader=loaders.recalibration,
            norm_check_loader=loaders.norm_check,
        )  # fmt: skip
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        return trainer.evaluate(latency=False, scaling_factors=eval_depths), seconds

    def _base(self, seed: int) -> AdaptiveDepth:
        """r2: the plain fine-tune of the checkpoint (``--base-epochs``), once per seed."""
        if seed not in self.bases:
            config = self.base_config(seed, METHODS["plain"], epochs=self.args.base_epochs, lr=self.args.base_lr)
            result, seconds = self.train(config, seed, self.depths, checkpoint=True)
            self.bases[seed], self.base_results[seed], self.base_seconds[seed] = result.model, result, seconds
        return self.bases[seed]

    def base_config(self, seed: int, overrides: dict[str, Any], *, epochs: int, lr: float) -> TrainingConfig:
        return TrainingConfig(
            **{"scaling_factors": self.args.scaling_factors, "epochs": epochs, "learning_rate": lr,
               "batch_size": self.args.batch_size, "seed": seed, **self.args.set, **overrides}
        )  # fmt: skip

    def run_method(self, method: str, seed: int, done: dict[str, Run]) -> list[Run]:
        """Train and evaluate one method with one seed (cooperative also reports its accuracy without per-depth BN)."""
        args = self.args
        checkpoint = args.regime == "r1"
        epochs = args.epochs
        if method.endswith(WALL):  # as many epochs as the cooperative method's time buys this baseline
            plain = done[method.removesuffix(WALL)]
            epochs = max(1, round(args.epochs * done["cooperative"].seconds / plain.seconds))
        base = self.base_config(seed, {}, epochs=epochs, lr=args.learning_rate)
        run, no_bn = Run(method, seed, epochs=epochs), Run(NO_BN, seed, epochs=epochs)
        if args.regime == "r2" and method == "plain":  # the fine-tuned model itself, cut to each depth
            self._base(seed)
            return [self._score(run, self.base_results[seed], self.depths, None)]
        leader = None
        if METHODS[method.removesuffix(WALL)].get("leader") in ("frozen", "cached"):
            if args.regime == "r2":
                leader = self._base(seed).export(1.0).eval()  # the fine-tuned model: a teacher for free
            else:  # trained plainly first, its time counted
                result, seconds = self.train(replace(base, **METHODS["plain"]), seed, [1.0], checkpoint=True)
                leader, run.seconds = result.model.export(1.0).eval(), seconds
        for config, eval_depths in configs(method, base, self.depths):
            result, seconds = self.train(config, seed, eval_depths, leader, checkpoint=checkpoint)
            run.seconds += seconds
            self._score(run, result, eval_depths, no_bn)
        if method == "alone":  # the full depth "alone" is the plain full network
            run.top1[1.0] = float("nan")
        logging.info("%s seed %d: %s (%.0f s, %d epochs)", method, seed, run.top1, run.seconds, epochs)
        if method == "cooperative":
            no_bn.seconds = run.seconds
            return [run, no_bn]
        return [run]

    @staticmethod
    def _score(run: Run, result: Any, depths: list[float], no_bn: Run | None) -> Run:
        scores = teammate_scores(result.results, result.deployed, depths)
        run.top1.update(scores["top1"])
        run.top1_deployed.update(scores["deployed"])
        run.gflops.update(scores["gflops"])
        if no_bn is not None:
            no_bn.top1.update(scores["trained_norms"])
            no_bn.gflops.update({s: scores["gflops"][s] for s in scores["trained_norms"]})
        return run

    def run(self) -> list[Run]:
        """Every method over every seed, in the order their dependencies need."""
        runs = []
        for seed in self.args.seeds:
            done: dict[str, Run] = {}
            # the cooperative method first, and each baseline before its @wall run (their times set its epochs)
            order = sorted(self.args.methods, key=lambda m: (m != "cooperative", m.endswith(WALL)))
            for method in order:
                for r in self.run_method(method, seed, done):
                    done[r.method] = r
                    runs.append(r)
        return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="regnetx_002")
    p.add_argument("--weights", choices=["auto", "pretrained", "random"], default="auto")
    p.add_argument("--regime", choices=["r1", "r2"], default="r1", help="r1: from the checkpoint; r2: fine-tuned first")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scaling-factors", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--base-epochs", type=int, default=10, help="r2: epochs of the plain fine-tune first")
    p.add_argument("--base-lr", type=float, default=None, help="r2: its learning rate (default: --learning-rate)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", choices=CHOICES, default=None, help="default: the table's or the curves'")
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="budget curves: train every method at each training-compute budget, in plain fine-tuning epochs of FLOPs "
        "(e.g. 1 2 4 8 16; each run's schedule ends at its budget; benchmarks/budgets.py)",
    )
    p.add_argument(
        "--reference", default=DEFAULT_RECIPE, help="budget curves: the method whose wins over each are counted"
    )
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
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="train nothing: one table from the accuracy.json of runs made apart (e.g. one process per seed)",
    )
    args = p.parse_args(argv)
    args.input_size = [3, args.image_size, args.image_size]
    args.set = dict(_field(item, p) for item in args.set)
    args.base_lr = args.base_lr or args.learning_rate
    if args.methods is None:
        args.methods = BUDGET_METHODS if args.budgets else DEFAULT_METHODS
    if args.budgets and any(m.endswith(WALL) for m in args.methods):
        p.error("--budgets gives every method the same compute already: leave the @wall methods out")
    try:  # a bad value fails here, before any data is read
        probe = replace(TrainingConfig(scaling_factors=args.scaling_factors), **args.set)
    except (TypeError, ValueError) as e:
        p.error(f"--set: {e}")
    for method in args.methods:
        baseline = method.removesuffix(WALL)
        if method.endswith(WALL) and ("cooperative" not in args.methods or baseline not in args.methods):
            p.error(f"{method} needs 'cooperative' and {baseline!r} in --methods (their times set its epochs)")
        for config, _ in configs(method, probe, args.scaling_factors):  # what the method trains, --set applied
            clash = {k: getattr(config, k) for k in args.set if getattr(config, k) != getattr(probe, k)}
            if clash:  # the method's own fields win over --set: say so instead of running something else
                p.error(
                    f"--set {', '.join(f'{k}={args.set[k]!r}' for k in clash)} would be overridden by method "
                    f"{method!r}, which sets {clash}; leave that method out, or add a method row with the value "
                    "(as 'nested-smallest-quarter' does)"
                )
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


def main(argv: list[str] | None = None) -> list[Run] | list[BudgetRun]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.merge:
        return merge(args)
    data = load_image_classification_data(
        args.dataset, seed=0, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples
    )
    start = time.perf_counter()
    bench = Benchmark(args, data)
    settings = {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    settings |= {"dataset_source": data.source, "eval_images": len(data.eval), "start_weights": bench.start_digest()}
    if args.budgets:
        budget_runs = run_budgets(bench, args.methods, args.budgets)
        write_budget_report(args.output_dir, budget_runs, settings)
        return budget_runs
    runs = bench.run()
    write_report(args.output_dir, runs, settings, bench.base_seconds, minutes=(time.perf_counter() - start) / 60)
    return runs


def merge(args: argparse.Namespace) -> list[Run] | list[BudgetRun]:
    """``--merge``: one report from the JSON files of separate runs (same settings, other seeds)."""
    kinds = {is_budget_report(path) for path in args.merge}
    if len(kinds) > 1:
        raise SystemExit("--merge got budget-curve reports (--budgets) and epoch reports together: merge each apart")
    if kinds == {True}:
        budget_runs, settings = load_budget_runs(args.merge)
        write_budget_report(args.output_dir, budget_runs, {**settings, "reference": args.reference})
        return budget_runs
    runs, settings, bases = load_runs(args.merge)
    settings["seeds"] = sorted({r.seed for r in runs})
    write_report(args.output_dir, runs, settings, bases)
    return runs


if __name__ == "__main__":
    main()
