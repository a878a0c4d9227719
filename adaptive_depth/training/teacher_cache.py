"""A fixed teacher's outputs made once and reused: distillation without a teacher pass during training.

As in FKD (Shen & Xing, ECCV 2022): for every training image, ``K`` augmentation draws are fixed in advance and the
teacher's top-k logits on each draw are stored (fp16). Training then shows the student one of those draws of each
image per epoch and looks its teacher logits up, so the student and the teacher always see the same pixels (a
consistent teacher, as Beyer et al. 2022 found necessary) and no teacher runs during training.

A draw is named by its augmentation seed (the crop and flip parameters are regenerated from it exactly), which
depends on the image and the draw, not on the training seed: one cache serves every seed and every budget. The
file is tied by a fingerprint to the dataset, the augmentation, the teacher's weights and ``K``; another of any
of them is refused, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .compute import ForwardCost

__all__ = [
    "CACHE_SEED", "TeacherCache", "cache_fingerprint", "load_or_make_cache", "make_teacher_cache", "weights_digest",
]  # fmt: skip

logger = logging.getLogger(__name__)

CACHE_SEED = 8_191  # the seed of every cache's augmentation draws (not the training seed: every run reuses them)
FORMAT_VERSION = "1"


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights and buffers (names, shapes, dtypes and values): the identity of a teacher
    here, and of the weights a benchmark run starts from (benchmarks/accuracy.py)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_fingerprint(teacher: nn.Module, dataset: Any, draws: int, top_k: int) -> dict[str, str]:
    """What a cache depends on, part by part (so a refusal can say which part differs).

    Args:
        teacher: the fixed teacher.
        dataset: the training :class:`~adaptive_depth.training.loaders.TransformedDataset` in draw mode.
        draws, top_k: augmentation draws per image, logits kept per draw.
    """
    data = dataset.data
    return {
        "format": FORMAT_VERSION,
        "dataset": f"{getattr(data, '_fingerprint', 'unknown')}:{len(data)}",
        "augmentation": hashlib.sha256(repr(dataset.transform).encode()).hexdigest()[:16],
        "teacher": weights_digest(teacher),
        "draws": str(draws),
        "top_k": str(top_k),
        "draw_seed": str(CACHE_SEED),
    }


@dataclass
class TeacherCache:
    """The teacher's top-k logits for every (image, draw), indexed by key ``image * draws + draw``.

    Attributes:
        values: ``[N * draws, k]`` fp16 logits, largest first.
        indices: ``[N * draws, k]`` their classes.
        num_classes: width of the logits a lookup returns.
        making_flops: the teacher FLOPs spent making the cache (charged to every run that uses it).
        fingerprint: what it was made from (:func:`cache_fingerprint`).
    """

    values: torch.Tensor
    indices: torch.Tensor
    num_classes: int
    making_flops: float
    fingerprint: dict[str, str]

    def logits(self, keys: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, num_classes]`` for a batch of keys.

        A class outside the stored top-k gets the smallest stored logit of its row (an upper bound on its own), so
        with ``k`` equal to the number of classes the teacher's softmax is exact.
        """
        if self.values.device != keys.device:
            self.values, self.indices = self.values.to(keys.device), self.indices.to(keys.device)
        values = self.values[keys].float()
        out = values[:, -1:].expand(-1, self.num_classes).clone()
        return out.scatter_(1, self.indices[keys], values)

    def save(self, path: str | Path) -> None:
        """Write the cache as safetensors, its fingerprint in the metadata (atomically: a temporary file renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        meta = {
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "num_classes": str(self.num_classes),
            "making_flops": repr(float(self.making_flops)),
        }
        save_file({"values": self.values.cpu(), "indices": self.indices.cpu()}, str(partial), metadata=meta)
        partial.replace(path)

    @classmethod
    def load(cls, path: str | Path, fingerprint: dict[str, str]) -> TeacherCache:
        """Read a cache written by :meth:`save`, refusing one made from anything else than ``fingerprint`` says.

        Raises:
            ConfigError: the file is not a teacher cache, or another dataset, augmentation, teacher or draw count
                made it.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            stored = json.loads(meta["fingerprint"])
            num_classes, making = int(meta["num_classes"]), float(meta["making_flops"])
        except Exception as e:  # a foreign or broken file: one clear message
            raise ConfigError(f"{path} is not a teacher cache written by adaptive-depth ({e}); delete it") from e
        differs = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if differs:
            raise ConfigError(
                f"the teacher cache {path} was made for another {', '.join(differs)} "
                f"(cache: { {k: stored.get(k) for k in differs} }, now: { {k: fingerprint.get(k) for k in differs} }); "
                "delete it to make it again, or give leader_cache another path"
            )
        return cls(tensors["values"], tensors["indices"], num_classes, making, stored)


