"""Budget-aware depth: measure each trained depth's latency on a device, then pick the largest depth that fits.

A :class:`LatencyProfile` is what :meth:`AdaptiveDepth.profile` measures, at one or several batch sizes; it is saved
in ``config.json`` (so a model profiled on the target device carries its numbers to the Hub) and shown in the model
card. :func:`choose_scaling_factor` is the selection rule behind :meth:`AdaptiveDepth.set_budget`; the serving
controller (:mod:`adaptive_depth.serving.controller`) predicts a batch's latency with :meth:`LatencyProfile.estimate`.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import BudgetError, ConfigError
from .latency import measure_latencies_ms
from .policy import depth_key
from .state import preserved

if TYPE_CHECKING:
    from .tuner import DepthTuner

__all__ = [
    "LatencyProfile",
    "choose_scaling_factor",
    "describe_device",
    "describe_dtype",
    "profile_depths",
    "profile_model",
]


def _cpu_name() -> str:
    """The CPU model ("Intel(R) Xeon(R) ...") where the OS says it; ``platform`` only knows the instruction set."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_device(device: torch.device | str) -> str:
    """A readable name of the device latencies were measured on (GPU model, or CPU model and thread count).

    Two profiles are of the same device when these names are equal: the thread count is part of a CPU's name
    because it changes every latency.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()}"
    return str(device)


def describe_dtype(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, as profiles store it."""
    return str(dtype).removeprefix("torch.")


@dataclass
class LatencyProfile:
    """Median forward latency at every trained depth and profiled batch size, measured on one device.

    Args:
        device: where it was measured (:func:`describe_device`).
        input_size: ``[C, H, W]`` of each image.
        dtype: the model's parameter dtype during the measurement.
        latency_ms: milliseconds per forward pass, keyed by batch size, then by ``depth_key(scaling_factor)``
            (JSON keys are strings): ``{"1": {"0.5": 2.1, "1.0": 3.0}, "8": {...}}``.

    Profiles saved before batch sizes were profiled (``batch_size`` and a flat ``latency_ms``) load with
    :meth:`from_dict`.
    """

    device: str
    input_size: list[int]
    dtype: str
    latency_ms: dict[str, dict[str, float]]

    def __post_init__(self) -> None:
        rows = self.latency_ms.values() if isinstance(self.latency_ms, Mapping) else None
        if rows is None or not all(isinstance(row, Mapping) for row in rows):
            raise ConfigError(
                "latency profile: latency_ms must map batch sizes to {scaling factor: ms}, "
                f"got {self.latency_ms!r:.200}"
            )
        table: dict[str, dict[str, float]] = {}
        for batch, row in self.latency_ms.items():
            size = int(batch) if str(batch).isdigit() else 0
            if size < 1:
                raise ConfigError(f"latency profile: batch sizes must be positive integers, got {batch!r}")
            for key, ms in row.items():
                if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms <= 0:
                    raise ConfigError(
                        f"latency profile: latency at s={key} must be a positive number, got {ms!r} (batch {size})"
                    )
            table[str(size)] = dict(row)
        self.latency_ms = dict(sorted(table.items(), key=lambda item: int(item[0])))

    @property
    def batch_sizes(self) -> list[int]:
        """The profiled batch sizes, smallest first."""
        return [int(b) for b in self.latency_ms]

    @property
    def batch_size(self) -> int:
        """The smallest profiled batch size: the one :meth:`at` and ``set_budget`` use by default."""
        return self.batch_sizes[0] if self.latency_ms else 1

    def at(self, scaling_factor: float, batch_size: int | None = None) -> float | None:
        """The measured latency at ``scaling_factor`` and ``batch_size`` (default: the smallest profiled one).

        ``None`` if that depth or batch size was not profiled.
        """
        row = self.latency_ms.get(str(self.batch_size if batch_size is None else batch_size), {})
        return row.get(depth_key(scaling_factor))

    def estimate(self, scaling_factor: float, batch_size: int) -> float | None:
        """The latency of a forward pass of ``batch_size`` images at ``scaling_factor``, from the profile.

        Between profiled batch sizes the latency is interpolated linearly. Above the largest it grows in proportion
        to the batch (per-image cost does not fall further), below the smallest it is the smallest's: both err on
        the slow side. ``None`` if the depth was not profiled.
        """
        key = depth_key(scaling_factor)
        points = [(int(b), row[key]) for b, row in self.latency_ms.items() if key in row]
        if not points:
            return None
        if batch_size <= points[0][0]:
            return points[0][1]
        for (b0, ms0), (b1, ms1) in itertools.pairwise(points):
            if batch_size <= b1:
                return ms0 + (ms1 - ms0) * (batch_size - b0) / (b1 - b0)
        b_max, ms_max = points[-1]
        return ms_max * batch_size / b_max

    def check_device(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Refuse to use this profile for a model on another device (or in another dtype).

        Raises:
            BudgetError: latencies measured elsewhere say nothing about this device.
        """
        here, here_dtype = describe_device(device), describe_dtype(dtype)
        if (here, here_dtype) != (self.device, self.dtype):
            raise BudgetError(
                f"the latency profile was measured on {self.device!r} ({self.dtype}), but the model runs on "
                f"{here!r} ({here_dtype}): latencies do not transfer between devices, thread counts or dtypes. "
                "Measure this one with model.profile(example_input) where the model runs "
                "(examples/predict.py --profile does it from the command line)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (stored as ``config.latency_profile``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyProfile:
        """Build from :meth:`to_dict`'s output, or from a profile of one batch size saved by an earlier version."""
        values = dict(data)
        flat = values.get("latency_ms")
        one_batch = isinstance(flat, Mapping) and not any(isinstance(v, Mapping) for v in flat.values())
        if "batch_size" in values and one_batch:
            values["latency_ms"] = {str(values.pop("batch_size")): dict(flat)}
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"invalid latency profile in config.json: {e}") from e


