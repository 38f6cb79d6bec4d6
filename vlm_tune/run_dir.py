"""The run folder (`train.output_dir`): one run writes it at a time, and two runs never mix in it silently.

- A lock (`run.lock`, an OS file lock holding the PID and host) stops a second run on the same folder and
  names the holder. The OS drops the lock when its process dies, even by SIGKILL; the next run takes it over
  and says whose it was.
- A fresh run into a folder that holds checkpoints is refused unless `train.overwrite` is set.
- Temporary folders of saves and prunes that a kill interrupted are cleaned up (under the lock).
- The records (log.jsonl...) describe one run: a fresh start begins them anew; a resumed run keeps the
  records up to the step it resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Optional

from vlm_tune.checkpoint import (
    CheckpointError,
    checkpoint_step,
    clean_temporary_folders,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)
from vlm_tune.errors import VlmTuneError, disk_error
from vlm_tune.run_log import trim_log

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so no protection against a second run
    fcntl = None

logger = logging.getLogger("vlm_tune.train")
LOCK_FILE = "run.lock"
RUN_RECORDS = ("log.jsonl", "loss.png", "bad_samples.jsonl", "best.json", "tensorboard")  # anew in each fresh run


class RunFolderError(VlmTuneError):
    """The run folder cannot be used: not writable, in use by another run, or holding another run."""


class RunFolder:
    """A locked run folder; `release()` gives the lock back (the OS does so when the process dies)."""

    def __init__(self, path: Path, lock: Optional[IO] = None):
        self.path = path
        self._lock = lock

    def release(self) -> None:
        """Empty the lock file and unlock it (the file stays, so no other run ever locks a deleted file)."""
        if self._lock is None:
            return
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.close()  # closing drops the flock
        self._lock = None


def _holder(text: str) -> str:
    """The lock holder in words, from the lock file's JSON."""
    try:
        holder = json.loads(text)
        return f"PID {holder['pid']} on host {holder['host']}, started {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no PID"


def _lock(path: Path) -> Optional[IO]:
    lock_path = path / LOCK_FILE
    handle = open(lock_path, "a+", encoding="utf-8")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _holder(handle.read())
        handle.close()
        raise RunFolderError(
            f"train.output_dir: {path} is in use by another run ({holder}); wait for it to end, or choose "
            f"another train.output_dir"
        ) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:  # its process died holding the lock (the OS released it)
        logger.warning("%s: took over the lock of a run that is no longer running (%s)", path, _holder(previous))
    handle.seek(0)
    handle.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
    handle.flush()
    return handle


def lock_run_folder(path: str | Path) -> RunFolder:
    """Create the run folder, lock it against other runs, and clean up what killed saves left behind.

    Raises:
        RunFolderError: the folder cannot be made or written (naming the path and why, a full disk too),
            or another live run holds it (naming its PID and host).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"train.output_dir: cannot write the run folder {path}: it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        folder = RunFolder(path, _lock(path))
    except OSError as exc:
        raise RunFolderError(f"train.output_dir: cannot write the run folder {path} ({disk_error(exc)})") from None
    for line in clean_temporary_folders(path):
        logger.warning("%s: left by an interrupted save or prune: %s", path, line)
    return folder


def start_records(path: Path, resume_step: Optional[int], recipe: Any) -> None:
    """Check that the run may write here, make the folder's records describe this run alone, write recipe.yaml.

    Args:
        path: the locked run folder.
        resume_step: the step of the checkpoint resumed from, or None for a fresh run.
        recipe: the run's `Recipe` (`train.overwrite`: a fresh run may start where checkpoints are).
    Raises:
        RunFolderError: a fresh run, without train.overwrite, in a folder that holds checkpoints; or the
            recipe cannot be written (naming the path, and a full disk as such).
    """
    from vlm_tune.recipe import dump_recipe

    if resume_step is not None:
        trim_log(path / "log.jsonl", resume_step)  # the steps to be redone are logged again
    else:
        _start_fresh(path, recipe.train.overwrite)
    try:
        dump_recipe(recipe, path / "recipe.yaml")
    except OSError as exc:
        raise RunFolderError(f"train.output_dir: cannot write {path / 'recipe.yaml'} ({disk_error(exc)})") from None


def _start_fresh(path: Path, overwrite: bool) -> None:
    existing = list_checkpoints(path)
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise RunFolderError(
            f"train.output_dir: {path} already holds checkpoints of a run ({names}); continue it with "
            f"train.resume=auto, or choose a new train.output_dir (train.overwrite=true starts a new run there)"
        )
    removed = [name for name in RUN_RECORDS if (path / name).exists()]
    for name in removed:
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if removed:
        logger.warning("%s: a new run starts here; removed the earlier run's %s", path, ", ".join(removed))
    if existing:
        logger.warning(
            "%s: train.overwrite: the earlier run's %s stay (train.keep_checkpoints prunes them first)",
            path,
            ", ".join(p.name for p in existing),
        )


def on_main_process(accelerator, action: Callable[[], Any]) -> Any:
    """Run `action` on the main process; an error it raises is raised on every process (none waits forever)."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except VlmTuneError as error:
            failure = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if failure is None else str(failure)])[0]
        if failure is None and message is not None:
            raise RunFolderError(message)
    if failure is not None:
        raise failure
    return result


def open_run_folder(recipe: Any, accelerator) -> tuple[RunFolder, Optional[Path]]:
    """Lock the recipe's run folder, find the checkpoint to resume from, and start this run's records there.

    Returns:
        (the locked folder, to release when the run ends; the checkpoint train.resume names, or None)
    Raises:
        RunFolderError, CheckpointError: on every process (see `lock_run_folder`, `start_records`,
            `resume_checkpoint`).
    """
    run_dir = Path(recipe.train.output_dir)
    folder = on_main_process(accelerator, lambda: lock_run_folder(run_dir)) or RunFolder(run_dir)
    try:
        resume_from = resume_checkpoint(recipe, run_dir)
        resume_step = checkpoint_step(resume_from) if resume_from is not None else None
        on_main_process(accelerator, lambda: start_records(run_dir, resume_step, recipe))
    except BaseException:
        folder.release()
        raise
    return folder, resume_from


def resume_checkpoint(recipe: Any, run_dir: Path) -> Optional[Path]:
    """The checkpoint train.resume names (auto: the newest complete one of the run folder), or None."""
    if not recipe.train.resume:
        return None
    if recipe.train.resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            logger.info("train.resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
        return found
    try:
        return resolve_checkpoint(recipe.train.resume)
    except CheckpointError as error:
        raise CheckpointError(f"train.resume: {error}") from None