class _Draws(Dataset):
    """Every (image, draw) of a dataset in draw mode, as ``(pixels, key)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) * self.dataset.draws

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        return self.dataset.draw_view(int(key)), int(key)


@torch.no_grad()
def make_teacher_cache(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    *,
    top_k: int,
    batch_size: int,
    flops_per_image: float,
    prepare: Callable[[DataLoader], Any] = lambda loader: loader,
    gather: Callable[[Any], Any] = lambda x: x,
    device: torch.device | str = "cpu",
) -> TeacherCache:
    """Run ``teacher`` once over every augmentation draw of every image and keep its top-k logits.

    Args:
        teacher: the fixed teacher's logits of a batch (in eval mode).
        dataset: the training dataset in draw mode (``TransformedDataset(..., draws=K)``).
        top_k: logits kept per draw (at most the number of classes).
        batch_size: images per teacher forward.
        flops_per_image: the teacher's forward FLOPs on one image (the making is charged ``N * K`` of them).
        prepare: shards the loader over processes (``accelerator.prepare``).
        gather: collects ``(keys, values, indices)`` from every process (``accelerator.gather``).
        device: where the teacher runs.
    """
    loader = prepare(DataLoader(_Draws(dataset), batch_size=batch_size, shuffle=False))
    rows = len(dataset) * dataset.draws
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    num_classes = 0
    for pixels, keys in loader:
        logits = teacher(pixels.to(device)).float()
        num_classes = logits.shape[-1]
        top = logits.topk(min(top_k, num_classes), dim=-1)
        keys, top_values, top_indices = gather((keys.to(device), top.values.half(), top.indices))
        if values is None:
            values = torch.zeros(rows, top_values.shape[-1], dtype=torch.float16, device=device)
            indices = torch.zeros(rows, top_values.shape[-1], dtype=torch.long, device=device)
        values[keys], indices[keys] = top_values, top_indices  # type: ignore[index]
    if values is None or indices is None:
        raise ConfigError("the training data is empty: there is nothing to make a teacher cache of")
    return TeacherCache(values, indices, num_classes, float(flops_per_image) * rows, {})


def load_or_make_cache(
    teacher: nn.Module,
    dataset: Any,
    config: Any,
    example: torch.Tensor,
    logits: Callable[[torch.Tensor], torch.Tensor],
    accelerator: Any,
) -> TeacherCache:
    """``leader="cached"``: the cache of ``config.leader_cache`` when it was made from this dataset, augmentation
    and teacher (another is refused), else one made now (sharded over the processes) and written there.

    Args:
        teacher: the fixed teacher (its weights enter the fingerprint).
        dataset: the training dataset in draw mode.
        config: the ``TrainingConfig`` (``leader_cache``, ``leader_cache_top_k``, ``batch_size``).
        example: one input image (``[1, C, H, W]``), to count the teacher's FLOPs when the cache is made.
        logits: the teacher's logits of a batch.
        accelerator: shards the making and gathers it; only the main process writes the file.
    """
    if getattr(dataset, "draws", None) is None:
        raise ConfigError(
            "leader='cached' needs a training loader in draw mode: build the loaders with "
            "make_loaders(data, model, **config.loader_options)"
        )
    fingerprint = cache_fingerprint(teacher, dataset, dataset.draws, config.leader_cache_top_k)
    path = Path(config.leader_cache) if config.leader_cache else None
    if path is not None and path.is_file():
        return TeacherCache.load(path, fingerprint)
    cache = make_teacher_cache(
        logits, dataset, top_k=config.leader_cache_top_k, batch_size=config.batch_size,
        flops_per_image=ForwardCost(teacher, example).full, prepare=accelerator.prepare, gather=accelerator.gather,
        device=accelerator.device,
    )  # fmt: skip
    cache.fingerprint = fingerprint
    if path is not None and accelerator.is_main_process:
        cache.save(path)
    accelerator.wait_for_everyone()
    return cache
