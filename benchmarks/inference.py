"""Inference cost benchmark: does skipping depth really save time?

For each model, at every trained scaling factor and every batch size, in one run: measured latency (median of
interleaved rounds after warm-up), FLOPs (torch.utils.flop_counter), parameters actually used, and the ratios
``latency(s) / latency(1)`` against ``FLOPs(s) / FLOPs(1)``; the wrapper at s = 1 against the unwrapped model;
the exported plain model of each depth against the gated model at that depth; the time of
``set_scaling_factor`` (and that it moves no weight); and ``torch.compile`` across depth switches.

    python benchmarks/inference.py                                  # the five models below, CPU
    python benchmarks/inference.py --device cuda --json gpu.json    # the same on a GPU
    python benchmarks/inference.py --models resnet50 --batch-sizes 1 --repeats 5 --compile none   # quick

Weights are random (none can be downloaded here): costs do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from adaptive_depth import AdaptiveDepth
from adaptive_depth.budget import describe_device
from adaptive_depth.latency import measure_latencies_ms

TIMM_MODELS = ("resnet50", "convnext_tiny", "vit_small_patch16_224")
HF_MODELS = ("hf-resnet-50", "hf-vit-base")

# What the switch promises, checked and printed at the end of the run: latency falls with FLOPs, the wrapper costs
# next to nothing at full depth, and switching depth takes microseconds.
LATENCY_VS_FLOPS_TARGET = 1.10  # latency ratio / FLOPs ratio at s = 0.5
WRAPPER_OVERHEAD_TARGET = 0.02  # at s = 1
SWITCH_US_TARGET = 50.0


def build(name: str) -> AdaptiveDepth:
    """A depth-switchable model with random weights: a timm name, or one of the transformers models above."""
    if name == "hf-resnet-50":
        from transformers import ResNetConfig, ResNetForImageClassification

        return AdaptiveDepth.wrap(ResNetForImageClassification(ResNetConfig(num_labels=1000)))
    if name == "hf-vit-base":
        from transformers import ViTConfig, ViTForImageClassification

        return AdaptiveDepth.wrap(ViTForImageClassification(ViTConfig(num_labels=1000)))
    return AdaptiveDepth.wrap(timm.create_model(name, pretrained=False))


@dataclass
class DepthCost:
    """Costs of one model at one depth and batch size."""

    scaling_factor: float
    batch_size: int
    blocks: list[int]
    gflops: float  # per image
    params_m: float  # parameters of the blocks that run (the exported model)
    latency_ms: float
    export_latency_ms: float
    latency_ratio: float = 0.0
    flops_ratio: float = 0.0


@dataclass
class ModelReport:
    """Everything measured for one model."""

    model: str
    plain_latency_ms: dict[int, float] = field(default_factory=dict)  # per batch size
    depths: list[DepthCost] = field(default_factory=list)
    switch_us: float = 0.0
    weights_moved: bool = False
    compile: dict[str, Any] | None = None

    def overhead(self, batch_size: int) -> float:
        """Wrapper at s = 1 relative to the unwrapped model, minus one."""
        full = next(d for d in self.depths if d.batch_size == batch_size and d.scaling_factor == 1.0)
        return full.latency_ms / self.plain_latency_ms[batch_size] - 1.0


def switch_cost(model: AdaptiveDepth, switches: int = 10_000) -> tuple[float, bool]:
    """Microseconds per ``set_scaling_factor`` cycling through the trained depths, and whether any weight moved."""
    before = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    depths = model.config.scaling_factors
    start = time.perf_counter()
    for i in range(switches):
        model.set_scaling_factor(depths[i % len(depths)])
    elapsed = (time.perf_counter() - start) / switches * 1e6
    model.set_scaling_factor(1.0)
    after = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    return elapsed, before != after


def compile_check(model: AdaptiveDepth, x: torch.Tensor, passes: int = 3) -> dict[str, Any]:
    """``torch.compile`` the model, switch through every trained depth ``passes`` times, count compiled graphs.

    Dynamo guards on the gates' flags: the first pass compiles one graph per distinct depth; later passes must
    reuse them. Outputs are checked against eager mode at every depth.
    """
    from torch._dynamo.utils import counters  # the graph counter PyTorch's own tests read

    torch._dynamo.reset()
    compiled = torch.compile(model)
    graphs_per_pass, max_error = [], 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(passes):
            before = counters["stats"]["unique_graphs"]
            for s in model.config.scaling_factors:
                model.set_scaling_factor(s)
                out, ref = compiled(x), model(x)
                out, ref = getattr(out, "logits", out), getattr(ref, "logits", ref)
                max_error = max(max_error, (out - ref).abs().max().item())
            graphs_per_pass.append(counters["stats"]["unique_graphs"] - before)
    model.set_scaling_factor(1.0)
    distinct = len({tuple(model.depth_for(s)) for s in model.config.scaling_factors})
    return {
        "graphs_per_pass": graphs_per_pass,
        "distinct_depths": distinct,
        "max_abs_error_vs_eager": max_error,
        "seconds": time.perf_counter() - start,
    }


def _runs(
    model: AdaptiveDepth, plain: nn.Module, exported: dict[float, nn.Module], x: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    """One forward pass each: the unwrapped model, the gated model at every depth, the exported model of each."""

    def gated(s: float) -> Callable[[], Any]:
        return lambda: model.set_scaling_factor(s)(x)

    def export(m: nn.Module) -> Callable[[], Any]:
        return lambda: m(x)

    runs: dict[str, Callable[[], Any]] = {"plain": export(plain)}
    for s, m in exported.items():
        runs[f"s={s}"] = gated(s)
        runs[f"export s={s}"] = export(m)
    return runs


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> ModelReport:
    """Measure one model at every trained depth and batch size."""
    model = build(name).to(device).eval()
    plain = model.export(1.0)  # the unwrapped model: the same weights, no gates
    exported = {s: model.export(s).eval() for s in model.config.scaling_factors}
    report = ModelReport(name)
    flops = {s: model.flops_table()[s] / 1e9 for s in model.config.scaling_factors}
    params = {s: sum(p.numel() for p in m.parameters()) / 1e6 for s, m in exported.items()}
    for batch in args.batch_sizes:
        runs = _runs(model, plain, exported, model.example_input(batch))
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 2)
        ms = measure_latencies_ms(runs, device=device, warmup=args.warmup, repeats=repeats)
        report.plain_latency_ms[batch] = ms["plain"]
        for s in model.config.scaling_factors:
            gated, export = ms[f"s={s}"], ms[f"export s={s}"]
            cost = DepthCost(s, batch, model.depth_for(s), flops[s], params[s], gated, export)
            cost.latency_ratio, cost.flops_ratio = gated / ms["s=1.0"], flops[s] / flops[1.0]
            report.depths.append(cost)
        logging.info("%s batch %d: %s", name, batch, {k: round(v, 2) for k, v in ms.items()})
    model.set_scaling_factor(1.0)
    report.switch_us, report.weights_moved = switch_cost(model)
    if name in args.compile:
        report.compile = compile_check(model, model.example_input(1))
    # A sanity check that the plain model is the same network: equal outputs at full depth.
    with torch.inference_mode():
        x = model.example_input(2)
        out, ref = model.set_scaling_factor(1.0)(x), plain(x)
        if not torch.allclose(getattr(out, "logits", out), getattr(ref, "logits", ref), atol=1e-4):
            raise RuntimeError(f"{name}: the wrapped model at s=1 does not compute what the unwrapped one does")
    return report


def markdown(reports: list[ModelReport]) -> str:
    """The per-depth table and the targets."""
    lines = [
        "| model | batch | s | blocks | GFLOPs | params (M) | latency (ms) | export (ms) | latency ratio | "
        "FLOPs ratio | latency / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for d in r.depths:
            lines.append(
                f"| {r.model} | {d.batch_size} | {d.scaling_factor:g} | {d.blocks} | {d.gflops:.3f} | "
                f"{d.params_m:.1f} | {d.latency_ms:.2f} | {d.export_latency_ms:.2f} | {d.latency_ratio:.3f} | "
                f"{d.flops_ratio:.3f} | {d.latency_ratio / d.flops_ratio:.3f} |"
            )
    lines += [
        "",
        f"| model | batch | latency/FLOPs ratio at s=0.5 (target <= {LATENCY_VS_FLOPS_TARGET}) | wrapper overhead at "
        f"s=1 (target < {WRAPPER_OVERHEAD_TARGET:.0%}) | export / gated at s=0.5 | set_scaling_factor (us, target < "
        f"{SWITCH_US_TARGET:g}) | weights moved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for batch in r.plain_latency_ms:
            half = next((d for d in r.depths if d.batch_size == batch and d.scaling_factor == 0.5), None)
            ratio = f"{half.latency_ratio / half.flops_ratio:.3f}" if half else "-"
            export = f"{half.export_latency_ms / half.latency_ms:.3f}" if half else "-"
            lines.append(
                f"| {r.model} | {batch} | {ratio} | {r.overhead(batch):+.1%} | {export} | {r.switch_us:.1f} | "
                f"{r.weights_moved} |"
            )
    compiled = [r for r in reports if r.compile]
    if compiled:
        lines += ["", "| model | torch.compile graphs per pass over the trained depths | distinct depths | "
                  "max abs error vs eager | seconds |", "|---|---|---|---|---|"]  # fmt: skip
        for r in compiled:
            c = r.compile or {}
            lines.append(
                f"| {r.model} | {c['graphs_per_pass']} | {c['distinct_depths']} | "
                f"{c['max_abs_error_vs_eager']:.2e} | {c['seconds']:.0f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=[*TIMM_MODELS, *HF_MODELS], help="timm names, hf-resnet-50, hf-vit-base"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2, help="rounds discarded before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds at batch 1 (half, at least 3, above)")
    p.add_argument("--compile", nargs="*", default=["resnet50"], help="models to check with torch.compile ('none')")
    p.add_argument("--json", default=None, help="also write every number to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[ModelReport]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    where = f"{describe_device(device)}, torch {torch.__version__}, {platform.python_implementation()}"
    print(f"inference benchmark on {where}")
    reports = [bench_model(name, args, device) for name in args.models]
    print(f"\n## Inference costs ({where})\n")
    print(markdown(reports))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": where, "reports": [asdict(r) for r in reports]}, f, indent=2)
    return reports


if __name__ == "__main__":
    main()
