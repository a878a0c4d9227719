"""What data-parallel training needs of the Accelerator for a training config, and the check that it has it."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from ..errors import ConfigError
from .config import TrainingConfig

__all__ = ["accelerator_kwargs", "check_accelerator"]


def accelerator_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs for ``config``: its gradient accumulation, and DDP told of unused blocks.

    ``Accelerator(**accelerator_kwargs(config), mixed_precision=..., log_with=...)`` is how to build your own.
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.leaves_parameters_unused else []
    return {"gradient_accumulation_steps": config.gradient_accumulation_steps, "kwargs_handlers": handlers}


def check_accelerator(acc: Accelerator, config: TrainingConfig) -> None:
    """Refuse an Accelerator that accumulates otherwise than ``config``, or whose DDP would fail on unused blocks.

    Raises:
        ConfigError: with the way to build one that works.
    """
    if acc.gradient_accumulation_steps != config.gradient_accumulation_steps:
        raise ConfigError(
            f"the Accelerator accumulates {acc.gradient_accumulation_steps} steps but the config says "
            f"{config.gradient_accumulation_steps}; create it with Accelerator(**accelerator_kwargs(config))"
        )
    handler = getattr(acc, "ddp_handler", None)
    finds_unused = handler is not None and handler.find_unused_parameters
    data_parallel = acc.num_processes > 1 and acc.distributed_type.name.startswith("MULTI_")  # DDP on any device
    if config.leaves_parameters_unused and data_parallel and not finds_unused:
        raise ConfigError(
            "this training mode (random or sampled depth, or a top depth below 1) leaves blocks without gradients in "
            "some steps, which DDP must be told: create the Accelerator with Accelerator(**accelerator_kwargs(config)) "
            "or kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]"
        )
