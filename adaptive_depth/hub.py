"""Files of a saved adaptive-depth model: fetching them, checking them before anything is touched, saving atomically.

A saved model is a folder (or Hub repo) with ``config.json`` (:class:`~adaptive_depth.AdaptiveDepthConfig`),
``model.safetensors`` (the base model's weights, with the BatchNorm statistics of training) and, after per-depth
recalibration, ``depth_norms.safetensors``. The weights file's metadata records a digest of the structure it was
saved with (stages, policy, recalibrated depths), so a hand-edited ``config.json`` is caught on load instead of
silently running a different network; ``config.json`` fingerprints every other file of its save, so a folder that
mixes two saves is refused. A save is complete or invisible across all its files (:func:`replace_files_atomically`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import nn

from .card import CARD_MARKER
from .config import AdaptiveDepthConfig
from .errors import CheckpointError, ConfigError, WeightsUnavailableError
from .loading import CONFIG_NAME, HubOptions, Resolved

__all__ = [
    "NORMS_NAME",
    "PROCESSOR_NAME",
    "SAVE_ID_KEY",
    "STRUCTURE_KEY",
    "WEIGHTS_NAME",
    "check_saved_together",
    "check_storable",
    "check_weights",
    "fetch",
    "fingerprint_json",
    "is_ours",
    "is_staging",
    "load_image_processor",
    "read_safetensors",
    "recover_interrupted_saves",
    "replace_files_atomically",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
NORMS_NAME = "depth_norms.safetensors"
PROCESSOR_NAME = "preprocessor_config.json"  # a transformers base's image processor, as transformers writes it
STRUCTURE_KEY = "adaptive_depth.structure"  # safetensors metadata: the config digest the weights were saved with
SAVE_ID_KEY = "adaptive_depth.save_id"  # safetensors metadata: the save that wrote the file (config.files lists it)
STAGING_PREFIX = ".saving-"  # a save's temporary folder inside the model folder
LOCK_NAME = ".lock"  # inside it: held by the saving process while it lives
PLAN_NAME = ".moves.json"  # inside it: written once every file is complete; the save is then finished by anyone
_BOOKKEEPING = (LOCK_NAME, PLAN_NAME, PLAN_NAME + ".tmp")
STARTING_S = 60.0  # a temporary folder younger than this without a lock belongs to a save that is starting


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


def check_storable(model: nn.Module) -> None:
    """Raise :class:`ConfigError` if ``model``'s state holds what safetensors cannot store (quantized modules)."""
    state = model.state_dict()
    packed = sorted(
        {name.rsplit(".", 2)[0] for name, v in state.items() if not isinstance(v, torch.Tensor)}
        | {name.rsplit(".", 1)[0] for name, v in state.items() if isinstance(v, torch.Tensor) and v.is_quantized}
    )
    if packed:
        raise ConfigError(
            f"save_pretrained() cannot save this model: {len(packed)} module(s) hold quantized or packed weights "
            f"(e.g. {packed[:3]}, made by torch.ao.quantization.quantize_dynamic or similar), which safetensors "
            "cannot store. Save the float model and quantize it again after loading, or export one depth "
            "(model.export(s)) and save that with torch.export / ONNX"
        )


def check_saved_together(
    config: AdaptiveDepthConfig, name: str, source: str, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Raise :class:`CheckpointError` unless the file ``name`` was written by the same save as ``config``.

    ``config.files`` fingerprints every file a save wrote: safetensors files by the save's id (also in their
    metadata), JSON files by the SHA-256 of their bytes. A folder that mixes two saves (one interrupted, or running
    now) fails here instead of loading the weights of one model with the settings of another.

    Args:
        config: the loaded ``config.json``.
        name: the file's name in the save (``model.safetensors``...).
        source: the file's path, read when ``metadata`` is not given, and named in the error.
        metadata: the safetensors metadata of the file, for safetensors files.
    """
    found = (metadata or {}).get(SAVE_ID_KEY) if metadata is not None else _sha256(source)
    expected = config.files.get(name)
    if not config.files and metadata is not None and found is None:
        return  # saved before saves were fingerprinted: nothing to compare
    if found != expected:
        raise CheckpointError(
            f"{source} was written by another save than the {CONFIG_NAME} beside it (fingerprint {found!r}, the config "
            f"lists {expected!r}): the folder mixes two saves, because a save into it is running now or was "
            "interrupted and could not be finished. Load it again when the save has ended; if this persists, save "
            "the model again"
        )


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_json(path: Path) -> str:
    """The fingerprint ``config.files`` keeps for a JSON file of a save (the SHA-256 of its bytes)."""
    return _sha256(path)


def is_staging(name: str) -> bool:
    """True for the name of a save's temporary folder inside a model folder (see :func:`replace_files_atomically`)."""
    return name.startswith(STAGING_PREFIX)


