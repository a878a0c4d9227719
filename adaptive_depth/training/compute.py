"""Training compute, counted as FLOPs of what actually ran: the unit of the budget curves (docs/benchmarks.md).

Every method is charged the same way: the forward FLOPs of the blocks that ran for each image (counted once per
architecture by ``torch.utils.flop_counter``, a switched-off block saving what it costs), three times that for a
forward with a backward pass, once for a forward without gradients (a fixed teacher, a peer target, an EMA
teacher), nothing for a cached teacher output (its making is charged once, when it is made).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..flops import count_flops, count_flops_by_module
from ..state import preserved
from ..tuner import DepthTuner

__all__ = ["BACKWARD_FACTOR", "ComputeMeter", "ForwardCost", "plain_epoch_flops"]

BACKWARD_FACTOR = 3  # forward + backward of a training step costs about three forwards (backward = 2x forward)


class ForwardCost:
    """FLOPs of one image's forward pass through a model, at whatever depth its gates are set to now.

    A depth-gated model is counted once at full depth, per gated unit; afterwards a call sums the units that are
    off (no counting pass), so a random depth drawn at every step costs a dictionary walk. A plain module
    (a Leader) is counted once.

    Args:
        model: a :class:`~adaptive_depth.tuner.DepthTuner` (an ``AdaptiveDepth``) or any module.
        example: one input image batch ``[1, C, H, W]`` for a plain module (a depth-gated one makes its own).
    """

    def __init__(self, model: nn.Module, example: object = None) -> None:
        self._units: list[tuple[nn.Module, int]] = []
        if not isinstance(model, DepthTuner):
            self.full = count_flops(model, example)
            return
        inner = model.model
        with preserved(model):
            model.set_scaling_factor(1.0)
            self.full, per_module = count_flops_by_module(inner, model.example_input(1))
        prefix = type(inner).__name__
        for stage in model.stages:
            for block in stage.blocks:
                if block.gateable:
                    gate = inner.get_submodule(block.name)
                    self._units.append((gate, per_module.get(f"{prefix}.{block.name}", 0)))

    def __call__(self) -> int:
        """Forward FLOPs of one image at the model's current depth."""
        return self.full - sum(flops for gate, flops in self._units if not gate.active)


@dataclass
class ComputeMeter:
    """Training FLOPs of one process, split by what they paid for.

    Attributes:
        trained: forward + backward of the networks that learn (``BACKWARD_FACTOR`` x their forward).
        teacher: forwards without gradients (fixed, cached-table making, EMA or peer targets).
    """

    trained: float = 0.0
    teacher: float = 0.0

    def add(self, flops_per_image: float, images: int, *, backward: bool) -> None:
        """Charge ``images`` forwards of ``flops_per_image`` each, with or without a backward pass."""
        if backward:
            self.trained += BACKWARD_FACTOR * flops_per_image * images
        else:
            self.teacher += flops_per_image * images

    @property
    def total(self) -> float:
        """All training FLOPs charged so far."""
        return self.trained + self.teacher


def plain_epoch_flops(model: DepthTuner, num_images: int) -> float:
    """The unit of a compute budget: one epoch of plain fine-tuning at full depth over ``num_images`` images."""
    return BACKWARD_FACTOR * float(model.flops(1.0)) * num_images
