"""Seeded PyTorch loaders: the same batches and augmentations on any number of processes, and after resuming.

Data order comes from :class:`EpochSampler` (a permutation drawn from the seed and the epoch) and each image's
augmentation from a seed of (seed, epoch, image, stream), so neither depends on the number of processes or
workers nor touches the global RNG. With several *streams* (one per Teammate, ``TrainingConfig.teammate_data``)
every item holds one view per stream: the same image under its own augmentation (``views``), or each stream's
own image in its own order (``streams``). In *draw mode* (``draws=K``, for cached teacher outputs) each image has
``K`` fixed augmentation draws, seeded independently of the training seed, and each epoch shows one of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..preprocessing import build_transform
from .data import ImageClassificationData
from .teacher_cache import CACHE_SEED

__all__ = ["EpochSampler", "Loaders", "TransformedDataset", "make_loaders"]


def _augmentation_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    base = (seed * 1_000_003 + epoch) * 10_000_019 + index
    return base if stream == 0 else base * 7_919 + stream  # stream 0 keeps the single-stream seeds


class TransformedDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` as ``(pixels, label)`` pairs, with augmentation seeded per (seed, epoch, index).

    With ``with_index=True`` the items are ``(pixels, label, index)``. Indexed by a tuple of indices (one per stream,
    from :class:`EpochSampler` with ``streams > 1``), an item stacks the streams: pixels ``[streams, C, H, W]``,
    labels and indices ``[streams]``.

    With ``draws=K`` (draw mode) image ``i`` has ``K`` fixed augmentations, seeded by (:data:`CACHE_SEED`, draw,
    ``i``); each epoch shows draw ``k``, picked from (seed, epoch, ``i``), and the items are
    ``(pixels, label, key)`` with ``key = i * K + k``: the row of that view in a teacher cache.
    """

    def __init__(
        self,
        data: datasets.Dataset,
        transform: Callable[[Any], torch.Tensor],
        image_column: str,
        label_column: str,
        *,
        seed: int = 0,
        with_index: bool = False,
        draws: int | None = None,
    ) -> None:
        self.data, self.transform, self.with_index, self.draws = data, transform, with_index or bool(draws), draws
        self.image_column, self.label_column = image_column, label_column
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def _draw(self, index: int) -> int:
        """Draw mode: which of the image's fixed augmentations this epoch shows."""
        return random.Random(_augmentation_seed(self.seed, self.epoch, index, 0)).randrange(self.draws or 1)

    def draw_view(self, key: int) -> torch.Tensor:
        """Draw mode: the pixels of cache row ``key`` (image ``key // draws``, its draw ``key % draws``)."""
        index, draw = divmod(int(key), self.draws or 1)
        return self._transformed(self.data[index], _augmentation_seed(CACHE_SEED, draw, index, 0))

    def _transformed(self, example: dict[str, Any], seed: int) -> torch.Tensor:
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                return self.transform(example[self.image_column])
        finally:
            random.setstate(state)

    def _view(self, index: int, stream: int) -> tuple[torch.Tensor, int]:
        example = self.data[int(index)]
        seed = _augmentation_seed(self.seed, self.epoch, int(index), stream)
        return self._transformed(example, seed), int(example[self.label_column])

    def __getitem__(self, index: int | tuple[int, ...]) -> tuple[Any, ...]:
        if isinstance(index, tuple):
            views = [self._view(i, stream) for stream, i in enumerate(index)]
            pixels = torch.stack([v[0] for v in views])
            labels = torch.tensor([v[1] for v in views])
            return (pixels, labels, torch.tensor(index)) if self.with_index else (pixels, labels)
        if self.draws:
            key = int(index) * self.draws + self._draw(int(index))
            return self.draw_view(key), int(self.data[int(index)][self.label_column]), key
        pixels, label = self._view(index, 0)
        return (pixels, label, int(index)) if self.with_index else (pixels, label)


