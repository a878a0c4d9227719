"""Wall-clock latency, measured the honest way: warm-up, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["measure_latency_ms"]


def measure_latency_ms(model: nn.Module, *inputs: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median latency of ``model(*inputs)`` in milliseconds, under ``torch.inference_mode``.

    CUDA work is synchronised around each run so the time covers the kernels, not just their launch.
    """
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(*inputs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
