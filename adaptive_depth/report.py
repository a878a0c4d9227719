"""Training report of a saved model: the per-depth table (Markdown) and the accuracy-vs-FLOPs Pareto plot (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_NAME", "pareto_plot", "results_markdown"]

PLOT_NAME = "pareto.png"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_markdown(results: Sequence[dict[str, Any]], deployed: str | None = None) -> str:
    """A Markdown table of ``DepthResult.to_dict()`` rows."""
    lines = [
        "| player | s | top-1 (%) | top-5 (%) | top-1 with training BN stats (%) | GFLOPs | latency (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"**{r['player']}** (deployed)" if r["player"] == deployed else r["player"]
        lines.append(
            f"| {name} | {r['scaling_factor']:g} | {_fmt(r['top1'], '.2f')} | {_fmt(r.get('top5'), '.2f')} | "
            f"{_fmt(r.get('top1_trained_norms'), '.2f')} | {_fmt(r.get('gflops'), '.4f')} | "
            f"{_fmt(r.get('latency_ms'), '.2f')} |"
        )
    return "\n".join(lines)


def pareto_plot(results: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Top-1 accuracy against GFLOPs, one line per player, written as a PNG with matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend and open figures stay untouched

    fig = Figure(figsize=(5.5, 4), dpi=120)
    ax = fig.subplots()
    players = sorted({r["player"] for r in results}, key=lambda p: (p == "leader", p))
    for player in players:
        rows = sorted(
            (r for r in results if r["player"] == player and r.get("gflops") is not None), key=lambda r: r["gflops"]
        )
        if not rows:
            continue
        xs, ys = [r["gflops"] for r in rows], [r["top1"] for r in rows]
        ax.plot(xs, ys, marker="o" if len(rows) > 1 else "*", markersize=6 if len(rows) > 1 else 12, label=player)
        for r in rows if len(players) <= 4 else ():  # beyond a few lines the labels hide the points
            ax.annotate(
                f"s={r['scaling_factor']:g}",
                (r["gflops"], r["top1"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, -9),
            )
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs cost at each depth")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
