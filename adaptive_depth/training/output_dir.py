"""A training run's output folder, from the first check to the last file: nothing the user had is lost, one run at
a time writes it, and a resumed run continues only a checkpoint of its own settings.

:class:`OutputDir` is the whole lifecycle in the order a script needs it::

    output = OutputDir("out", resume_from_checkpoint="latest")  # refuses a folder where files would be lost
    checkpoint = output.checkpoint_to_resume(config, settings, accelerator)  # complete, these settings
    ...  # load the data, build the models and the trainer: everything that can fail before a file is touched
    with output.claim(accelerator):  # locks the folder for this run, clears what --overwrite-output-dir replaces
        trainer.train(resume_from_checkpoint=checkpoint)
        output.save(trainer, trainer.evaluate())  # only while this run still holds the folder
        output.finish(trainer)  # this run's checkpoints removed

**The lock.** A run holds ``<output_dir>/.adaptive-depth.lock`` (JSON: the run's token, process id, host and the
process's start time) from :meth:`OutputDir.claim` to its end, so a second run started on the same folder is refused
instead of overwriting the first one's model. A run that was killed cannot remove its lock; the next run finds it
stale when the process it names no longer runs on this host (its id is gone, or now belongs to a process started at
another time), replaces it and says so. A lock from another host cannot be checked from here: it is refused, naming
the host, until it is deleted by hand. Before the final save the run checks that the lock is still its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from accelerate import Accelerator

from ..errors import ConfigError
from ..saved import CARD_NAME, CONFIG_NAME, NORMS_NAME, PLOT_NAME, WEIGHTS_NAME, is_ours, is_staging
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    INCOMPLETE_SUFFIX,
    check_resume,
    checkpoint_step,
    recorded_settings,
    remove_run_checkpoints,
)

if TYPE_CHECKING:
    from ..report import DepthResult
    from .config import TrainingConfig
    from .evaluate import TrainingResult
    from .trainer import CooperativeTrainer

__all__ = [
    "FINAL_OUTPUTS",
    "LOCK_NAME",
    "LOGS_DIR",
    "RESULTS_NAME",
    "TRAINING_CONFIG_NAME",
    "OutputDir",
    "check_output_dir",
    "prepare_output_dir",
    "write_run_files",
]

logger = logging.getLogger(__name__)

TRAINING_CONFIG_NAME = "training_config.json"  # the run's TrainingConfig, beside the model it trained
RESULTS_NAME = "results.json"  # the evaluation: top-1 / top-5, FLOPs and latency of each player at each depth
LOGS_DIR = "logs"  # the trackers' folder (accelerate's logging_dir)
# What a finished run writes into its output folder (README.md only counts when we generated it).
FINAL_OUTPUTS = (CONFIG_NAME, WEIGHTS_NAME, NORMS_NAME, CARD_NAME, PLOT_NAME, TRAINING_CONFIG_NAME, RESULTS_NAME)
RUN_DIRS = (CHECKPOINTS_DIR, LOGS_DIR)  # written while training; a resumed run finds them there
LOCK_NAME = ".adaptive-depth.lock"
UNREADABLE_LOCK_S = 10.0  # a lock file is written right after it is made: one still unreadable after this is stale


def write_run_files(folder: Path, config: TrainingConfig, results: Sequence[DepthResult]) -> None:
    """Beside a saved model: the run's training config and its evaluation (every player at every depth)."""
    config.save(folder / TRAINING_CONFIG_NAME)
    (folder / RESULTS_NAME).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n", encoding="utf-8")


@dataclass
class RunLock:
    """Who holds an output folder: the run's token and the process that runs it."""

    token: str
    pid: int
    host: str
    process_started: float  # psutil's create_time: with the pid, names one process even if the pid is reused
    since: str

    @classmethod
    def for_this_process(cls) -> RunLock:
        """A new lock for a run in this process."""
        pid = os.getpid()
        return cls(uuid.uuid4().hex, pid, socket.gethostname(), psutil.Process(pid).create_time(), time.strftime("%c"))

    @classmethod
    def read(cls, path: Path) -> RunLock | None:
        """The lock at ``path``; ``None`` if there is none or it cannot be read."""
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def describe(self) -> str:
        """``pid N on HOST, since DATE``."""
        return f"pid {self.pid} on {self.host}, since {self.since}"

    def is_running(self) -> bool | None:
        """``True`` while its process runs, ``False`` once it is gone, ``None`` if that cannot be told from here."""
        if self.host != socket.gethostname():
            return None
        try:
            started = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # it exists, but may not be inspected (another user's): take it as running
            return True
        return abs(started - self.process_started) < 1.0


