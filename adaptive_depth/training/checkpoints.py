"""Training checkpoints and output folders: complete or invisible, resumable only by the run that wrote them.

A checkpoint is a folder ``<output_dir>/checkpoints/step_<N>`` holding accelerate's state (model weights in
safetensors; optimizer and RNG states, which accelerate reads back with ``torch.load(weights_only=True)``) and
this library's own state in ``trainer_state.json`` (progress, learning-rate schedule, the training config and
the run's id). It is written under a temporary name and renamed when complete, so an interrupted save is never
taken for a checkpoint. Nothing of ours is pickled.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..errors import CheckpointError, ConfigError
from ..hub import NORMS_NAME, WEIGHTS_NAME, is_ours

__all__ = [
    "CHECKPOINT_PREFIX",
    "FINAL_OUTPUTS",
    "STATE_NAME",
    "Progress",
    "check_output_dir",
    "check_resumable",
    "check_resume",
    "checkpoint_dirs",
    "load_checkpoint",
    "prepare_output_dir",
    "resolve_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"  # written last, inside the checkpoint: a checkpoint without it is incomplete
STATE_FORMAT = 1
# What a finished run writes into its output folder (README.md only counts when we generated it).
FINAL_OUTPUTS = (
    "config.json",
    WEIGHTS_NAME,
    NORMS_NAME,
    "README.md",
    "pareto.png",
    "training_config.json",
    "results.json",
)
RUN_DIRS = (CHECKPOINTS_DIR, "logs")  # written while training; a resumed run finds them there


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
    staging = root / f".{final.name}.incomplete"
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
        if not dirs:
            where = f"{output_dir}/{CHECKPOINTS_DIR}" if output_dir is not None else "(no output_dir)"
            raise ConfigError(f"no complete checkpoint to resume from in {where}; start without resuming")
        return dirs[-1]
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a folder written by the trainer")
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"checkpoint {path} is incomplete (no {STATE_NAME}): its save was interrupted")
    return path


# Fields a resumed run may change: they act after training (evaluation) or only extend it.
RESUMABLE_CHANGES = ("epochs", "per_depth_norms", "recalibration_batches")


def check_resumable(state: dict[str, Any], config: dict[str, Any], processes: int, path: Path) -> None:
    """Refuse to resume a checkpoint written with other settings or another number of processes."""
    saved = state.get("config", {})
    changed = sorted(k for k, v in config.items() if saved.get(k, v) != v and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            f"{path} was written by a run with other settings ({', '.join(f'{k}={saved[k]!r}' for k in changed)}); "
            "resume with the settings it was trained with, or start a new run"
        )
    if state.get("processes", processes) != processes:
        raise ConfigError(
            f"{path} was written by {state['processes']} process(es); resume it with the same number "
            f"(this run has {processes})"
        )


def check_resume(output_dir: Path | None, checkpoint: str | Path, config: dict[str, Any], processes: int) -> Path:
    """The checkpoint a resumed run would load, checked (complete, this run's settings and processes) without
    loading it: call it before anything in the output folder is removed."""
    path = resolve_checkpoint(output_dir, checkpoint)
    check_resumable(_read_state(path), config, processes, path)
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


def check_output_dir(output_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an output folder where a run would lose the user's files (reads only: see :func:`prepare_output_dir`)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file; pick a folder")
    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    allowed = set(RUN_DIRS) if resume else set()
    blocking = [name for name in entries if name not in allowed]
    if blocking and not overwrite:
        what = "a resumed run may only find checkpoints/ and logs/ there" if resume else "a fresh run needs it empty"
        raise ConfigError(
            f"--output-dir {output_dir} holds {blocking[:5]}: {what}. Pick another folder, or pass "
            "--overwrite-output-dir to replace what adaptive-depth wrote there"
            + ("" if resume else " (or --resume-from-checkpoint latest to continue a run)")
        )


def prepare_output_dir(output_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Make ``output_dir`` ready for a run, before anything is trained; refuse what would lose the user's files.

    A fresh run needs an empty (or new) folder; a resumed one may find only what a run writes while training
    (``checkpoints/``, ``logs/``). ``overwrite`` removes what this library wrote there before (a finished model,
    and for a fresh run the old checkpoints, so that it can never resume from another run); files of anyone else
    are left alone. Call it on the main process only.
    """
    check_output_dir(output_dir, overwrite=overwrite, resume=resume)
    if overwrite and output_dir.is_dir():
        for name in FINAL_OUTPUTS:
            path = output_dir / name
            if path.is_file() and (name != "README.md" or is_ours(path)):
                path.unlink()
        if not resume:
            for path in (output_dir / CHECKPOINTS_DIR).glob(f"*{CHECKPOINT_PREFIX}*"):
                if path.is_dir() and (checkpoint_step(path) is not None or path.name.endswith(".incomplete")):
                    shutil.rmtree(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir} cannot be written ({e}); pick another folder") from e