@contextlib.contextmanager
def replace_files_atomically(
    folder: Path, *, keep_foreign: tuple[str, ...] = (), replaces: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Write into a temporary folder inside ``folder``; when complete, move each file over its namesake in ``folder``.

    The save is complete or invisible: until every file is written, ``folder`` is untouched (a failed save, a full
    disk or a kill leaves the previous save there, complete). Once every file is written, a plan of the moves is
    recorded in the temporary folder, and from then on the save is finished even if this process dies: the next save
    into ``folder`` or load from it (:func:`recover_interrupted_saves`) makes the moves that are left. The temporary
    folder holds a lock for as long as its process lives, so only the folders of dead saves are finished or removed.

    Args:
        folder: the destination (created if missing).
        keep_foreign: names that are moved only if ``folder`` has no such file yet, or if
            :func:`is_ours` says the existing one was written by this library (a user's README stays).
        replaces: names this kind of save may write: one that this save did not write is removed from ``folder``
            when the save completes (it belongs to an earlier save and would describe another model).
    """
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save to {folder}: it is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(folder)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    lock = FileLock(staging / LOCK_NAME)
    lock.acquire()
    committed = False
    try:
        yield staging
        names = sorted(
            (n for n in os.listdir(staging) if n not in _BOOKKEEPING),
            key=lambda n: (n == CONFIG_NAME, n),  # the config last: a reader that sees it finds the rest
        )
        plan = {"move": names, "remove": [n for n in replaces if n not in names], "keep_foreign": list(keep_foreign)}
        pending = staging / (PLAN_NAME + ".tmp")
        pending.write_text(json.dumps(plan), encoding="utf-8")
        os.replace(pending, staging / PLAN_NAME)
        committed = True  # from here on the save is finished by whoever gets to it: this process or a later one
        _finish(folder, staging, plan)
    finally:
        lock.release()
        if not committed:
            _remove(staging)
    _remove(staging)


def _remove(staging: Path) -> None:
    """Delete a temporary folder, its lock last: a kill in the middle leaves files with their lock, or nothing."""
    for entry in staging.iterdir() if staging.is_dir() else ():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name != LOCK_NAME:
            entry.unlink(missing_ok=True)
    (staging / LOCK_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        staging.rmdir()


def _finish(folder: Path, staging: Path, plan: dict[str, Any]) -> None:
    """Make the moves of a complete save that are left (each move is a rename, so doing this twice is harmless)."""
    for name in plan["remove"]:
        (folder / name).unlink(missing_ok=True)
    for name in plan["move"]:
        source, target = staging / name, folder / name
        if not source.exists():
            continue  # moved before the process that began this was interrupted
        if name in plan["keep_foreign"] and target.exists() and not is_ours(target):
            continue
        os.replace(source, target)


def _read_plan(staging: Path) -> dict[str, Any] | None:
    try:
        plan = json.loads((staging / PLAN_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    ok = isinstance(plan, dict) and all(isinstance(plan.get(k), list) for k in ("move", "remove", "keep_foreign"))
    return plan if ok else None


def recover_interrupted_saves(folder: Path) -> None:
    """Finish the saves into ``folder`` whose process died after writing every file; remove those that died before.

    Saves still running (their temporary folder's lock is held) are left alone. A folder without a lock is removed
    when it is empty (its save died before locking it, or while removing it) or over a minute old; one with files
    but no lock, younger than that, is left alone. A complete save that cannot be finished here (a read-only folder)
    is a :class:`CheckpointError`: until it is finished the folder mixes two saves.
    """
    if not folder.is_dir():
        return
    for staging in sorted(p for p in folder.iterdir() if is_staging(p.name) and p.is_dir()):
        lock_path = staging / LOCK_NAME
        try:
            if not lock_path.exists() and not any(staging.iterdir()):
                staging.rmdir()  # a save killed before it locked its folder, or while it removed it: nothing in it
                continue
            if not lock_path.exists() and time.time() - staging.stat().st_mtime < STARTING_S:
                continue
            lock = FileLock(lock_path, timeout=0)
            lock.acquire()
        except Timeout:
            continue  # a save that is running now
        except OSError as e:
            if (staging / PLAN_NAME).exists():
                raise CheckpointError(
                    f"{folder} holds a save that was interrupted after all its files were written ({staging.name}), "
                    f"and it cannot be finished here ({e}); load or save the folder once where it can be written"
                ) from e
            continue  # an incomplete save: the folder still holds the previous one, complete
        try:
            plan = _read_plan(staging)
            if plan is not None:
                _finish(folder, staging, plan)
                logger.warning("finished a save into %s that was interrupted after all its files were written", folder)
        finally:
            lock.release()
        _remove(staging)


def is_ours(path: Path) -> bool:
    """True if ``path`` is a model card this library generated (it may be refreshed; a user's README may not)."""
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
