"""The serving benchmark's numbers (benchmarks/serving.py): per policy and trace, its table and its plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["combine", "markdown", "plot", "summarise"]

# The serving targets, checked at the end of the table: the adaptive server keeps 99% of requests within the SLO
# where s = 1 keeps under 80%, serves 95% of light-load batches at s = 1, and its controller costs under 1% a batch.
ATTAINMENT_ADAPTIVE, ATTAINMENT_FULL, FULL_BATCHES_LIGHT, OVERHEAD = 0.99, 0.80, 0.95, 0.01


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def summarise(
    policy: str,
    trace: str,
    sent: list[Any],
    duration: float,
    slo_ms: float,
    accuracy: dict[float, float] | None,
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    """One policy on one trace: the summary row, and the timeline (due time, latency, depth) the plot draws.

    ``before`` / ``after``: the server's metrics around the trace, for what the client cannot see (batches per
    depth, batch sizes, the controller's time).
    """
    n = len(sent)
    answered = [s for s in sent if s.status == 200]
    on_time = [s for s in answered if s.latency * 1e3 <= slo_ms]
    latencies = np.array([s.latency * 1e3 for s in answered]) if answered else np.array([np.nan])
    depths = [s.depth for s in answered]
    batches = {
        float(m.group(1)): _delta(before, after, key)
        for key in after
        if (m := re.fullmatch(r'adaptive_depth_batches_total\{scaling_factor="([0-9.]+)"\}', key))
    }
    total_batches = sum(batches.values())
    batch_seconds = _delta(before, after, "adaptive_depth_batch_seconds_sum")
    summary = {
        "policy": policy,
        "trace": trace,
        "requests": n,
        "slo_attainment": len(on_time) / n if n else None,
        "goodput_rps": len(on_time) / duration,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "late": len(answered) - len(on_time),
        "dropped": n - len(answered),
        "effective_accuracy": (sum(accuracy[s.depth] for s in on_time) / n if accuracy is not None and n else None),
        "mean_depth": float(np.mean(depths)) if depths else None,
        "batches": total_batches,
        "batches_at_full_depth": batches.get(1.0, 0.0) / total_batches if total_batches else None,
        "mean_batch_size": _delta(before, after, "adaptive_depth_batch_size_sum") / total_batches
        if total_batches
        else None,
        "controller_overhead": _delta(before, after, "adaptive_depth_controller_seconds_sum") / batch_seconds
        if batch_seconds
        else None,
        # the worker's time in batches over the trace's: well below 1 with late answers, the model is not the
        # bottleneck (the HTTP process, the queues or the client are) and no depth can help
        "worker_busy": batch_seconds / duration,
    }
    timeline = [[round(s.due, 4), round(s.latency * 1e3, 2) if s.latency else None, s.depth] for s in sent]
    return {"summary": summary, "timeline": timeline}


def combine(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (trace, policy), in the order first met: the mean of each number over the repeats of a
    ``--repeats`` run (``None`` where none had it), with ``runs`` and the range of SLO attainment beside it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["summary"]["trace"], r["summary"]["policy"]), []).append(r["summary"])
    combined = []
    for rows in groups.values():
        row = dict(rows[0])
        for key, value in rows[0].items():
            values = [r[key] for r in rows if r.get(key) is not None]
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("repeat", "position"):
                row[key] = float(np.mean(values)) if values else None
        attained = [r["slo_attainment"] for r in rows if r["slo_attainment"] is not None]
        row |= {"runs": len(rows), "slo_attainment_range": (min(attained), max(attained)) if attained else None}
        combined.append(row)
    return combined


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _attainment(row: dict[str, Any]) -> str:
    """SLO attainment, with its range over repeats when there were several."""
    spread = row.get("slo_attainment_range")
    if row.get("runs", 1) > 1 and spread is not None:
        return f"{_pct(row['slo_attainment'])} ({100 * spread[0]:.1f}-{100 * spread[1]:.1f})"
    return _pct(row["slo_attainment"])


def markdown(data: dict[str, Any]) -> str:
    """The table of every policy on every trace (the mean over repeats), and the targets, met or not."""
    head = (
        "| trace | policy | SLO attainment | goodput (req/s) | p50 / p95 / p99 (ms) | late | dropped | "
        "effective accuracy | mean depth | batches at s = 1 | mean batch | controller / batch |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in combine(data["results"]):
        accuracy = "n/a" if r["effective_accuracy"] is None else f"{r['effective_accuracy']:.2f}"
        depth = "-" if r["mean_depth"] is None else f"{r['mean_depth']:.2f}"
        batch = "-" if r["mean_batch_size"] is None else f"{r['mean_batch_size']:.1f}"
        overhead = "-" if r["controller_overhead"] is None else f"{100 * r['controller_overhead']:.2f}%"
        rows.append(
            f"| {r['trace']} | {r['policy']} | {_attainment(r)} | {r['goodput_rps']:.1f} | "
            f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} | {r['late']:.0f} | {r['dropped']:.0f} | "
            f"{accuracy} | {depth} | {_pct(r['batches_at_full_depth'])} | {batch} | {overhead} |"
        )
    runs = data.get("repeats", 1)
    note = [f"(mean of {runs} repeats, the servers' order rotated each time; SLO attainment: mean (range))", ""]
    return "\n".join([*(note if runs > 1 else []), head, *rows, "", *targets(data)])


def targets(data: dict[str, Any]) -> list[str]:
    """The serving targets, each with the measured numbers and whether it was met (none where the run left out
    the adaptive server, s = 1 or the smallest depth: ``--policies``); over repeats, on their means."""
    by = {(r["trace"], r["policy"]): r for r in combine(data["results"])}
    smallest = next((p for t, p in by if t == "ramp" and p not in ("s=1", "set_budget", "adaptive")), None)
    if smallest is None or not {("ramp", "adaptive"), ("ramp", "s=1")} <= set(by):
        return ["- targets: not judged (the run compared a subset of the policies)"]
    ramp_a, ramp_1, ramp_min = by[("ramp", "adaptive")], by[("ramp", "s=1")], by[("ramp", smallest)]
    lines = [
        f"- ramp to 2x capacity: SLO attainment adaptive {_pct(ramp_a['slo_attainment'])} (target >= 99%), "
        f"s = 1 {_pct(ramp_1['slo_attainment'])} (target < 80%): "
        + _met(ramp_a["slo_attainment"] >= ATTAINMENT_ADAPTIVE and ramp_1["slo_attainment"] < ATTAINMENT_FULL),
    ]
    if ramp_a["effective_accuracy"] is not None:
        lines.append(
            f"- ramp: effective accuracy adaptive {ramp_a['effective_accuracy']:.2f} against s = 1 "
            f"{ramp_1['effective_accuracy']:.2f} and {smallest} {ramp_min['effective_accuracy']:.2f}: "
            + _met(ramp_a["effective_accuracy"] > max(ramp_1["effective_accuracy"], ramp_min["effective_accuracy"]))
        )
    else:
        lines.append("- ramp: effective accuracy not measured (random weights: the model has no accuracy)")
    light = by[("light", "adaptive")]["batches_at_full_depth"]
    lines.append(f"- half capacity: {_pct(light)} of the adaptive batches at s = 1 (target >= 95%): " + _met(
        light is not None and light >= FULL_BATCHES_LIGHT
    ))  # fmt: skip
    overheads = [by[(t, "adaptive")]["controller_overhead"] or 0.0 for t in ("light", "ramp", "burst")]
    lines.append(
        f"- controller time per batch: at most {100 * max(overheads):.3f}% of the batch's (target < 1%): "
        + _met(max(overheads) < OVERHEAD)
    )
    return lines


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def plot(data: dict[str, Any], path: Path) -> Path:
    """Load, latency and depth against time, every policy, on the ramp and the burst (the first repeat); saved to
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = ("ramp", "burst")
    fig, axes = plt.subplots(3, len(traces), figsize=(12, 8), sharex="col", squeeze=False)
    colours = dict(zip(dict.fromkeys(r["summary"]["policy"] for r in data["results"]), plt.cm.tab10.colors))
    for col, trace in enumerate(traces):
        results = [r for r in data["results"] if r["summary"]["trace"] == trace and not r["summary"].get("repeat")]
        duration = data["durations"][trace]
        width = max(1.0, duration / 30)  # about 30 bins: enough requests in each to read a rate
        bins = np.arange(0.0, duration + width, width)
        load, latency, depth = axes[0][col], axes[1][col], axes[2][col]
        due = np.array([t[0] for t in results[0]["timeline"]])
        load.step(bins[:-1], np.histogram(due, bins)[0] / width, where="post", color="black", label="offered")
        load.axhline(data["capacity_rps"], color="grey", linestyle="--", label="capacity at s = 1")
        for r in results:
            policy, timeline = r["summary"]["policy"], r["timeline"]
            colour = colours[policy]
            answered = [t for t in timeline if t[1] is not None]
            on_time = [t[0] for t in answered if t[1] <= data["slo_ms"]]
            goodput = np.histogram(on_time, bins)[0] / width
            load.step(bins[:-1], goodput, where="post", color=colour, linewidth=0.8, label=f"{policy} on time")
            latency.scatter([t[0] for t in answered], [t[1] for t in answered], s=2, color=colour, alpha=0.4)
            with_depth = np.array([(t[0], t[2]) for t in answered if t[2] is not None])
            if len(with_depth):
                sums = np.histogram(with_depth[:, 0], bins, weights=with_depth[:, 1])[0]
                counts = np.histogram(with_depth[:, 0], bins)[0]
                depth.step(bins[:-1], np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), where="post",
                           color=colour, label=policy)  # fmt: skip
        latency.axhline(data["slo_ms"], color="red", linestyle=":", label="SLO")
        latency.set_yscale("log")
        load.set_title(f"{trace}: {data['model']}, SLO {data['slo_ms']:g} ms")
        load.set_ylabel("requests/s")
        latency.set_ylabel("latency (ms)")
        depth.set_ylabel("mean depth s of answers")
        depth.set_xlabel("time (s)")
        depth.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=7)
    axes[2][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # draw the table and plot again from a run's JSON
    import argparse
    import json

    parser = argparse.ArgumentParser(description="table and plot of a benchmarks/serving.py run")
    parser.add_argument("results", type=Path, help="the JSON that benchmarks/serving.py wrote")
    parser.add_argument("--plot", type=Path, help="where to draw the plot (default: none)")
    options = parser.parse_args()
    run = json.loads(options.results.read_text())
    print(markdown(run))
    if options.plot:
        print(plot(run, options.plot))
