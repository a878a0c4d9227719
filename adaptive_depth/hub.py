"""Files of a saved adaptive-depth model: fetching them, checking them before anything is touched, saving atomically.

A saved model is a folder (or Hub repo) with ``config.json`` (:class:`~adaptive_depth.AdaptiveDepthConfig`),
``model.safetensors`` (the base model's weights, with the BatchNorm statistics of training) and, after per-depth
recalibration, ``depth_norms.safetensors``. The weights file's metadata records a digest of the structure it was
saved with (stages, policy, recalibrated depths), so a hand-edited ``config.json`` is caught on load instead of
silently running a different network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import nn

from .card import CARD_MARKER
from .config import AdaptiveDepthConfig
from .errors import CheckpointError, WeightsUnavailableError
from .loading import HubOptions, Resolved

__all__ = [
    "NORMS_NAME",
    "PROCESSOR_NAME",
    "STRUCTURE_KEY",
    "WEIGHTS_NAME",
    "check_weights",
    "fetch",
    "is_ours",
    "load_image_processor",
    "read_safetensors",
    "replace_files_atomically",
]

WEIGHTS_NAME = "model.safetensors"
NORMS_NAME = "depth_norms.safetensors"
PROCESSOR_NAME = "preprocessor_config.json"  # a transformers base's image processor, as transformers writes it
STRUCTURE_KEY = "adaptive_depth.structure"  # safetensors metadata: the config digest the weights were saved with


def fetch(resolved: Resolved, filename: str, hub: HubOptions) -> str:
    """Path of ``filename`` in a local folder or a Hub repo (downloaded to the cache)."""
    if resolved.local:
        path = Path(resolved.location) / filename
        if not path.is_file():
            raise CheckpointError(f"{resolved.location} has no {filename}; the checkpoint is incomplete, save it again")
        return str(path)
    try:
        return hub.download(resolved.location, filename)
    except LocalEntryNotFoundError as e:
        raise WeightsUnavailableError(
            f"{filename} of {resolved.location!r} is not in the local cache and the Hub cannot be reached"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"Hub repo {resolved.location!r} has no {filename}; the upload is incomplete") from e


def load_image_processor(path: str | os.PathLike[str]) -> Any:
    """The transformers image processor saved as ``path`` (a ``preprocessor_config.json``)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(str(Path(path).parent))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid image processor config ({e}); save the model again") from e


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its metadata; a corrupt file is a :class:`CheckpointError`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); save or download it again") from e


def check_weights(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    config: AdaptiveDepthConfig,
    source: str,
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` fit ``model`` and ``config`` is the one saved with them.

    Nothing is loaded: this runs before the model is touched, so a refused checkpoint leaves the model as it was.
    Tensors that ``safetensors.torch.save_model`` dropped as duplicates of shared storage (named in the metadata)
    count as present.
    """
    saved = metadata.get(STRUCTURE_KEY)
    if saved is not None and saved != config.structure_digest():
        raise CheckpointError(
            f"{source} was saved with other stages, depth policy or recalibrated depths than its config.json lists "
            "(the config was edited, or belongs to another save). Save the model again; to gate other blocks, wrap "
            "the base model again with block_patterns=[...]"
        )
    state = model.state_dict()
    present = set(tensors) | {alias for alias, kept in metadata.items() if kept in tensors}
    missing, unexpected = sorted(set(state) - present), sorted(set(tensors) - set(state))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(state[k].shape)} in the model"
        for k in sorted(set(tensors) & set(state))
        if tensors[k].shape != state[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the weights in {source} do not match the {config.base_model.architecture} architecture of its "
            f"config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}"
        )


@contextlib.contextmanager
def replace_files_atomically(folder: Path, *, keep_foreign: tuple[str, ...] = ()) -> Iterator[Path]:
    """Write into a temporary folder; on success, move each file over its namesake in ``folder``.

    Everything is written before anything in ``folder`` changes, so a failed save (a full disk, an error in the
    middle) leaves the previous files there, complete and loadable. The moves are renames on one filesystem.

    Args:
        folder: the destination (created if missing).
        keep_foreign: names that are moved only if ``folder`` has no such file yet, or if
            :func:`is_ours` says the existing one was written by this library (a user's README stays).
    """
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save to {folder}: it is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        yield staging
        # The weights first and the config last: a reader that sees the new config finds the new weights.
        names = sorted(os.listdir(staging), key=lambda n: (n == "config.json", n))
        for name in names:
            target = folder / name
            if name in keep_foreign and target.exists() and not is_ours(target):
                continue
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_ours(path: Path) -> bool:
    """True if ``path`` is a model card this library generated (it may be refreshed; a user's README may not)."""
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
