"""Wall-clock latency, measured the honest way: warm-up, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["measure_latencies_ms", "measure_latency_ms"]


def _synchronize(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_latencies_ms(
    runs: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    grad: bool = False,
) -> dict[str, float]:
    """Median milliseconds of each callable, timed in interleaved rounds under ``torch.inference_mode``.

    Every round runs each callable once, so a slow spell of the machine (another process, thermal throttling)
    touches every candidate alike and ratios between them stay honest. CUDA work is synchronised around each
    run so the time covers the kernels, not just their launch.

    Args:
        runs: name -> a callable that does one forward pass.
        device: where the work runs (CUDA is synchronised).
        warmup: rounds discarded first.
        repeats: rounds whose median is reported.
        grad: time with autograd enabled (training steps) instead of under ``torch.inference_mode``.
    """
    sync = _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.enable_grad() if grad else torch.inference_mode():
        for i in range(warmup + repeats):
            for name, run in runs.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_latency_ms(model: nn.Module, *inputs: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median latency of ``model(*inputs)`` in milliseconds (see :func:`measure_latencies_ms`)."""
    device = next(model.parameters()).device
    return measure_latencies_ms({"model": lambda: model(*inputs)}, device=device, warmup=warmup, repeats=repeats)[
        "model"
    ]
