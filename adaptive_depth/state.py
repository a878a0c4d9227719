"""One context manager that puts a model back as it was: train / eval mode, and the depth of an adaptive model.

Counting FLOPs, probing, recalibrating, profiling, exporting and evaluating all switch a model to eval mode
(and an adaptive model to other depths) for a while; :func:`preserved` is the single way they restore it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, runtime_checkable

from torch import nn

__all__ = ["DepthSnapshot", "preserved"]

M = TypeVar("M", bound=nn.Module)


@runtime_checkable
class DepthSnapshot(Protocol):
    """A model whose depth can be saved and restored (:class:`~adaptive_depth.tuner.DepthTuner`)."""

    def snapshot_depth(self) -> Callable[[], None]:
        """Remember the current depth; the returned callable switches back to it."""
        ...

    def depth_lock(self) -> contextlib.AbstractContextManager[object]:
        """The lock that serialises depth changes made inside :func:`preserved` blocks across threads."""
        ...


def _inner(module: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, as accelerate's ``prepare`` returns it."""
    return module.module if isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def preserved(module: M, *, train: bool | None = None) -> Iterator[M]:
    """Inside the block, change ``module``'s mode or depth freely; on exit both are what they were.

    For a depth-switchable model the block also holds its depth lock, so two threads that each use
    ``preserved`` (or ``model.scaled(s)``, built on it) see their own depth, one after the other.

    Args:
        module: any ``nn.Module`` (a depth-switchable model, possibly wrapped by DDP, also keeps its depth).
        train: switch to train (``True``) or eval (``False``) mode inside the block; ``None`` leaves the mode.
    """
    inner = _inner(module)
    lock = inner.depth_lock() if isinstance(inner, DepthSnapshot) else contextlib.nullcontext()
    with lock:
        was_training = module.training
        restore_depth = inner.snapshot_depth() if isinstance(inner, DepthSnapshot) else None
        try:
            if train is not None:
                module.train(train)
            yield module
        finally:
            if restore_depth is not None:
                restore_depth()
            module.train(was_training)
