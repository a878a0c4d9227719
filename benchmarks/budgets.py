"""Budget curves: accuracy at each depth against training compute, every method at every budget of a grid.

``accuracy.py --budgets 1 2 4 8 16`` runs this. A budget is training compute in epochs of plain fine-tuning (full
depth, forward and backward, over the training set), counted for every method the same way: FLOPs of the blocks
that ran (``adaptive_depth.training.compute``). Each (method, budget) is its own run whose schedule ends at that
budget (``TrainingConfig.compute_budget``): an early checkpoint of a longer run is not a budget-B result. Seeds are
paired: a seed gives every method the same initialisation, data order and augmentation draws.

A fixed teacher costs what it cost: in regime r1 it is a plain fine-tune given ``TEACHER_SHARE`` of the budget (the
plain run of that budget, reused), and its student gets the rest; in r2 it is the fine-tuned model every method starts
from, which the user already has (free). An EMA teacher needs no training. Wall time is measured beside the FLOPs.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from accuracy_report import read_reports, refuse_twice  # the sibling module (accuracy.py puts it on the path)

from adaptive_depth import ConfigError
from adaptive_depth.training.compute import plain_epoch_flops
from adaptive_depth.training.loaders import hold_out

__all__ = ["TEACHER_SHARE", "BudgetRun", "run_budgets", "write_budget_report"]

logger = logging.getLogger(__name__)

TEACHER_SHARE = 0.5  # r1: of a teacher-based method's budget, what its fixed teacher's plain fine-tune gets
SCHEDULE = {"warmup_ratio": 0.05, "distill_warmup_ratio": 0.1}  # every phase scales with the run's budget
PLOT_DEPTHS = (0.25, 0.5, 1.0)
BASE_POINT = "fine-tuned (cut)"  # r2's budget 0: the model every method of a seed starts from
PER_PART = ("seeds", "methods", "budgets", "output_dir", "merge")  # settings that may differ between merged files


@dataclass
class BudgetRun:
    """One method, one seed, one budget: top-1 per depth, the compute it used (in plain epochs) and its time."""

    method: str
    seed: int
    budget: float
    top1: dict[float, float] = field(default_factory=dict)
    compute: float = 0.0  # training FLOPs / FLOPs of one plain epoch (teacher training included in r1)
    seconds: float = 0.0
    steps: int = 0


def run_budgets(bench: Any, methods: list[str], budgets: list[float]) -> list[BudgetRun]:
    """Every method at every budget, over ``bench.args.seeds`` (``bench``: accuracy.py's :class:`Benchmark`)."""
    if "alone" in methods:
        raise SystemExit(
            "'alone' trains one network per depth: it has no single budget; leave it out of --budgets runs"
        )
    base = bench.base_config(0, {}, epochs=1, lr=bench.args.learning_rate)
    train, _ = hold_out(bench.data.train, base.loader_options["norm_check"])  # the images a run trains on
    bench.unit = plain_epoch_flops(bench.start(0, base, checkpoint=True), len(train))
    runs: list[BudgetRun] = []
    for seed in bench.args.seeds:
        plain_runs: dict[float, tuple[BudgetRun, Any]] = {}  # r1: plain fine-tunes, also the teachers
        if bench.args.regime == "r2":
            runs.append(_base_point(bench, seed))
        for budget in sorted(budgets):
            for method in sorted(methods, key=lambda m: m != "plain"):  # plain first: it may teach the others
                try:
                    run = _run(bench, method, seed, budget, plain_runs)
                except ConfigError as e:  # a budget below one step of this recipe: no point on its curve
                    logger.warning("%s seed %d budget %g: not run (%s)", method, seed, budget, e)
                    continue
                logger.info("%s seed %d budget %g: %s (%.2f plain epochs, %.0f s)", method, seed, budget,
                            {s: round(v, 2) for s, v in run.top1.items()}, run.compute, run.seconds)  # fmt: skip
                runs.append(run)
        runs += [run for budget, (run, _) in plain_runs.items() if budget not in budgets]  # teachers: more points
    return runs


def _base_point(bench: Any, seed: int) -> BudgetRun:
    """r2: the fine-tuned model every method starts from, cut to each depth (budget 0)."""
    bench._base(seed)
    result = bench.base_results[seed]
    return BudgetRun(BASE_POINT, seed, 0.0, _top1(bench, result), 0.0, 0.0, 0)


def _top1(bench: Any, result: Any) -> dict[float, float]:
    """Top-1 per depth, the mean over the run's Teammates."""
    return {s: statistics.mean(r.top1 for r in result.results if r.player != "leader" and r.scaling_factor == s)
            for s in bench.depths}  # fmt: skip


def _run(
    bench: Any, method: str, seed: int, budget: float, plain_runs: dict[float, tuple[BudgetRun, Any]]
) -> BudgetRun:
    """Train ``method`` with ``budget`` (its teacher first where it needs one) and score it."""
    from accuracy import METHODS, configs  # the sibling script's registry (imported there first)

    args = bench.args
    r1 = args.regime == "r1"
    overrides = {**SCHEDULE, **METHODS[method]}
    teacher_leader = overrides.get("leader") in ("frozen", "cached")
    spent, seconds, leader = 0.0, 0.0, None
    student_budget = budget
    if teacher_leader and r1:  # a plain fine-tune with a share of the budget teaches; its cost is counted
        teacher_run, teacher_model = _plain(bench, seed, budget * TEACHER_SHARE, plain_runs)
        spent, seconds = teacher_run.compute, teacher_run.seconds
        leader = teacher_model.export(1.0).eval()
        student_budget = budget - spent
    elif teacher_leader:
        leader = bench._base(seed).export(1.0).eval()  # the fine-tuned model: a teacher for free
    if method == "plain" and r1:
        return _plain(bench, seed, budget, plain_runs)[0]
    base = bench.base_config(seed, {}, epochs=1, lr=args.learning_rate)
    if overrides.get("leader") == "cached":
        overrides["leader_cache"] = str(
            args.output_dir / "caches" / f"{args.regime}-seed{seed}-teacher{budget}.safetensors"
        )
    [(config, _)] = configs(method, replace(base, **overrides, compute_budget=student_budget), bench.depths)
    result, elapsed = bench.train(config, seed, bench.depths, leader, checkpoint=r1)
    compute = spent + result.report.training_flops / bench.unit
    return BudgetRun(method, seed, budget, _top1(bench, result), compute, seconds + elapsed, result.report.steps)


def _plain(
    bench: Any, seed: int, budget: float, plain_runs: dict[float, tuple[BudgetRun, Any]]
) -> tuple[BudgetRun, Any]:
    """r1: the plain fine-tune of ``budget`` (run once per seed and budget, kept: it also teaches)."""
    from accuracy import METHODS

    if budget not in plain_runs:
        overrides = {**SCHEDULE, **METHODS["plain"], "compute_budget": budget}
        config = bench.base_config(seed, overrides, epochs=1, lr=bench.args.learning_rate)
        result, elapsed = bench.train(config, seed, bench.depths, checkpoint=True)
        run = BudgetRun("plain", seed, budget, _top1(bench, result), result.report.training_flops / bench.unit,
                        elapsed, result.report.steps)  # fmt: skip
        plain_runs[budget] = (run, copy.deepcopy(result.model))
    return plain_runs[budget]


# ---------------------------------------------------------------------------------------------------------- report
def _bootstrap(values: list[float], rounds: int = 2000) -> tuple[float, float]:
    """A 95% percentile bootstrap interval of the mean (resampling seeds)."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def curves(runs: list[BudgetRun]) -> dict[str, dict[float, dict[str, Any]]]:
    """Per method and budget: compute (mean), and per depth the mean top-1, its interval and the seeds."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run.method, {}).setdefault(run.budget, {"runs": []})["runs"].append(run)
    for per_budget in out.values():
        for cell in per_budget.values():
            rows = cell.pop("runs")
            cell["compute"] = statistics.mean(r.compute for r in rows)
            cell["seconds"] = statistics.mean(r.seconds for r in rows)
            cell["seeds"] = sorted(r.seed for r in rows)
            cell["top1"] = {s: (statistics.mean(v), *_bootstrap(v))
                            for s in rows[0].top1 if (v := [r.top1[s] for r in rows if s in r.top1])}  # fmt: skip
            cell["by_seed"] = {r.seed: r.top1 for r in rows}
    return out


def wins(runs: list[BudgetRun], reference: str, depth: float) -> dict[str, dict[float, float]]:
    """Per baseline and budget: the share of paired seeds in which ``reference`` is more accurate at ``depth``."""
    table = curves(runs)
    if reference not in table:
        return {}
    out: dict[str, dict[float, float]] = {}
    for method, per_budget in table.items():
        if method == reference:
            continue
        for budget, cell in per_budget.items():
            ref = table[reference].get(budget)
            if ref is None:
                continue
            pairs = [(ref["by_seed"][s][depth], cell["by_seed"][s][depth]) for s in cell["by_seed"]
                     if s in ref["by_seed"] and depth in cell["by_seed"][s]]  # fmt: skip
            if pairs:
                out.setdefault(method, {})[budget] = sum(a > b for a, b in pairs) / len(pairs)
    return out


def markdown(runs: list[BudgetRun], reference: str) -> str:
    """One table per budget: top-1 mean [95% interval] per method and depth, compute, time, wins of ``reference``."""
    table = curves(runs)
    depths = sorted({s for r in runs for s in r.top1})
    won = {s: wins(runs, reference, s) for s in (0.25, 0.5) if s in depths}
    lines = []
    for budget in sorted({r.budget for r in runs}):
        lines += [f"\n**Budget {budget:g}** (plain fine-tuning epochs of compute)\n",
                  "| method | " + " | ".join(f"s={s:g}" for s in depths) + " | compute | time (s) | "
                  + " | ".join(f"{reference} wins at s={s:g}" for s in won) + " |",
                  "|---|" + "---|" * (len(depths) + 2 + len(won))]  # fmt: skip
        for method, per_budget in table.items():
            cell = per_budget.get(budget)
            if cell is None:
                continue
            accs = " | ".join(_cell(cell["top1"].get(s)) for s in depths)
            share = " | ".join(_share(won[s].get(method, {}).get(budget)) if method != reference else "-" for s in won)
            lines.append(f"| {method} | {accs} | {cell['compute']:.2f} | {cell['seconds']:.0f} | {share} |")
    return "\n".join(lines)


def _cell(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "-"
    mean, lo, hi = value
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" if lo != hi else f"{mean:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def plot(runs: list[BudgetRun], path: Path, title: str) -> Path:
    """Top-1 at s = 0.25, 0.5 and 1 against training compute, one line per method, intervals as error bars."""
    from matplotlib.figure import Figure

    table = curves(runs)
    depths = [s for s in PLOT_DEPTHS if any(s in r.top1 for r in runs)]
    fig = Figure(figsize=(5 * len(depths), 4.5))
    axes = fig.subplots(1, len(depths), squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    for ax, s in zip(axes, depths):
        for i, (method, per_budget) in enumerate(table.items()):
            points = sorted((c["compute"], *c["top1"][s]) for b, c in per_budget.items() if b > 0 and s in c["top1"])
            start = per_budget.get(0.0)  # r2: the fine-tuned model every method starts from, as a level
            if start is not None and s in start["top1"]:
                ax.axhline(start["top1"][s][0], color="grey", linestyle=":", linewidth=1, label=method)
            if not points:
                continue
            x, y, lo, hi = zip(*points)
            errors = [[m - a for m, a in zip(y, lo)], [b - m for m, b in zip(y, hi)]]
            ax.errorbar(x, y, yerr=errors, label=method, marker="o", markersize=3, capsize=2,
                        linestyle=styles[i // 10 % 4], color=f"C{i % 10}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training compute (plain fine-tuning epochs of FLOPs)")
        ax.set_ylabel(f"top-1 (%) at s = {s:g}")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_budget_report(output_dir: Path, runs: list[BudgetRun], settings: dict[str, Any]) -> None:
    """Print the tables and write budgets.md, budgets.json and budgets.png into ``output_dir``."""
    reference = settings["reference"]  # --reference: the method whose wins are counted
    table = markdown(runs, reference)
    model = settings["model"].rsplit("/", 1)[-1]
    title = (f"{model} on {settings['dataset_source']}, {settings['regime']}, seeds {sorted({r.seed for r in runs})}: "
             f"top-1 (%) on {settings['eval_images']} held-out images, mean [95% bootstrap interval]")  # fmt: skip
    print(f"\n## {title}\n{table}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "budgets.md").write_text(f"{title}\n{table}\n", encoding="utf-8")
    report = {"settings": settings, "runs": [asdict(r) for r in runs]}
    (output_dir / "budgets.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot(runs, output_dir / "budgets.png", f"{model} on {settings['dataset_source']}, {settings['regime']}")


def is_budget_report(path: Path) -> bool:
    """Whether a JSON report was written by a budget-curve run (``--budgets``), whatever the file is called."""
    try:
        return bool(json.loads(path.read_text(encoding="utf-8"))["settings"].get("budgets"))
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{path} is not a report of benchmarks/accuracy.py ({error}): pass its JSON output") from error


def load_budget_runs(paths: list[Path]) -> tuple[list[BudgetRun], dict[str, Any]]:
    """The runs and settings of several ``budgets.json`` files (runs made apart: other seeds, methods, budgets)."""
    reports, settings = read_reports(paths, PER_PART)
    runs = [
        BudgetRun(**{**raw, "top1": {float(s): v for s, v in raw["top1"].items()}})
        for report in reports
        for raw in report["runs"]
    ]
    runs = _one_base_point_per_seed(runs)
    refuse_twice([(r.method, r.seed, r.budget) for r in runs], "method, seed and budget")
    return runs, settings


def _one_base_point_per_seed(runs: list[BudgetRun]) -> list[BudgetRun]:
    """r2: each file of a seed's runs (other methods, other budgets) carries that seed's starting model; keep it once.

    Every process fine-tunes a seed's starting model the same way, so its rows agree to the digit. Rows that differ
    mean the runs did not start from one model: they are not paired, and merging them is refused.
    """
    kept: list[BudgetRun] = []
    first: dict[int, BudgetRun] = {}
    for run in runs:
        if run.method != BASE_POINT:
            kept.append(run)
        elif run.seed not in first:
            first[run.seed] = run
            kept.append(run)
        elif run.top1 != first[run.seed].top1:
            raise SystemExit(
                f"seed {run.seed}'s starting model scores {first[run.seed].top1} in one file and {run.top1} in "
                "another: those runs did not start from the same fine-tuned model, so they are not paired; merge "
                "runs made with the same --base-epochs, --base-lr and code"
            )
    return kept
