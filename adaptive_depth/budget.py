"""Budget-aware depth: measure each trained depth's latency on a device, then pick the largest depth that fits.

A :class:`LatencyProfile` is what :meth:`AdaptiveDepth.profile` measures; it is saved in ``config.json`` (so a
model profiled on the target device carries its numbers to the Hub) and shown in the model card.
:func:`choose_scaling_factor` is the selection rule behind :meth:`AdaptiveDepth.set_budget`.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import BudgetError, ConfigError
from .latency import measure_latencies_ms
from .policy import depth_key

__all__ = ["LatencyProfile", "choose_scaling_factor", "describe_device", "profile_depths"]


def describe_device(device: torch.device) -> str:
    """A readable name of the device latencies were measured on (GPU model, or CPU and thread count)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine() or "cpu"
        return f"cpu: {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()}"
    return str(device)


@dataclass
class LatencyProfile:
    """Median forward latency at every trained depth, measured on one device.

    Args:
        device: where it was measured (:func:`describe_device`).
        batch_size: images per forward pass.
        input_size: ``[C, H, W]`` of each image.
        dtype: the model's parameter dtype during the measurement.
        latency_ms: milliseconds per forward pass, keyed by ``depth_key(scaling_factor)`` (JSON keys are strings).
    """

    device: str
    batch_size: int
    input_size: list[int]
    dtype: str
    latency_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, ms in self.latency_ms.items():
            if not isinstance(ms, int | float) or not math.isfinite(ms) or ms <= 0:
                raise ConfigError(f"latency profile: latency at s={key} must be a positive number, got {ms!r}")

    def at(self, scaling_factor: float) -> float | None:
        """The measured latency at ``scaling_factor`` (``None`` if it was not profiled)."""
        return self.latency_ms.get(depth_key(scaling_factor))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (stored as ``config.latency_profile``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyProfile:
        """Build from :meth:`to_dict`'s output."""
        try:
            return cls(**data)
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
) -> LatencyProfile:
    """Median latency of a model at each depth, the depths timed in interleaved rounds (noise touches all alike).

    Args:
        switch: ``set_scaling_factor`` of the model: switches depth and returns the model (a switch costs
            microseconds and is part of serving, so it is timed with the forward pass).
        example_input: the batch to time (moved to the model's device and dtype).
        scaling_factors: the depths to profile.
        warmup, repeats: rounds discarded, then rounds whose median is kept.
    """
    model = switch(scaling_factors[-1])
    param = next(model.parameters())
    x = example_input.to(device=param.device, dtype=param.dtype if example_input.is_floating_point() else None)
    runs = {depth_key(s): (lambda s=s: switch(s)(x)) for s in scaling_factors}
    timed = measure_latencies_ms(runs, device=param.device, warmup=warmup, repeats=repeats)
    return LatencyProfile(
        device=describe_device(param.device),
        batch_size=int(x.shape[0]),
        input_size=[int(v) for v in x.shape[1:]],
        dtype=str(param.dtype).removeprefix("torch."),
        latency_ms=timed,
    )