def _lock_holder(output_dir: Path, owner: str | None = None) -> str | None:
    """``None`` if no running run but ``owner`` (a lock's token) holds ``output_dir``, else who holds it."""
    path = output_dir / LOCK_NAME
    if not path.is_file():
        return None
    lock = RunLock.read(path)
    if lock is not None and lock.token == owner:
        return None
    if lock is None:  # unreadable: a run killed between making and writing it, unless that was a moment ago
        try:
            young = time.time() - path.stat().st_mtime < UNREADABLE_LOCK_S
        except OSError:
            return None
        return "a run that is starting" if young else None
    running = lock.is_running()
    if running is None:
        return f"a run on another host ({lock.describe()}); if it has ended, delete {path}"
    return f"a run that is still going ({lock.describe()})" if running else None


def _run_file(name: str) -> bool:
    """The lock, or a model save's temporary folder: what a run keeps beside its outputs, never the user's."""
    return name == LOCK_NAME or is_staging(name)


def check_output_dir(
    output_dir: Path, *, overwrite: bool = False, resume: bool = False, owner: str | None = None
) -> None:
    """Refuse an output folder where a run would lose the user's files (reads only: see :func:`prepare_output_dir`).

    A folder held by a running run (other than the one whose lock token is ``owner``) is refused whatever the
    flags. A stale lock and the temporary folder of an interrupted model save (``.saving-*``) block nothing.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file; pick a folder")
    holder = _lock_holder(output_dir, owner)
    if holder is not None:
        raise ConfigError(
            f"--output-dir {output_dir} is in use by {holder}: wait for that run to end, or pick another folder"
        )
    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    allowed = set(RUN_DIRS) if resume else set()
    blocking = [name for name in entries if name not in allowed and not _run_file(name)]
    if blocking and not overwrite:
        what = "a resumed run may only find checkpoints/ and logs/ there" if resume else "a fresh run needs it empty"
        raise ConfigError(
            f"--output-dir {output_dir} holds {blocking[:5]}: {what}. Pick another folder, or pass "
            "--overwrite-output-dir to replace what adaptive-depth wrote there"
            + ("" if resume else " (or --resume-from-checkpoint latest to continue a run)")
        )


def prepare_output_dir(
    output_dir: Path, *, overwrite: bool = False, resume: bool = False, owner: str | None = None
) -> None:
    """Make ``output_dir`` ready for a run, before anything is trained; refuse what would lose the user's files.

    A fresh run needs an empty (or new) folder; a resumed one may find only what a run writes while training
    (``checkpoints/``, ``logs/``). ``overwrite`` removes what this library wrote there before (a finished model,
    and for a fresh run the old checkpoints, so that it can never resume from another run); files of anyone else
    are left alone. Call it on the main process only (:meth:`OutputDir.claim` does, after locking the folder: its
    lock's token is ``owner``).
    """
    check_output_dir(output_dir, overwrite=overwrite, resume=resume, owner=owner)
    if overwrite and output_dir.is_dir():
        for name in FINAL_OUTPUTS:
            path = output_dir / name
            if path.is_file() and (name != CARD_NAME or is_ours(path)):
                path.unlink()
        if not resume:
            for path in (output_dir / CHECKPOINTS_DIR).glob(f"*{CHECKPOINT_PREFIX}*"):
                if path.is_dir() and (checkpoint_step(path) is not None or path.name.endswith(INCOMPLETE_SUFFIX)):
                    shutil.rmtree(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir} cannot be written ({e}); pick another folder") from e


class OutputDir:
    """A training run's output folder: checked first, claimed (locked) for the run, saved into while still its own.

    Args:
        path: the folder (created when claimed).
        overwrite: replace what adaptive-depth wrote there before (a finished model, and for a fresh run the old
            checkpoints); files of anyone else stay.
        resume_from_checkpoint: a checkpoint folder, or ``"latest"`` (the last complete one in ``path``).

    Raises:
        ConfigError: at once, for a folder where the run would lose files (see :func:`check_output_dir`) or that
            a running run holds.
    """

    def __init__(
        self, path: str | Path, *, overwrite: bool = False, resume_from_checkpoint: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume_from_checkpoint = resume_from_checkpoint
        self._lock: RunLock | None = None
        check_output_dir(self.path, overwrite=overwrite, resume=self.resuming)

    @property
    def resuming(self) -> bool:
        """True for a run that continues a checkpoint."""
        return self.resume_from_checkpoint is not None

    @property
    def lock_file(self) -> Path:
        """The file that says which run holds the folder."""
        return self.path / LOCK_NAME

    def checkpoint_to_resume(
        self, config: TrainingConfig, settings: Mapping[str, Any] | None, accelerator: Accelerator
    ) -> Path | None:
        """The checkpoint to resume from, found, complete, and written with ``config``, ``settings`` (see
        :func:`~adaptive_depth.training.checkpoints.recorded_settings`) and this number of processes; ``None`` for
        a fresh run. Checked without loading anything, before the folder is touched."""
        if not self.resuming:
            return None
        return check_resume(
            self.path,
            self.resume_from_checkpoint,  # type: ignore[arg-type]
            config.to_dict(),
            accelerator.num_processes,
            settings=recorded_settings(settings, accelerator),
        )

    @contextmanager
    def claim(self, accelerator: Accelerator) -> Iterator[OutputDir]:
        """Hold the folder for this run: lock it, then clear what ``overwrite`` replaces; release it at the end.

        The main process does the file work; every process waits for it.
        """
        if accelerator.is_main_process:
            self._acquire()
            try:
                token = self._lock.token if self._lock is not None else None
                prepare_output_dir(self.path, overwrite=self.overwrite, resume=self.resuming, owner=token)
            except BaseException:
                self._release()
                raise
        accelerator.wait_for_everyone()
        try:
            yield self
        finally:
            if accelerator.is_main_process:
                self._release()

    def save(self, trainer: CooperativeTrainer, result: TrainingResult, *, push_to_hub: str | None = None) -> None:
        """Save (and push) the deployed model into the folder, if this run still holds it (:meth:`claim`)."""
        if trainer.accelerator.is_main_process:
            self._check_still_ours()
        trainer.save(result, self.path, push_to_hub=push_to_hub)

    def finish(self, trainer: CooperativeTrainer, *, keep_checkpoints: bool = False) -> None:
        """After the save: remove this run's checkpoints (unless ``keep_checkpoints``); other runs' stay."""
        if trainer.accelerator.is_main_process and not keep_checkpoints:
            remove_run_checkpoints(self.path, trainer.progress.run_id)
        trainer.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the lock
    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        mine = RunLock.for_this_process()
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.path)
                if holder is not None:
                    raise ConfigError(
                        f"--output-dir {self.path} is in use by {holder}: wait for that run to end, or pick "
                        "another folder"
                    ) from None
                stale = RunLock.read(self.lock_file)
                logger.warning(
                    "%s was left by a run that ended without releasing it (%s): this run takes the folder over",
                    self.lock_file,
                    stale.describe() if stale else "unreadable",
                )
                self.lock_file.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise ConfigError(f"--output-dir {self.path} cannot be written ({e}); pick another folder") from e
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(mine), f)
            self._lock = mine
            self._check_still_ours()  # another run replacing the same stale lock at this very moment
            return
        raise ConfigError(f"{self.lock_file} keeps being replaced by other runs; start this run again")

    def _check_still_ours(self) -> None:
        current = RunLock.read(self.lock_file)
        if self._lock is not None and current is not None and current.token == self._lock.token:
            return
        holder = f"another run ({current.describe()})" if current is not None else "no run (it was deleted)"
        self._lock = None
        raise ConfigError(
            f"--output-dir {self.path} is no longer this run's: {self.lock_file} names {holder}. Nothing was saved "
            f"there, so that another run's model is not overwritten; this run's checkpoints stay in "
            f"{self.path / CHECKPOINTS_DIR} (resume one with --resume-from-checkpoint, into a folder of its own)"
        )

    def _release(self) -> None:
        current = RunLock.read(self.lock_file)
        if self._lock is not None and current is not None and current.token == self._lock.token:
            self.lock_file.unlink(missing_ok=True)
        self._lock = None
