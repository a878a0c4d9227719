"""A save complete or invisible across its files: what was in a model folder stays loadable until every file of the
new save is written, and a save interrupted after that is finished by whoever comes next.

:func:`replace_files_atomically` writes into a temporary folder (``.saving-*``) inside the destination, locked while
its process lives; once every file is complete it records a plan of the moves, then makes them. A kill before the
plan leaves the previous save in place; a kill after it is finished by the next save into the folder or load from it
(:func:`recover_interrupted_saves`). Code that lists a model folder skips the names :func:`is_staging` recognises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import CheckpointError
from .card import is_ours
from .files import CONFIG_NAME

__all__ = ["LOCK_NAME", "STAGING_PREFIX", "is_staging", "recover_interrupted_saves", "replace_files_atomically"]

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".saving-"  # a save's temporary folder inside the model folder
LOCK_NAME = ".lock"  # inside it: held by the saving process while it lives
PLAN_NAME = ".moves.json"  # inside it: written once every file is complete; the save is then finished by anyone
_BOOKKEEPING = (LOCK_NAME, PLAN_NAME, PLAN_NAME + ".tmp")
STARTING_S = 60.0  # a temporary folder younger than this without a lock belongs to a save that is starting


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
