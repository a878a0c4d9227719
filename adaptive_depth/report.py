"""What a training run reports, typed: each player's accuracy and cost per depth, and the run itself.

:class:`TrainingReport` is stored in a saved model's ``config.json`` (``extra["training"]``) and read back by the
model card; :func:`results_markdown` and :func:`pareto_plot` render its table (Markdown) and plot (PNG).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["DepthResult", "TrainingReport", "pareto_plot", "published_dataset_name", "results_markdown"]


@dataclass
class DepthResult:
    """One player at one depth.

    Args:
        player: ``"A"``, ``"B"`` or ``"leader"``.
        scaling_factor: the depth.
        top1, top5: accuracy in percent (``top5`` is ``None`` with 5 classes or fewer).
        top1_trained_norms: top-1 with the BatchNorm statistics of training, before per-depth recalibration.
        gflops: of one forward pass on one image.
        latency_ms: median, batch 1, on the evaluation device.
    """

    player: str
    scaling_factor: float
    top1: float
    top5: float | None = None
    top1_trained_norms: float | None = None
    gflops: float | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass
class TrainingReport:
    """A finished training run, as saved with the deployed model.

    Args:
        config: the training configuration (``TrainingConfig.to_dict()``).
        deployed: the Teammate saved as the model (``"A"`` or ``"B"``).
        results: every player at every depth.
        loss_per_epoch: mean training loss of each epoch.
        steps: optimizer steps taken.
        processes: processes that trained it (data parallel).
        wall_time_s: training, evaluation and saving, in seconds (set by the script that ran it).
        dataset: what it was trained on, as it may be published (:func:`published_dataset_name`: a Hub id, an
            embedded dataset's name, or only the name of a local folder).
        eval_split: where the accuracies were measured: the evaluation split's name, or ``"<train split> (held
            out)"``.
        training_flops: training compute, every process: forward + backward of what learned, forwards of what
            taught (``adaptive_depth.training.compute``).
        norms_kept: per Teammate and depth, the BatchNorm statistics kept after the held-out check:
            ``"recalibrated"`` or ``"training"`` (``None``: no check).
    """

    config: dict[str, Any]
    deployed: str
    results: list[DepthResult]
    loss_per_epoch: list[float] = field(default_factory=list)
    steps: int = 0
    processes: int = 1
    wall_time_s: float | None = None
    dataset: str | None = None
    eval_split: str | None = None
    training_flops: float | None = None
    norms_kept: dict[str, dict[str, str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``config.extra["training"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingReport:
        """Read what :meth:`to_dict` wrote; keys of a newer version are ignored."""
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["results"] = [r if isinstance(r, DepthResult) else DepthResult(**r) for r in values["results"]]
            return cls(**values)
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"invalid training report in config.json (extra.training): {e}") from e

    def table(self) -> str:
        """The per-depth table as Markdown, the one the model card shows."""
        return results_markdown([r.to_dict() for r in self.results], self.deployed)

    @property
    def has_costs(self) -> bool:
        """True if FLOPs were counted (there is something to plot)."""
        return any(r.gflops is not None for r in self.results)


def published_dataset_name(spec: str) -> str:
    """What a model card and ``config.json`` may say about a training dataset: a local folder by its name only.

    ``imagefolder:/home/me/photos`` is ``imagefolder:photos`` and a local dataset folder ``/data/shop`` is ``shop``,
    so a pushed model does not publish where its data lies on the training machine; a Hub id or an embedded
    dataset's name is kept as it is.
    """
    if spec.startswith("imagefolder:"):
        return "imagefolder:" + Path(spec.removeprefix("imagefolder:")).expanduser().resolve().name
    path = Path(spec).expanduser()
    if path.is_absolute() or spec.startswith((".", "~")) or path.exists():
        return path.resolve().name if path.exists() else path.name
    return spec


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

    players = sorted({r["player"] for r in results}, key=lambda p: (p == "leader", p))
    many = len(players) > 10  # beyond matplotlib's ten colours: a wider palette, line styles, the legend outside
    fig = Figure(figsize=(8.5, 4.5) if many else (5.5, 4), dpi=120)
    ax = fig.subplots()
    if many:
        from matplotlib import colormaps

        palette = colormaps["tab20"].colors
        ax.set_prop_cycle(color=[palette[i % len(palette)] for i in range(len(players))])
    for i, player in enumerate(players):
        rows = sorted(
            (r for r in results if r["player"] == player and r.get("gflops") is not None), key=lambda r: r["gflops"]
        )
        if not rows:
            continue
        xs, ys = [r["gflops"] for r in rows], [r["top1"] for r in rows]
        ax.plot(
            xs,
            ys,
            marker="o" if len(rows) > 1 else "*",
            markersize=6 if len(rows) > 1 else 12,
            linestyle=("-", "--", ":")[i % 3] if many else "-",
            label=player,
        )
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
    if many:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
