"""Export benchmark: one ONNX file with every trained depth against one file per depth, in onnxruntime.

For each model, in one run: the size of the all-depth file (``save_export(dir, "all")``), of the full-depth file and
of every per-depth file (``save_export(dir, s, format="onnx")``); onnxruntime latency (CPU) of the all-depth file at
each trained depth against that depth's own file, timed in interleaved rounds (every round runs every file at every
depth once; medians after warm-up), so a busy spell of a shared machine touches every candidate alike; the latency
ratio at s = 0.5 against the FLOPs ratio. Targets (printed at the end, met or not): the all-depth file at most 1.1x
the full-depth file; its latency at every depth within 10% of that depth's own file; its latency ratio at s = 0.5
within 10% of the FLOPs ratio.

    python benchmarks/export.py                                       # resnet50, vit_small_patch16_224; batch 1, 16
    python benchmarks/export.py --models resnet18 --batch-sizes 1 --repeats 5 --image-size 64    # quick

Weights are random (none can be downloaded here; costs do not depend on them). A trained model carries per-depth
BatchNorm statistics, which the all-depth file selects by its depth input: BatchNorm weights are set to one (timm
initialises the last of each block to zero, which makes every depth's statistics the same) and the statistics
recalibrated on random images at every depth, unless ``--no-norms``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from adaptive_depth import AdaptiveDepth
from adaptive_depth.latency import measure_latencies_ms
from adaptive_depth.norms import batchnorm_layers

SIZE_TARGET = 1.10  # all-depth file / full-depth file
LATENCY_TARGET = 1.10  # all-depth file / that depth's own file, at each depth
RATIO_TARGET = 1.10  # latency ratio / FLOPs ratio at s = 0.5


def build(name: str, image_size: int, norms: bool) -> AdaptiveDepth:
    """A timm model with random weights, made adaptive at ``image_size``, with per-depth statistics if ``norms``."""
    torch.manual_seed(0)
    model = AdaptiveDepth.from_pretrained(name, pretrained=False, input_size=(3, image_size, image_size)).eval()
    if norms and batchnorm_layers(model.model):
        for layer in batchnorm_layers(model.model).values():
            torch.nn.init.ones_(layer.weight)
        model.recalibrate_norms([torch.randn(8, 3, image_size, image_size) for _ in range(2)])
    return model.eval()


def session(path: Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session with ``threads`` intra-op threads and warnings silenced."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Export ``name`` both ways, then sizes and interleaved latencies at every depth and batch size."""
    model = build(name, args.image_size, not args.no_norms)
    factors = model.config.scaling_factors
    all_dir = model.save_export(root / f"{name}-all", "all")
    own_dirs = {s: model.save_export(root / f"{name}-s{s}", s, format="onnx") for s in factors}
    sizes = {"all": (all_dir / "model.onnx").stat().st_size} | {
        s: (d / "model.onnx").stat().st_size for s, d in own_dirs.items()
    }
    flops = {s: model.flops(s) for s in factors}
    one = session(all_dir / "model.onnx", args.threads)
    own = {s: session(d / "model.onnx", args.threads) for s, d in own_dirs.items()}
    latency: dict[int, dict[str, dict[float, float]]] = {}
    for batch in args.batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, args.image_size, args.image_size), dtype=np.float32)
        runs = {}
        for i, s in enumerate(factors):
            feeds = {"pixel_values": x, "depth_index": np.array(i)}
            runs[f"all@{s}"] = lambda feeds=feeds: one.run(None, feeds)
            runs[f"own@{s}"] = lambda s=s, feeds={"pixel_values": x}: own[s].run(None, feeds)
        ms = measure_latencies_ms(runs, device=torch.device("cpu"), warmup=args.warmup, repeats=args.repeats)
        latency[batch] = {kind: {s: ms[f"{kind}@{s}"] for s in factors} for kind in ("all", "own")}
    return {
        "model": name,
        "per_depth_norms": bool(model.config.norm_stats),
        "blocks": {s: model.depth_for(s) for s in factors},
        "size_bytes": sizes,
        "flops": flops,
        "latency_ms": latency,
    }


def report(result: dict[str, Any]) -> list[str]:
    """Markdown tables of one model's result, and a line per target saying whether it is met."""
    sizes, flops, factors = result["size_bytes"], result["flops"], sorted(result["flops"])
    full = max(factors)
    mb = {k: v / 1e6 for k, v in sizes.items()}
    per_depth_total = sum(mb[s] for s in factors)
    lines = [
        f"### {result['model']} (per-depth BatchNorm statistics: {'yes' if result['per_depth_norms'] else 'no'})",
        "",
        f"Files: all-depth {mb['all']:.1f} MB; full-depth {mb[full]:.1f} MB (ratio {mb['all'] / mb[full]:.3f}); "
        f"one file per depth {per_depth_total:.1f} MB in all ({' + '.join(f'{mb[s]:.1f}' for s in factors)}).",
        "",
        "| batch | s | blocks | FLOPs ratio | own file ms | all-depth file ms | all / own | all-depth latency ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = [("size", mb["all"] / mb[full] <= SIZE_TARGET, f"all-depth / full-depth size {mb['all'] / mb[full]:.3f}")]
    for batch, kinds in result["latency_ms"].items():
        own, one = kinds["own"], kinds["all"]
        for s in factors:
            lines.append(
                f"| {batch} | {s} | {result['blocks'][s]} | {flops[s] / flops[full]:.3f} | {own[s]:.2f} | {one[s]:.2f} "
                f"| {one[s] / own[s]:.3f} | {one[s] / one[full]:.3f} |"
            )
            checks.append(
                (f"batch {batch} s={s}", one[s] / own[s] <= LATENCY_TARGET, f"all / own {one[s] / own[s]:.3f}")
            )
        if 0.5 in one:
            ratio = (one[0.5] / one[full]) / (flops[0.5] / flops[full])
            checks.append((f"batch {batch} ratio", abs(ratio - 1) <= RATIO_TARGET - 1, f"latency / FLOPs {ratio:.3f}"))
    lines.append("")
    lines += [f"- {'met' if ok else 'NOT met'}: {what}: {detail}" for what, ok, detail in checks]
    return [*lines, ""]


def main() -> None:
    """Parse the command line, measure every model and print the tables (and optionally write the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-norms", action="store_true", help="no per-depth BatchNorm statistics")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(measure(name, args, Path(tmp)))
            print("\n".join(report(results[-1])), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
