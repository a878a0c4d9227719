"""Per-depth BatchNorm statistics: re-estimated for every trained depth, swapped in by reference.

Skipping blocks shifts the statistics of what later BatchNorm layers see, so running statistics estimated at
full depth are wrong for a shallower network (Slimmable / Once-for-All recalibrate for the same reason).
:func:`recalibrate_batchnorm` re-estimates them at each trained scaling factor on training batches;
:class:`DepthNorms` keeps one set per depth and makes a BatchNorm layer's ``running_mean`` / ``running_var``
*be* the set of the current depth (the buffer entries are re-pointed, nothing is copied), so switching depth
costs a few dictionary assignments. Training at a depth after recalibration updates that depth's own set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import CheckpointError

__all__ = ["DepthNorms", "batchnorm_layers", "recalibrate_batchnorm"]

STATS = ("running_mean", "running_var")
DEFAULT = "default"


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm layers that track running statistics, by qualified name (gates' ``base_layer.`` dropped)."""
    return {
        name.replace("base_layer.", ""): m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def stats_key(scaling_factor: float) -> str:
    """The key of one depth's statistics (``"0.5"``), as in ``config.flops``."""
    return str(float(scaling_factor))


class DepthNorms(nn.Module):
    """Running statistics of every BatchNorm layer, one set per scaling factor plus the trained default.

    Its tensors are non-persistent buffers, so ``.to()`` moves them with the model but they stay out of
    ``state_dict()``; they are saved in a file of their own (:meth:`to_tensors`, :meth:`load_tensors`).

    Args:
        layers: the BatchNorm layers by name (:func:`batchnorm_layers`).
    """

    def __init__(self, layers: dict[str, _BatchNorm]) -> None:
        super().__init__()
        self._pointers: dict[str, list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]]] = {}
        self._layers = layers  # plain dict: the layers are registered in the model, not here
        self._names = sorted(layers)
        self._sets: dict[str, int] = {}
        self._add(DEFAULT, self._layer_stats(), clone=False)
        self._current: str | None = DEFAULT  # the layers hold the default set's tensors themselves

    def _buffer(self, set_index: int, layer_index: int, stat: int) -> torch.Tensor:
        return self._buffers[f"s{set_index}_{layer_index}_{stat}"]

    def _add(self, key: str, stats: dict[str, tuple[torch.Tensor, ...]], *, clone: bool = True) -> None:
        index = self._sets.setdefault(key, len(self._sets))
        for i, name in enumerate(self._names):
            for j, tensor in enumerate(stats[name]):
                self.register_buffer(
                    f"s{index}_{i}_{j}", tensor.detach().clone() if clone else tensor, persistent=False
                )

    def _layer_stats(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {n: tuple(getattr(m, s) for s in STATS) for n, m in self._layers.items()}

    def release(self) -> None:
        """Give the layers private copies of their statistics, so that resetting them leaves every set intact."""
        for layer in self._layers.values():
            for stat in STATS:
                layer._buffers[stat] = layer._buffers[stat].detach().clone()
        self._current = None

    def capture(self, scaling_factor: float) -> None:
        """Adopt the layers' current statistics (after :meth:`release`) as the set of ``scaling_factor``."""
        key = stats_key(scaling_factor)
        if self._current is not None:
            raise RuntimeError("capture() after release(): the layers still share a stored set")
        self._add(key, self._layer_stats(), clone=False)
        self._current = key

    def use(self, scaling_factor: float | None) -> None:
        """Point the layers at the statistics of ``scaling_factor`` (the default set if it has none)."""
        key = DEFAULT if scaling_factor is None else stats_key(scaling_factor)
        key = key if key in self._sets else DEFAULT
        if key == self._current:
            return
        pointers = self._pointers.get(key)
        if pointers is None:
            index = self._sets[key]
            pointers = self._pointers[key] = [
                (self._layers[name]._buffers, stat, self._buffer(index, i, j))
                for i, name in enumerate(self._names)
                for j, stat in enumerate(STATS)
            ]
        for buffers, stat, tensor in pointers:
            buffers[stat] = tensor
        self._current = key

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> DepthNorms:  # type: ignore[override]
        # ``.to()`` moves our tensors and the layers' separately: point the layers at ours again afterwards.
        super()._apply(fn, recurse)
        self._pointers.clear()
        current, self._current = self._current, None
        if current is not None:
            self.use(None if current == DEFAULT else float(current))
        return self

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<s>/<layer>.running_mean": tensor, ...}`` for every depth with its own statistics."""
        out = {}
        for key, index in self._sets.items():
            if key == DEFAULT:
                continue
            for i, name in enumerate(self._names):
                for j, stat in enumerate(STATS):
                    out[f"{key}/{name}.{stat}"] = self._buffer(index, i, j).contiguous()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], scaling_factors: Sequence[float], source: str) -> None:
        """Add the sets written by :meth:`to_tensors`; every expected tensor must be there, nothing else."""
        expected = {
            f"{stats_key(s)}/{name}.{stat}": self._layers[name]
            for s in scaling_factors
            for name in self._names
            for stat in STATS
        }
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match the model's BatchNorm layers: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; save the model again"
            )
        for key, layer in expected.items():
            if tensors[key].shape != layer.running_mean.shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, the layer has "
                    f"{tuple(layer.running_mean.shape)}; the file belongs to another model"
                )
        like = next(iter(self._layers.values())).running_mean
        for s in scaling_factors:
            stats = {
                name: tuple(tensors[f"{stats_key(s)}/{name}.{stat}"].to(like) for stat in STATS) for name in self._names
            }
            self._add(stats_key(s), stats, clone=False)
        self._current = None


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    layers: dict[str, _BatchNorm],
    batches: Iterable[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Re-estimate the running statistics of ``layers`` from scratch on ``batches`` at the model's current depth.

    Everything else runs in eval mode (dropout off); the statistics are exact averages over the batches
    (``momentum=None``). ``reduce`` (e.g. a mean over processes) is applied to each statistic at the end.
    Returns the number of images seen.
    """
    was_training = model.training
    momenta = {name: layer.momentum for name, layer in layers.items()}
    model.eval()
    seen = 0
    try:
        for layer in layers.values():
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for name, layer in layers.items():
            layer.momentum = momenta[name]
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrating BatchNorm statistics needs at least one batch of images")
    if reduce is not None:
        for layer in layers.values():
            for stat in STATS:
                getattr(layer, stat).copy_(reduce(getattr(layer, stat)))
    return seen