class EpochSampler(torch.utils.data.Sampler[Any]):
    """Indices in a fresh random order each epoch, drawn from ``seed + epoch`` (resumable, process-independent).

    Args:
        num_samples: size of the dataset.
        shuffle: a random order (else ``0, 1, 2, ...``).
        seed: the order's seed.
        streams: with more than one, each item is a tuple of indices, one per stream (stream 0 in the
            single-stream order).
        own_order: with several streams, each has its own order (``False``: all take stream 0's, so each item
            is one image seen by every stream).
    """

    def __init__(
        self, num_samples: int, *, shuffle: bool, seed: int = 0, streams: int = 1, own_order: bool = True
    ) -> None:
        self.num_samples, self.shuffle, self.seed, self.epoch = int(num_samples), shuffle, seed, 0
        self.streams, self.own_order = int(streams), own_order

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, stream: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        seed = self.seed + self.epoch if stream == 0 else (self.seed + self.epoch) * 7_919 + 104_729 * stream
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed)).tolist()

    def __iter__(self) -> Iterator[Any]:
        if self.streams == 1:
            return iter(self._order(0))
        first = self._order(0)
        orders = [first] + [self._order(t) if self.own_order else first for t in range(1, self.streams)]
        return iter(zip(*orders))


NORM_CHECK_MAX = 1000  # images held out of the training split for the BatchNorm check, at most


@dataclass
class Loaders:
    """The loaders of a run: augmented training, un-augmented training (BatchNorm recalibration), held-out
    evaluation, and (with ``norm_check``) un-augmented training images that training does not see, on which each
    depth's recalibrated BatchNorm statistics are checked against those of training."""

    train: DataLoader
    recalibration: DataLoader
    eval: DataLoader
    norm_check: DataLoader | None = None


def hold_out(train: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split ``fraction`` of a training split (at most :data:`NORM_CHECK_MAX` images) off, the same for every seed."""
    count = min(NORM_CHECK_MAX, round(fraction * len(train))) if fraction > 0 else 0
    if count == 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return train.select(sorted(order[count:])), train.select(sorted(order[:count]))


def make_loaders(
    data: ImageClassificationData,
    model: nn.Module,
    *,
    batch_size: int,
    seed: int,
    input_size: Sequence[int] | None = None,
    num_workers: int = 0,
    with_index: bool = False,
    streams: int = 1,
    own_order: bool = True,
    teacher_draws: int | None = None,
    norm_check: float = 0.0,
) -> Loaders:
    """Loaders with the model's own preprocessing (training augmentation on the first), seeded by ``seed``.

    Args:
        data: what :func:`load_image_classification_data` returned.
        model: the model whose preprocessing config is used (an ``AdaptiveDepth`` or a plain module).
        batch_size: per process.
        seed: data order and augmentation.
        input_size: ``[C, H, W]`` (default: the model's).
        num_workers: ``DataLoader`` worker processes.
        with_index: the two training loaders also yield each image's index.
        streams: training batches with one view per stream, ``[B, streams, C, H, W]`` (one per Teammate,
            ``TrainingConfig.data_streams``); the other two loaders stay single-stream.
        own_order: with several streams, each stream draws its own images in its own order (else the same
            images, each stream with its own augmentation).
        teacher_draws: the training loader in draw mode, yielding ``(images, labels, keys)``: ``K`` fixed
            augmentations per image, for cached teacher outputs (``TrainingConfig.leader="cached"``).
        norm_check: the share of the training split (at most :data:`NORM_CHECK_MAX` images, the same ones whatever
            the seed) held out of training and recalibration, for ``Loaders.norm_check``.

    ``make_loaders(data, model, **config.loader_options, ...)`` sets ``batch_size``, ``seed``, ``streams``,
    ``own_order``, ``teacher_draws`` and ``norm_check`` as a :class:`~adaptive_depth.training.TrainingConfig` needs
    them.
    """
    inner = getattr(model, "model", model)
    processor = getattr(model, "image_processor", None)
    train_tf = build_transform(inner, train=True, input_size=input_size, processor=processor)
    eval_tf = build_transform(inner, train=False, input_size=input_size, processor=processor)
    cols = (data.image_column, data.label_column)

    def loader(
        ds: datasets.Dataset,
        transform: Any,
        *,
        shuffle: bool,
        drop_last: bool = False,
        streams: int = 1,
        draws: int | None = None,
    ) -> DataLoader:
        sampler = (
            EpochSampler(len(ds), shuffle=True, seed=seed, streams=streams, own_order=own_order) if shuffle else None
        )
        return DataLoader(
            TransformedDataset(ds, transform, *cols, seed=seed, with_index=with_index and shuffle, draws=draws),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    train, check = hold_out(data.train, norm_check)
    return Loaders(
        train=loader(train, train_tf, shuffle=True, drop_last=True, streams=streams, draws=teacher_draws),
        recalibration=loader(train, eval_tf, shuffle=True),
        eval=loader(data.eval, eval_tf, shuffle=False),
        norm_check=loader(check, eval_tf, shuffle=False) if check is not None else None,
    )
