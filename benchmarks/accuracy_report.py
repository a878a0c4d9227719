"""The accuracy benchmark's results: one run per method and seed, the table, the JSON, the plot, and merging.

Kept apart from ``accuracy.py`` (which trains) so that runs made in separate processes or on separate machines
can be read back and reported together (``accuracy.py --merge``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptive_depth.report import pareto_plot
from adaptive_depth.training import DepthResult


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
    epochs: int = 0
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


def markdown(runs: list[Run], depths: list[float], plain_seconds: float | None = None) -> str:
    """Top-1 (mean ± std over seeds) per method and depth, the training time, and its ratio to plain fine-tuning."""
    table = summary(runs, depths)
    seconds = {m: statistics.mean(r.seconds for r in runs if r.method == m) for m in table}
    epochs = {m: statistics.mean(r.epochs for r in runs if r.method == m) for m in table}
    reference = plain_seconds or seconds.get("plain") or None
    head = " | ".join(f"s={s:g}" for s in depths)
    lines = [
        f"| method | {head} | epochs | training time (s) | vs plain |",
        "|---|" + "---|" * len(depths) + "---|---|---|",
    ]
    for method, cells in table.items():
        row = " | ".join(
            f"{cells[s][0]:.2f} ± {cells[s][1]:.2f}" if s in cells and cells[s][2] > 1 else
            (f"{cells[s][0]:.2f}" if s in cells else "-")
            for s in depths
        )  # fmt: skip
        ratio = f"{seconds[method] / reference:.2f}x" if reference and seconds[method] else "-"
        lines.append(f"| {method} | {row} | {epochs[method]:g} | {seconds[method]:.0f} | {ratio} |")
    return "\n".join(lines)


PER_PART = ("seeds", "methods", "output_dir", "merge")  # settings that may differ between the files of a merge


def read_reports(
    paths: list[Path], per_part: tuple[str, ...] = PER_PART
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON reports of runs made apart, and the settings they share.

    Raises:
        SystemExit: the files disagree on a setting other than those of ``per_part`` (their numbers would not be
            comparable).
    """
    reports: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for path in paths:
        report = json.loads(path.read_text(encoding="utf-8"))
        these = {k: v for k, v in report["settings"].items() if k not in per_part}
        if reports and these != settings:
            differ = sorted(k for k in these.keys() | settings.keys() if these.get(k) != settings.get(k))
            why = " (it started from other weights: a checkpoint made again is another network)" if (
                "start_weights" in differ) else ""  # fmt: skip
            raise SystemExit(
                f"{path} was run with other settings ({', '.join(differ)}){why}: its numbers do not compare"
            )
        reports.append(report)
        settings = these
    return reports, settings


def refuse_twice(keys: list[tuple[Any, ...]], what: str) -> None:
    """Raise SystemExit if a run appears in more than one of the merged files."""
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise SystemExit(f"{what} appear in more than one file: {twice}")


def load_runs(paths: list[Path]) -> tuple[list[Run], dict[str, Any], dict[int, float]]:
    """The runs, the shared settings and the r2 base times of several ``accuracy.json`` files.

    Raises:
        SystemExit: the files disagree on a setting other than the seeds, methods and output folder (their
            numbers would not be comparable), or a method and seed appears twice.
    """
    reports, settings = read_reports(paths)
    runs: list[Run] = []
    bases: dict[int, float] = {}
    for report in reports:
        bases.update({int(seed): seconds for seed, seconds in report.get("base_seconds", {}).items()})
        for raw in report["runs"]:
            per_depth = {k: {float(s): v for s, v in raw[k].items()} for k in ("top1", "gflops", "top1_deployed")}
            runs.append(Run(raw["method"], raw["seed"], seconds=raw["seconds"], epochs=raw["epochs"], **per_depth))
    refuse_twice([(r.method, r.seed) for r in runs], "method and seed")
    return runs, settings, bases


def write_report(
    output_dir: Path, runs: list[Run], settings: dict[str, Any], base_seconds: dict[int, float], minutes: float = 0
) -> None:
    """Print the table and write it (accuracy.md), the runs (accuracy.json) and the plot (accuracy.png)."""
    depths = sorted({s for r in runs for s in r.gflops})
    base = statistics.mean(base_seconds.values()) if base_seconds else None
    table = markdown(runs, depths, plain_seconds=base)
    regime = settings["regime"]
    start = {"r1": "from the checkpoint", "r2": f"from a plain fine-tune of {settings['base_epochs']} epochs"}[regime]
    title = (
        f"{settings['model']} ({settings['weights']}) on {settings['dataset_source']}, {regime} ({start}): top-1 (%) "
        f"on {settings['eval_images']} held-out images, seeds {settings['seeds']}, {settings['epochs']} epochs"
    )
    note = (
        f"\n\nThe plain fine-tune every r2 method starts from took {base:.0f} s (the 'vs plain' reference)."
        if base
        else ""
    )
    print(f"\n## {title}" + (f", {minutes:.1f} min" if minutes else "") + f"\n\n{table}{note}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "accuracy.md").write_text(f"{title}\n\n{table}{note}\n", encoding="utf-8")
    report = {"settings": settings, "base_seconds": base_seconds, "runs": [asdict(r) for r in runs]}
    (output_dir / "accuracy.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    gflops = {s: next(r.gflops[s] for r in runs if s in r.gflops) for s in depths}
    points = [
        {"player": method, "scaling_factor": s, "top1": mean, "gflops": gflops[s]}
        for method, cells in summary(runs, depths).items()
        for s, (mean, _, _) in cells.items()
    ]
    model = settings["model"].rsplit("/", 1)[-1]
    short = f"{model} on {settings['dataset_source']}, {regime}, {len(settings['seeds'])} seeds"
    pareto_plot(points, output_dir / "accuracy.png", title=short)
