"""Export benchmark: one ONNX file with every trained depth against one file per depth, in onnxruntime.

For each model, in one run: the size of the all-depth file (``save_export(dir, "all")``), of the full-depth file and
of every per-depth file (``save_export(dir, s, format="onnx")``); onnxruntime latency (CPU, one thread) of the
all-depth file at each trained depth against that depth's own file, timed in interleaved rounds (every round runs
every file at every depth once; medians after warm-up); the latency ratio at s = 0.5 against the FLOPs ratio.
Targets (printed at the end, met or not): the all-depth file at most 1.1x the full-depth file; its latency at every
depth within 10% of that depth's own file; its latency ratio at s = 0.5 within 10% of the FLOPs ratio.

    python benchmarks/export.py                                       # resnet50, vit_small_patch16_224; batch 1, 16
    python benchmarks/export.py --models resnet18 --batch-sizes 1 --repeats 5 --image-size 64    # quick

Latency is the CPU time of the one thread onnxruntime runs on (``time.thread_time``), and wall time beside it: on a
machine shared with other work, wall time also counts the time the process waits for a core, which CPU time does
not (memory bandwidth shared with other processes still slows both).

Weights are random (none can be downloaded here; costs do not depend on them). A trained model carries per-depth
BatchNorm statistics, which the all-depth file selects by its depth input: BatchNorm weights are set to one (timm
initialises the last of each block to zero, which makes every depth's statistics the same) and the statistics
recalibrated on random images at every depth. For a model with BatchNorm the all-depth file of the same model
without per-depth statistics (every depth with the statistics of training, which onnxruntime folds into the
convolutions) is timed too, to separate the cost of selecting statistics from the cost of the depth input.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from adaptive_depth import AdaptiveDepth
from adaptive_depth.norms import batchnorm_layers

SIZE_TARGET = 1.10  # all-depth file / full-depth file
LATENCY_TARGET = 1.10  # all-depth file / that depth's own file, at each depth
RATIO_TARGET = 1.10  # latency ratio / FLOPs ratio at s = 0.5


def build(name: str, image_size: int, norms: bool) -> AdaptiveDepth:
    """A timm model with random weights, made adaptive at ``image_size``, with per-depth statistics if ``norms``."""
    torch.manual_seed(0)
    model = AdaptiveDepth.from_pretrained(name, pretrained=False, input_size=(3, image_size, image_size)).eval()
    if norms:
        for layer in batchnorm_layers(model.model).values():
            torch.nn.init.ones_(layer.weight)
        model.recalibrate_norms([torch.randn(8, 3, image_size, image_size) for _ in range(2)])
    return model.eval()


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session that runs on the calling thread alone, warnings silenced."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(runs: dict[str, Any], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU and wall milliseconds of each callable, every round running each once (in a rotated order)."""
    names = list(runs)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            c, w = time.thread_time(), time.perf_counter()
            runs[name]()
            if i >= warmup:
                cpu[name].append((time.thread_time() - c) * 1e3)
                wall[name].append((time.perf_counter() - w) * 1e3)
    return {n: {"cpu": statistics.median(cpu[n]), "wall": statistics.median(wall[n])} for n in names}


def measure(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Export ``name`` both ways, then sizes and interleaved latencies at every depth and batch size."""
    model = build(name, args.image_size, norms=True)
    has_norms = bool(model.config.norm_stats)
    factors = model.config.scaling_factors
    files = {"all": model.save_export(root / f"{name}-all", "all") / "model.onnx"}
    files |= {s: model.save_export(root / f"{name}-s{s}", s, format="onnx") / "model.onnx" for s in factors}
    if has_norms:  # the same weights, every depth with the statistics of training
        model.reset_norms()
        files["all, training statistics"] = model.save_export(root / f"{name}-all-plain", "all") / "model.onnx"
    sessions = {key: session(path) for key, path in files.items()}
    latency: dict[int, dict[str, dict[str, dict[float, float]]]] = {}
    for batch in args.batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, args.image_size, args.image_size), dtype=np.float32)
        runs = {}
        for i, s in enumerate(factors):
            for key in [k for k in files if isinstance(k, str)]:
                feeds = {"pixel_values": x, "depth_index": np.array(i)}
                runs[f"{key}@{s}"] = lambda key=key, feeds=feeds: sessions[key].run(None, feeds)
            runs[f"own@{s}"] = lambda s=s, feeds={"pixel_values": x}: sessions[s].run(None, feeds)
        ms = interleaved_ms(runs, args.warmup, args.repeats)
        kinds = sorted({run.rpartition("@")[0] for run in runs})
        latency[batch] = {
            clock: {kind: {s: ms[f"{kind}@{s}"][clock] for s in factors} for kind in kinds} for clock in ("cpu", "wall")
        }
    return {
        "model": name,
        "per_depth_norms": has_norms,
        "blocks": {s: model.depth_for(s) for s in factors},
        "size_bytes": {str(k): p.stat().st_size for k, p in files.items()},
        "flops": {s: model.flops(s) for s in factors},
        "latency_ms": latency,
    }


def report(result: dict[str, Any]) -> list[str]:
    """Markdown tables of one model's result, and a line per target saying whether it is met (on CPU time)."""
    sizes, flops, factors = result["size_bytes"], result["flops"], sorted(result["flops"])
    full = max(factors)
    mb = {k: v / 1e6 for k, v in sizes.items()}
    per_depth = [mb[str(s)] for s in factors]
    size_ratio = mb["all"] / mb[str(full)]
    lines = [
        f"### {result['model']}",
        "",
        f"Files: all-depth {mb['all']:.1f} MB; full-depth {mb[str(full)]:.1f} MB (ratio {size_ratio:.3f}); one file "
        f"per depth {sum(per_depth):.1f} MB in all ({' + '.join(f'{v:.1f}' for v in per_depth)}).",
        "",
        "| batch | s | blocks | FLOPs ratio | own file ms | all-depth file ms | all / own | all-depth latency ratio "
        + ("| all-depth, training statistics ms | its all / own " if "all, training statistics" in mb else "")
        + "| wall ms: own / all-depth |",
        "|---" * (11 if "all, training statistics" in mb else 9) + "|",
    ]
    checks = [("size", size_ratio <= SIZE_TARGET, f"all-depth / full-depth size {size_ratio:.3f}")]
    for batch, clocks in result["latency_ms"].items():
        cpu, wall = clocks["cpu"], clocks["wall"]
        own, one = cpu["own"], cpu["all"]
        for s in factors:
            cells = [batch, s, result["blocks"][s], f"{flops[s] / flops[full]:.3f}", f"{own[s]:.1f}", f"{one[s]:.1f}",
                     f"{one[s] / own[s]:.3f}", f"{one[s] / one[full]:.3f}"]  # fmt: skip
            if "all, training statistics" in cpu:
                plain = cpu["all, training statistics"][s]
                cells += [f"{plain:.1f}", f"{plain / own[s]:.3f}"]
            cells.append(f"{wall['own'][s]:.1f} / {wall['all'][s]:.1f}")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
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
