"""The run folder: a reused folder is refused (or overwritten on request, keeping this run's checkpoints), a lock
stops a second run and names it, a stale lock is taken over, and the records describe one run."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from test_train import _coco_set, _recipe
from tiny import tiny_vlm_folder

from vlm_tune.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from vlm_tune.errors import VlmTuneError
from vlm_tune.run_log import read_log
from vlm_tune.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    return {"model": str(tiny_vlm_folder("idefics3", root / "model")), "data": str(_coco_set(root / "data"))}


def _earlier_run(run_dir: Path) -> None:
    """What another run left in `run_dir`: checkpoint-9 and checkpoint-12, its recipe and its log."""
    run_dir.mkdir(parents=True)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    for step in (9, 12):
        save_checkpoint(run_dir, step, model, {"epoch": 0, "batches_done": step})
    (run_dir / "recipe.yaml").write_text("earlier: run\n")
    (run_dir / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 13)))


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    with pytest.raises(VlmTuneError) as refused:
        train(_recipe(setup, run_dir, max_steps=3, save_every=3))
    message = str(refused.value)
    assert "\n" not in message and "checkpoint-9, checkpoint-12" in message
    assert "train.resume=auto" in message and "train.output_dir" in message and "train.overwrite=true" in message
    assert (run_dir / "recipe.yaml").read_text() == "earlier: run\n"  # nothing of the earlier run was touched
    assert len(read_log(run_dir / "log.jsonl")) == 12
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-9", "checkpoint-12"]


def test_overwrite_starts_a_new_run_whose_checkpoints_outrank_the_old_ones(setup, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    recipe = _recipe(setup, run_dir, max_steps=3, save_every=1, keep_checkpoints=2, overwrite=True)
    train(recipe)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-3"]  # the old ones went first
    assert latest_checkpoint(run_dir).name == "checkpoint-3"
    assert [r["step"] for r in read_log(run_dir / "log.jsonl") if "train/loss" in r] == [1, 2, 3]  # this run alone
    carried = yaml.safe_load((run_dir / "checkpoint-3" / "recipe.yaml").read_text())
    assert carried == yaml.safe_load((run_dir / "recipe.yaml").read_text()) == recipe.to_dict()


HOLD_LOCK = """
import fcntl, json, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(json.dumps({"pid": os.getpid(), "host": "elsewhere", "since": "now"}))
handle.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holders_lock_is_taken_over(setup, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / "run.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(VlmTuneError, match=rf"is in use by another run \(PID {holder.pid} on host elsewhere"):
            train(_recipe(setup, run_dir, max_steps=1))
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, as a killed run does
        holder.wait()
    from vlm_tune.run_dir import LOCK_FILE, lock_run_folder

    with caplog.at_level(logging.WARNING, logger="vlm_tune.train"):
        folder = lock_run_folder(run_dir)
    assert f"took over the lock of a run that is no longer running (PID {holder.pid}" in caplog.text
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    folder.release()
    assert (run_dir / LOCK_FILE).read_text() == ""  # released: the next run takes it without a warning


def test_a_full_disk_is_named_with_the_path_that_could_not_be_written(tmp_path, monkeypatch):
    import errno

    import vlm_tune.run_log as run_log_module
    from vlm_tune.run_dir import lock_run_folder
    from vlm_tune.run_log import RunLog

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    log = RunLog(tmp_path, enabled=True)
    monkeypatch.setattr(run_log_module, "open", disk_full, raising=False)
    with pytest.raises(VlmTuneError, match=r"cannot write .*log.jsonl \(the disk is full"):
        log.write({"step": 1, "loss": 1.0})
    monkeypatch.undo()
    log.close()
    monkeypatch.setattr(Path, "mkdir", disk_full)
    with pytest.raises(VlmTuneError, match=r"train.output_dir: cannot write the run folder .*new \(the disk is full"):
        lock_run_folder(tmp_path / "new")
