"""Per-depth BatchNorm statistics: re-estimated for every trained depth, swapped in by reference.

Skipping blocks shifts the statistics of what later BatchNorm layers see, so running statistics estimated at
full depth are wrong for a shallower network (Slimmable / Once-for-All recalibrate for the same reason).
:func:`recalibrate_batchnorm` re-estimates them at each trained scaling factor on training batches;
:class:`DepthNorms` keeps one set per depth and makes a BatchNorm layer's ``running_mean`` / ``running_var``
*be* the set of the current depth (the buffer entries are re-pointed, nothing is copied), so switching depth
costs a few dictionary assignments. Training at a depth after recalibration updates that depth's own set. The sets
are saved in a file of their own (``depth_norms.safetensors``, :mod:`adaptive_depth.saved.files`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError
from .state import preserved

if TYPE_CHECKING:
    from .tuner import DepthTuner

__all__ = [
    "DepthNorms",
    "batch_statistics",
    "batchnorm_layers",
    "recalibrate_batchnorm",
    "recalibrate_depths",
    "register_training_statistics_hooks",
]

logger = logging.getLogger(__name__)

STATS = ("running_mean", "running_var")
DEFAULT = "default"


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm layers that track running statistics, by qualified name (gates' ``base_layer.`` dropped)."""
    return {
        name.replace("base_layer.", ""): m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


@contextlib.contextmanager
def batch_statistics(layers: Iterable[_BatchNorm]) -> Iterator[None]:
    """Inside the block, ``layers`` normalise with each batch's own statistics, their running ones untouched.

    Only these layers change mode, so dropout and drop-path stay off in an eval-mode model. The EMA teacher of
    training needs it: the running statistics it averages from a Teammate trained at a different depth every step
    describe a mix of depths, not the full depth it teaches at, and in eval mode they cost it most of its accuracy.

    Args:
        layers: BatchNorm layers that track running statistics (:func:`batchnorm_layers`), found once by the caller.
    """
    layers = list(layers)
    states = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            m.training = True
            m.track_running_stats = False  # batch statistics; running ones (and num_batches_tracked) untouched
        yield
    finally:
        for m, (training, track) in zip(layers, states, strict=True):
            m.training, m.track_running_stats = training, track


Key = Hashable  # what identifies a depth's statistics: the blocks per stage that run (see ``AdaptiveDepth``)


class DepthNorms(nn.Module):
    """Running statistics of every BatchNorm layer, one set per depth plus the trained default.

    A set is stored under a hashable key (the adaptive model uses the blocks per stage, so every scaling factor
    or explicit depth that runs the same blocks finds the same statistics). Its tensors are non-persistent
    buffers, so ``.to()`` moves them with the model but they stay out of ``state_dict()``; they are saved in a
    file of their own (:meth:`statistics` gives a set's tensors, :meth:`add_sets` takes them back).

    Args:
        layers: the BatchNorm layers by name (:func:`batchnorm_layers`).
    """

    def __init__(self, layers: dict[str, _BatchNorm]) -> None:
        super().__init__()
        self._pointers: dict[Key, list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]]] = {}
        self._layers = layers  # plain dict: the layers are registered in the model, not here
        self._names = sorted(layers)
        self._sets: dict[Key, int] = {}
        self._add(DEFAULT, self._layer_stats(), clone=False)
        self._current: Key | None = DEFAULT  # the layers hold the default set's tensors themselves
        self._suspended: list[Key | None] = []  # sets put aside by :meth:`suspend`

    def _buffer(self, set_index: int, layer_index: int, stat: int) -> torch.Tensor:
        return self._buffers[f"s{set_index}_{layer_index}_{stat}"]

    def _add(self, key: Key, stats: Mapping[str, tuple[torch.Tensor, ...]], *, clone: bool = True) -> None:
        index = self._sets.setdefault(key, len(self._sets))
        self._pointers.pop(key, None)
        for i, name in enumerate(self._names):
            for j, tensor in enumerate(stats[name]):
                self.register_buffer(
                    f"s{index}_{i}_{j}", tensor.detach().clone() if clone else tensor, persistent=False
                )

    def _layer_stats(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {n: tuple(getattr(m, s) for s in STATS) for n, m in self._layers.items()}

    def __contains__(self, key: object) -> bool:
        return key in self._sets and key != DEFAULT

    def release(self) -> None:
        """Give the layers private copies of their statistics, so that resetting them leaves every set intact."""
        for layer in self._layers.values():
            for stat in STATS:
                layer._buffers[stat] = layer._buffers[stat].detach().clone()
        self._current = None

    def capture(self, key: Key) -> None:
        """Adopt the layers' current statistics (after :meth:`release`) as the set of ``key``."""
        if self._current is not None:
            raise RuntimeError("capture() needs release() first: the layers still share a stored set")
        self._add(key, self._layer_stats(), clone=False)
        self._current = key

    def use(self, key: Key | None) -> None:
        """Point the layers at the statistics of ``key`` (the default set if ``None`` or if it has none)."""
        key = key if key is not None and key in self._sets else DEFAULT
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

    def suspend(self) -> None:
        """Point the layers at the default set until :meth:`resume` (``state_dict`` / ``load_state_dict`` use it).

        In the middle of a recalibration (after :meth:`release`) the layers keep what they hold.
        """
        self._suspended.append(self._current)
        if self._current is not None:
            self.use(None)

    def resume(self) -> None:
        """Undo the last :meth:`suspend`."""
        if self._suspended:
            key = self._suspended.pop()
            if key is not None:
                self.use(key)

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> DepthNorms:  # type: ignore[override]
        # ``.to()`` moves our tensors and the layers' separately: point the layers at ours again afterwards.
        super()._apply(fn, recurse)
        self._pointers.clear()
        current, self._current = self._current, None
        if current is not None:
            self.use(current)
        return self

    @property
    def layers(self) -> dict[str, _BatchNorm]:
        """The BatchNorm layers by name, as given (:func:`batchnorm_layers`)."""
        return self._layers

    def statistics(self, key: Key) -> dict[str, tuple[torch.Tensor, ...]]:
        """The stored ``running_mean`` and ``running_var`` of ``key``'s set by layer name, in name order (the tensors
        themselves, not copies)."""
        index = self._sets[key]
        return {name: tuple(self._buffer(index, i, j) for j in range(len(STATS))) for i, name in enumerate(self._names)}

    def add_sets(self, sets: Mapping[Key, Mapping[str, tuple[torch.Tensor, ...]]]) -> None:
        """Keep each ``key -> {layer: (running_mean, running_var)}`` as the set of ``key`` (the tensors themselves,
        every layer's); a key that has a set gets these instead. The layers then point at their current set again."""
        for key, stats in sets.items():
            self._add(key, stats, clone=False)
        current, self._current = self._current, None
        self.use(current)


MERGE_BELOW = 0.5  # a batch with fewer images than this share of the one before it is merged into that one


def _merged_small_batches(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches``, with every batch smaller than half the one before it concatenated onto that one.

    In training mode a BatchNorm layer normalises each batch with that batch's own statistics: a last batch of one
    image fails where a layer sees one value per channel (a 1x1 feature map), and a batch of two or three images is
    normalised with statistics too noisy to be those of the data. Merged, it runs with the batch before it.
    """
    pending: torch.Tensor | None = None
    for x in batches:
        if pending is not None and len(x) < MERGE_BELOW * len(pending):
            pending = torch.cat([pending, x])
            continue
        if pending is not None:
            yield pending
        pending = x
    if pending is not None:
        yield pending


class _Moments:
    """Per-channel mean and sum of squared deviations of everything a layer sees, merged batch by batch.

    Chan et al.'s pairwise update in float64, so the result is the statistic of all the values together, each image
    weighing the same whatever the size of its batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()  # channels first, then everything else
        n = values.shape[1]
        mean = values.mean(dim=1)
        m2 = ((values - mean[:, None]) ** 2).sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def write(self, layer: _BatchNorm) -> None:
        """Set ``layer``'s running mean and (unbiased, as PyTorch keeps it) running variance."""
        if self.mean is None or self.m2 is None:
            return
        layer.running_mean.copy_(self.mean)
        layer.running_var.copy_(self.m2 / max(self.count - 1, 1))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    layers: dict[str, _BatchNorm],
    batches: Iterable[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Re-estimate the running statistics of ``layers`` from scratch on ``batches`` at the model's current depth.

    Everything else runs in eval mode (dropout off); the BatchNorm layers run in training mode, normalising each batch
    with its own statistics as in training, while the statistics they keep are those of every value they saw, each
    image weighing the same (not each batch: a small last batch counts for its images). A batch smaller than half the
    one before it runs merged into that one. ``reduce`` (e.g. a mean over processes) is applied to each statistic at
    the end. Returns the number of images seen.
    """
    moments = {name: _Moments() for name in layers}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.add(args[0]))
        for name, layer in layers.items()
    ]
    seen = 0
    with preserved(model, train=False):  # restoring the mode also puts the layers back in their own
        try:
            for layer in layers.values():
                layer.reset_running_stats()
                layer.train()
            for x in _merged_small_batches(batches):
                try:
                    model(x)
                except ValueError as e:
                    if "Expected more than 1 value per channel" not in str(e):
                        raise
                    raise ConfigError(
                        f"recalibrating BatchNorm statistics on a batch of {len(x)} image(s) failed: {e}. Give it "
                        "batches of two images or more"
                    ) from e
                seen += len(x)
        finally:
            for handle in handles:
                handle.remove()
    if seen == 0:
        raise ConfigError("recalibrating BatchNorm statistics needs at least one batch of images; the data is empty")
    for name, layer in layers.items():
        moments[name].write(layer)
    if reduce is not None:
        for layer in layers.values():
            for stat in STATS:
                getattr(layer, stat).copy_(reduce(getattr(layer, stat)))
    return seen


def register_training_statistics_hooks(module: nn.Module) -> None:
    """Make ``module.state_dict()`` hold, and ``load_state_dict()`` write, the statistics of training.

    ``module`` has a ``depth_norms`` attribute (a :class:`DepthNorms` or ``None``). The hooks are module-level
    functions, not closures: a deep copy of the model must not call the original's.
    """
    module.register_state_dict_pre_hook(_suspend_depth_norms)
    module.register_state_dict_post_hook(_resume_depth_norms)
    module.register_load_state_dict_pre_hook(_suspend_depth_norms_for_load)
    module.register_load_state_dict_post_hook(_resume_depth_norms_after_load)


def _suspend_depth_norms(module: Any, *_: Any) -> None:
    if module.depth_norms is not None:
        module.depth_norms.suspend()


def _resume_depth_norms(module: Any, *_: Any) -> None:
    if module.depth_norms is not None:
        module.depth_norms.resume()


def _suspend_depth_norms_for_load(module: Any, *_: Any, **__: Any) -> None:
    _suspend_depth_norms(module)


def _resume_depth_norms_after_load(module: Any, _incompatible: Any) -> None:
    _resume_depth_norms(module)


def recalibrate_depths(
    model: DepthTuner,
    batches: Iterable[Any],
    factors: Sequence[float],
    *,
    max_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[float, int]:
    """:meth:`DepthTuner.recalibrate_norms`: one set of statistics per depth (depths running the same blocks share
    one, estimated once), kept in ``model.depth_norms`` and listed in ``model.config.norm_stats``.

    Returns:
        The number of images read at each depth (``{}`` for a model without BatchNorm, left unchanged).
    """
    layers = batchnorm_layers(model.model)
    if not layers:
        logger.info("%s has no BatchNorm layer: nothing to recalibrate", type(model.model).__name__)
        return {}
    if model.depth_norms is None:
        model.depth_norms = DepthNorms(layers)
    norms = model.depth_norms
    seen: dict[float, int] = {}
    done: dict[tuple[int, ...], int] = {}
    with preserved(model):
        for s in factors:
            key = tuple(model.depth_for(s))
            if key not in done:
                model.set_scaling_factor(s)
                norms.release()
                images = (b[0] if isinstance(b, tuple | list) else b for b in itertools.islice(batches, max_batches))
                done[key] = recalibrate_batchnorm(model.model, layers, images, reduce)
                norms.capture(key)
            seen[s] = done[key]
    model.config.norm_stats = sorted(set(model.config.norm_stats) | set(factors))
    return seen