def choose_scaling_factor(
    flops: Mapping[float, float],
    latency_ms: Mapping[float, float] | None,
    *,
    max_flops: float | None = None,
    max_latency_ms: float | None = None,
) -> float:
    """The largest trained scaling factor whose FLOPs and latency both fit the budget.

    Args:
        flops: FLOPs per image at every trained scaling factor.
        latency_ms: measured latency at every trained scaling factor (needed only with ``max_latency_ms``).
        max_flops: the most FLOPs per image allowed.
        max_latency_ms: the most milliseconds per forward pass allowed (as profiled).

    Raises:
        BudgetError: no budget given, a budget that is not a positive number, a latency budget without a
            profile of every trained depth, or no trained depth that fits.
    """
    if max_flops is None and max_latency_ms is None:
        raise BudgetError("set_budget() needs max_flops=..., max_latency_ms=..., or both")
    for name, value in (("max_flops", max_flops), ("max_latency_ms", max_latency_ms)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0
        ):
            raise BudgetError(f"{name} must be a positive number, got {value!r}")
    depths = sorted(flops)
    if max_latency_ms is not None:
        missing = [s for s in depths if latency_ms is None or s not in latency_ms]
        if missing:
            raise BudgetError(
                f"no measured latency for the trained depths {missing}: run model.profile(example_input, device) "
                "on the device you deploy to first (it is saved with the model)"
            )

    def fits(s: float) -> bool:
        ok_flops = max_flops is None or flops[s] <= max_flops
        ok_latency = max_latency_ms is None or latency_ms[s] <= max_latency_ms  # type: ignore[index]
        return ok_flops and ok_latency

    fitting = [s for s in depths if fits(s)]
    if not fitting:
        s = depths[0]
        costs = [f"{flops[s] / 1e9:.4g} GFLOPs"]
        if max_latency_ms is not None:
            costs.append(f"{latency_ms[s]:.3g} ms")  # type: ignore[index]
        raise BudgetError(
            f"no trained depth fits the budget (max_flops={max_flops}, max_latency_ms={max_latency_ms}): the "
            f"smallest, s={s:g}, costs {' and '.join(costs)}; raise the budget or train a smaller scaling factor"
        )
    return fitting[-1]


def profile_depths(
    switch: Callable[[float], Callable[[torch.Tensor], Any]],
    example_input: torch.Tensor,
    scaling_factors: Sequence[float],
    warmup: int,
    repeats: int,
    batch_sizes: Sequence[int] | None = None,
) -> LatencyProfile:
    """Median latency of a model at each depth and batch size, all timed in interleaved rounds (noise touches all
    alike).

    Args:
        switch: ``set_scaling_factor`` of the model: switches depth and returns the model (a switch costs
            microseconds and is part of serving, so it is timed with the forward pass).
        example_input: the images to time (moved to the model's device and dtype); repeated or cut to each
            batch size.
        scaling_factors: the depths to profile.
        warmup, repeats: rounds discarded, then rounds whose median is kept.
        batch_sizes: the batch sizes to profile (default: ``example_input``'s own).
    """
    model = switch(scaling_factors[-1])
    param = next(model.parameters())
    x = example_input.to(device=param.device, dtype=param.dtype if example_input.is_floating_point() else None)
    sizes = sorted(set(batch_sizes)) if batch_sizes else [int(x.shape[0])]
    batches = {b: x.repeat(math.ceil(b / x.shape[0]), *[1] * (x.dim() - 1))[:b] for b in sizes}
    runs = {
        f"{b}/{depth_key(s)}": (lambda s=s, batch=batches[b]: switch(s)(batch)) for b in sizes for s in scaling_factors
    }
    timed = measure_latencies_ms(runs, device=param.device, warmup=warmup, repeats=repeats)
    return LatencyProfile(
        device=describe_device(param.device),
        input_size=[int(v) for v in x.shape[1:]],
        dtype=describe_dtype(param.dtype),
        latency_ms={str(b): {depth_key(s): timed[f"{b}/{depth_key(s)}"] for s in scaling_factors} for b in sizes},
    )


def profile_model(
    model: DepthTuner,
    example_input: torch.Tensor | None,
    batch_size: int | Sequence[int] | None,
    depths: Sequence[float],
    *,
    warmup: int,
    repeats: int,
) -> LatencyProfile:
    """:meth:`DepthTuner.profile`: every depth at every batch size, timed in interleaved rounds, in eval mode.

    Raises:
        ConfigError: a batch size that is not a positive integer.
    """
    several = isinstance(batch_size, Sequence) and not isinstance(batch_size, str)
    sizes = list(batch_size) if several else [batch_size]  # type: ignore[list-item]
    for size in sizes:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"profile() batch sizes must be positive integers, got {batch_size!r}")
    first = None if sizes == [None] else min(sizes)
    x = model.example_input(first or 1) if example_input is None else example_input
    with preserved(model, train=False):
        return profile_depths(model.set_scaling_factor, x, depths, warmup, repeats, None if first is None else sizes)
