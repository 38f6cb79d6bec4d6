"""Checkpoint files (vlm_tune.checkpoint, checkpoint_load) without training: no unpickling, exact state round
trip, atomic replacement, safe pruning, cleanup of what kills leave, finite weights only, errors that name the fix."""

import errno
import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import vlm_tune.checkpoint as checkpoint_module
from vlm_tune.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from vlm_tune.checkpoint_load import load_training_state, load_weights


class SimulatedKill(Exception):
    """Stands for the process being killed at this point."""


def _lora(rank: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=rank, target_modules=["0"]))


def _trained(model):
    """An AdamW and a cosine schedule that have taken two steps on `model`."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def _save(run, step, model=None, **kwargs):
    return save_checkpoint(run, step, model or _lora(), {"epoch": 0, "batches_done": step}, **kwargs)


class Payload:
    """A pickle that runs code when loaded: what a hostile training_state.pt holds."""

    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_resume_never_unpickles_a_received_checkpoint(tmp_path):
    (tmp_path / "received").mkdir()
    checkpoint = _save(tmp_path / "received", 4)  # then made to look like one an earlier version wrote
    for name in ("training_state.json", "training_state.safetensors"):
        (checkpoint / name).unlink(missing_ok=True)
    payload = Payload()
    payload.marker = str(tmp_path / "pwned")
    (checkpoint / "training_state.pt").write_bytes(pickle.dumps({"optimizer": payload}))
    model = _lora()
    optimizer, scheduler = _trained(model)
    with pytest.raises(Exception) as refused:
        load_training_state(checkpoint, optimizer, scheduler)
    assert not (tmp_path / "pwned").exists(), "loading the checkpoint ran the code in its pickle"
    assert isinstance(refused.value, CheckpointError)
    assert re.search(r"pickled training_state.pt.* not loaded, .* train.init_from=", str(refused.value))


def test_training_state_round_trips_exactly_from_safetensors_and_json(tmp_path):
    (tmp_path / "run").mkdir()
    model = _lora()
    optimizer, scheduler = _trained(model)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    checkpoint = _save(tmp_path / "run", 2, model, optimizer=optimizer, scheduler=scheduler)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    json.loads((checkpoint / "training_state.json").read_text())  # plain JSON
    assert not list(checkpoint.glob("*.pt"))

    fresh = _lora(seed=1)
    fresh_optimizer, fresh_scheduler = _trained(fresh)
    fresh_optimizer.step(), fresh_scheduler.step()  # a different state that loading must replace
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_training_state(checkpoint, fresh_optimizer, fresh_scheduler)
    assert (state["step"], state["batches_done"]) == (2, 2)
    assert (random.random(), np.random.rand()) == expected_draws[:2] and torch.equal(torch.rand(3), expected_draws[2])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]  # betas come back as a tuple
    for index, values in saved["state"].items():
        assert all(torch.equal(values[key], loaded["state"][index][key]) for key in values)


def test_a_kill_between_the_two_renames_keeps_the_step_complete(tmp_path, monkeypatch):
    from vlm_tune.run_dir import lock_run_folder

    run = tmp_path / "run"
    run.mkdir()
    first = _save(run, 4, _lora(seed=1))
    real_rename = Path.rename

    def rename_then_die(self, target):
        if self.name.startswith(".checkpoint-4-") and "-replaced-" not in self.name:
            raise SimulatedKill  # the old folder is aside, the new one not yet in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_die)
    with pytest.raises(SimulatedKill):
        _save(run, 4, _lora(seed=2))
    monkeypatch.undo()
    lock_run_folder(run).release()  # what the next run does first
    assert latest_checkpoint(run) == first
    assert not list(run.glob(".checkpoint-*"))
    load_weights(_lora(), first)


def test_a_kill_while_pruning_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    run.mkdir()
    for step in (2, 4):
        _save(run, step)
    real_rmtree = shutil.rmtree

    def delete_a_part_then_die(path, *args, **kwargs):
        if "-pruned-" in Path(path).name or Path(path).name == "checkpoint-2":
            real_rmtree(Path(path) / "adapter")
            raise SimulatedKill
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", delete_a_part_then_die)
    with pytest.raises(SimulatedKill):
        _save(run, 6, keep=2)
    monkeypatch.undo()
    for checkpoint in list_checkpoints(run):  # every checkpoint that looks complete loads
        load_weights(_lora(), checkpoint)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4", "checkpoint-6"]
    from vlm_tune.run_dir import lock_run_folder

    with caplog.at_level(logging.WARNING, logger="vlm_tune.train"):
        lock_run_folder(run).release()
    assert not list(run.glob(".checkpoint-*"))
    assert "-pruned-" in caplog.text and "removed" in caplog.text  # the log lists what was cleaned up


def test_newest_means_written_last_so_another_runs_higher_steps_never_outrank_this_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (9, 12):  # an earlier run
        _save(run, step)
    mine = _save(run, 3, keep=2)
    assert latest_checkpoint(run) == mine and resolve_checkpoint(run) == mine
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-12", "checkpoint-3"]  # the oldest went


def test_weights_with_nan_are_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path):
    from vlm_tune.checkpoint import NonFiniteWeightsError
    from vlm_tune.checkpoint_load import last_finite_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    good = _save(run, 2)
    poisoned = _lora()
    with torch.no_grad():
        next(p for p in poisoned.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="NaN or inf"):
        _save(run, 3, poisoned)
    assert not (run / "checkpoint-3").exists() and not list(run.glob(".checkpoint-*"))
    old_style = _save(run, 4)  # as an earlier version wrote it: NaN weights in a complete checkpoint
    adapter = old_style / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(adapter).items()}, adapter)
    assert latest_checkpoint(run) == old_style and last_finite_checkpoint(run) == good


def test_a_full_disk_while_saving_is_named_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _save(run, 2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_save_weights", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write .*checkpoint-4: the disk is full"):
        _save(run, 4)
    assert [p.name for p in run.iterdir()] == ["checkpoint-2"]


def test_a_lora_rank_mismatch_names_both_ranks(tmp_path):
    (tmp_path / "run").mkdir()
    checkpoint = _save(tmp_path / "run", 1, _lora(rank=2))
    with pytest.raises(CheckpointError, match=r"module 0 was trained with LoRA rank 2, the recipe gives it rank 3"):
        load_weights(_lora(rank=3), checkpoint)


def test_resume_pointed_at_a_temporary_folder_lists_the_complete_ones_beside_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _save(run, 2)
    (run / ".checkpoint-4-abcd1234" / "adapter").mkdir(parents=True)
    with pytest.raises(
        CheckpointError, match=r"temporary folder of a save that did not finish.*found there: .*checkpoint-2"
    ):
        resolve_checkpoint(run / ".checkpoint-4-abcd1234")
