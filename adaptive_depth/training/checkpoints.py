"""Training checkpoints: complete or invisible, resumable only by the run that wrote them, with its settings.

A checkpoint is a folder ``<output_dir>/checkpoints/step_<N>`` holding accelerate's state (model weights in
safetensors; optimizer and RNG states, which accelerate reads back with ``torch.load(weights_only=True)``) and
this library's own state in ``trainer_state.json`` (progress, learning-rate schedule, the training config, the
run's other settings and its id). It is written under a temporary name and renamed when complete, so an interrupted
save is never taken for a checkpoint. Nothing of ours is pickled. The output folder around the checkpoints is
``output_dir.py``'s.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..errors import CheckpointError, ConfigError

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "INCOMPLETE_SUFFIX",
    "STATE_NAME",
    "Progress",
    "check_resumable",
    "check_resume",
    "checkpoint_dirs",
    "checkpoint_step",
    "load_checkpoint",
    "recorded_settings",
    "remove_run_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE_SUFFIX = ".incomplete"  # a checkpoint being written: ``.step_<N>.incomplete``, renamed when complete
STATE_NAME = "trainer_state.json"  # written last, inside the checkpoint: a checkpoint without it is incomplete
STATE_FORMAT = 1


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint's ``trainer_state.json``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_done: int = 0  # batches of the current epoch already trained on (this process's share)
    loss_sum: float = 0.0  # of the current epoch's batches so far
    history: list[float] = field(default_factory=list)  # mean loss of each finished epoch
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the run that wrote a checkpoint


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a ``step_N`` checkpoint folder holds, or ``None`` for any other name."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_dirs(output_dir: Path | None, *, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first (only those of ``run_id`` if given).

    A ``step_N`` folder without ``trainer_state.json`` (an interrupted save of an older version, or a folder
    emptied by hand) is skipped with a warning.
    """
    root = output_dir / CHECKPOINTS_DIR if output_dir is not None else None
    if root is None or not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if checkpoint_step(path) is None or not path.is_dir():
            continue
        if not (path / STATE_NAME).is_file():
            logger.warning("skipping %s: an incomplete checkpoint (no %s)", path, STATE_NAME)
            continue
        if run_id is not None and _read_state(path).get("progress", {}).get("run_id") != run_id:
            continue
        found.append(path)
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_NAME} cannot be read ({e}); resume from an earlier checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path / STATE_NAME} is not a checkpoint state this version writes; start afresh")
    return state


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict[str, Any], step: int) -> Path:
    """Save accelerate's state and ``state`` (JSON) as ``checkpoints/step_<step>``, visible only when complete.

    Every process calls this (accelerate saves each process's RNG state); the main one writes our state last
    and renames the folder.
    """
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    staging = root / f".{final.name}{INCOMPLETE_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / STATE_NAME).write_text(json.dumps({"format": STATE_FORMAT, **state}, indent=2), encoding="utf-8")
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            shutil.rmtree(final)
        staging.rename(final)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: Path | None, checkpoint: str | Path) -> Path:
    """The checkpoint folder ``checkpoint`` names: a path, or ``"latest"`` (the last complete one)."""
    if str(checkpoint) == "latest":
        dirs = checkpoint_dirs(output_dir)
        if output_dir is None:
            raise ConfigError("resuming from 'latest' needs the output folder the checkpoints are in (output_dir)")
        if not dirs:
            raise ConfigError(
                f"no complete checkpoint to resume from in {output_dir / CHECKPOINTS_DIR}; start without resuming"
            )
        return dirs[-1]
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a folder written by the trainer")
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {STATE_NAME}): its save was interrupted")
    return path


# Fields a resumed run may change: they act after training (evaluation) or only extend it.
RESUMABLE_CHANGES = ("epochs", "per_depth_norms", "recalibration_batches")


def recorded_settings(settings: Mapping[str, Any] | None, accelerator: Accelerator) -> dict[str, Any]:
    """What a checkpoint records of a run besides its :class:`TrainingConfig`: ``settings`` (the model, data, input
    size... a script chose) and the mixed precision, as JSON values (tuples become lists), so that they compare
    equal to what is read back."""
    values = {**(settings or {}), "mixed_precision": str(accelerator.mixed_precision)}
    try:
        return json.loads(json.dumps(values))
    except TypeError as e:
        raise ConfigError(f"run settings must be JSON values (text, numbers, lists), got {values!r}: {e}") from e


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], exempt: tuple[str, ...] = ()) -> list[str]:
    """``key=saved (this run: now)`` for every key both hold with other values, but for ``exempt``."""
    return [
        f"{k}={saved[k]!r} (this run: {v!r})"
        for k, v in sorted(now.items())
        if k in saved and saved[k] != v and k not in exempt
    ]


def check_resumable(
    state: dict[str, Any],
    config: dict[str, Any],
    processes: int,
    path: Path,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to resume a checkpoint written with other settings or another number of processes.

    ``config`` is compared field by field (but for :data:`RESUMABLE_CHANGES`), and so is every entry of
    ``settings`` (:func:`recorded_settings`) that the checkpoint recorded; one it did not record (a checkpoint of an
    earlier version) is named in a warning, since it cannot be checked.
    """
    changed = _differences(state.get("config", {}), config, RESUMABLE_CHANGES)
    changed += _differences(state.get("settings", {}), settings or {})
    if changed:
        raise ConfigError(
            f"{path} was written by a run with other settings ({', '.join(changed)}); resume with the settings it "
            "was trained with, or start a new run (in another --output-dir, or with --overwrite-output-dir)"
        )
    unchecked = sorted(set(settings or {}) - set(state.get("settings", {})))
    if unchecked:
        logger.warning("%s does not record %s: resuming without checking them", path, ", ".join(unchecked))
    if state.get("processes", processes) != processes:
        raise ConfigError(
            f"{path} was written by {state['processes']} process(es); resume it with the same number "
            f"(this run has {processes})"
        )


def check_resume(
    output_dir: Path | None,
    checkpoint: str | Path,
    config: dict[str, Any],
    processes: int,
    *,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """The checkpoint a resumed run would load, checked (complete, this run's config, settings and processes)
    without loading it: call it before anything in the output folder is removed."""
    path = resolve_checkpoint(output_dir, checkpoint)
    check_resumable(_read_state(path), config, processes, path, settings)
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Load accelerate's state from ``path`` and return our state (``trainer_state.json``)."""
    state = _read_state(path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # accelerate and safetensors raise many types for a damaged folder
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); resume from an earlier one"
        ) from e
    return state


def remove_run_checkpoints(output_dir: Path | None, run_id: str) -> None:
    """Delete the checkpoints of run ``run_id`` (after it finished); other runs' stay. An emptied
    ``checkpoints/`` folder goes too. Call it on the main process only."""
    for path in checkpoint_dirs(output_dir, run_id=run_id):
        shutil.rmtree(path, ignore_errors=True)
    root = output_dir / CHECKPOINTS_DIR if output_dir is not None else None
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
