"""Training under faults: non-finite gradients, Ctrl-C (once, twice, mid-step, during a save), SIGKILL at any
point, wholly bad batches. After each, the run resumes to exactly the losses of an uninterrupted run."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from test_train import _coco_set, _recipe
from tiny import tiny_vlm_folder

import vlm_tune.checkpoint as checkpoint_module
import vlm_tune.model.load as load_module
from vlm_tune.checkpoint import latest_checkpoint, list_checkpoints
from vlm_tune.run_log import read_log
from vlm_tune.train import TrainingError, train

STEPS = 8  # 12 images, micro-batches of 2, 2 per step: an epoch is 3 steps, so resumes land mid-epoch too


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"model": str(tiny_vlm_folder("idefics3", root / "model")), "data": str(_coco_set(root / "data", 12))}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the whole module: the same float sums in this process and in forked children."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _faults_recipe(setup, run_dir, **overrides):
    settings = {"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 2, **overrides}
    return _recipe(setup, run_dir, **settings)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory) -> dict[int, float]:
    """step -> loss of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(_faults_recipe(setup, run_dir))
    return _one_loss_per_step(run_dir)


def _one_loss_per_step(run_dir) -> dict[int, float]:
    steps = [r["step"] for r in read_log(Path(run_dir) / "log.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)), f"log.jsonl repeats steps: {steps}"
    return {r["step"]: r["train/loss"] for r in read_log(Path(run_dir) / "log.jsonl") if "train/loss" in r}


def _assert_same_losses(run_dir, straight):
    losses = _one_loss_per_step(run_dir)
    assert sorted(losses) == sorted(straight)
    for step, loss in straight.items():
        assert losses[step] == pytest.approx(loss, abs=1e-6), step


def _on_forward(monkeypatch, numbers, action):
    """In the model built next, call `action(hidden)` on the language decoder's output in its forward passes
    `numbers` (counted from 1; one per micro-batch, so a step is 2); a tensor it returns replaces the output."""
    real_load_vlm = load_module.load_vlm
    count = {"forward": 0}

    def load_vlm_with_hook(*args, **kwargs):
        loaded = real_load_vlm(*args, **kwargs)

        def hook(module, inputs, output):
            count["forward"] += 1
            replaced = action(output.last_hidden_state) if count["forward"] in numbers else None
            if replaced is not None:
                output.last_hidden_state = replaced
            return output

        loaded.model.get_decoder().register_forward_hook(hook)
        return loaded

    monkeypatch.setattr(load_module, "load_vlm", load_vlm_with_hook)


def _ctrl_c(*args):
    os.kill(os.getpid(), signal.SIGINT)


def _during_save(monkeypatch, action, step=None):
    """Call `action()` in the middle of writing a checkpoint (of `step`, or any), after its weights."""
    real = checkpoint_module._save_weights

    def save_then_act(model, folder):
        real(model, folder)
        if step is None or folder.name.startswith(f".checkpoint-{step}-"):
            action()

    monkeypatch.setattr(checkpoint_module, "_save_weights", save_then_act)


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, hidden):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _strict_json_lines(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def _all_finite(checkpoint):
    from safetensors.torch import load_file

    files = [checkpoint / "adapter" / "adapter_model.safetensors", *checkpoint.glob("trained.safetensors")]
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def test_a_non_finite_gradient_stops_before_the_update_and_names_a_finite_checkpoint(setup, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _on_forward(monkeypatch, {5, 6}, _InfGradient.apply)  # step 3: finite loss, infinite gradient norm
    with pytest.raises(TrainingError, match=r"gradient norm became (inf|nan) at step 3 .*last good checkpoint is "):
        train(_faults_recipe(setup, run_dir, save_every=1, keep_checkpoints=0))
    checkpoints = list_checkpoints(run_dir)
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert all(_all_finite(c) for c in checkpoints)
    _strict_json_lines(run_dir / "log.jsonl")


def test_skip_nonfinite_steps_skips_the_update_counts_it_and_logs_valid_json(setup, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _on_forward(monkeypatch, {5, 6}, _InfGradient.apply)
    summary = train(_faults_recipe(setup, run_dir, max_steps=5, save_every=0, skip_nonfinite_steps=1))
    assert summary["step"] == 5
    records = {r["step"]: r for r in _strict_json_lines(run_dir / "log.jsonl") if "train/loss" in r}
    assert records[3]["train/grad_norm"] is None and "update skipped" in records[3]["skipped"]
    assert records[3]["nonfinite_skipped"] == 1 and "skipped" not in records[4]
    checkpoint = latest_checkpoint(run_dir)
    assert _all_finite(checkpoint) and json.loads((checkpoint / "state.json").read_text())["nonfinite_skipped"] == 1


def test_ctrl_c_mid_step_saves_the_last_complete_step_and_a_second_one_waits(setup, straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _on_forward(patch, {7}, _ctrl_c)  # step 4's first micro-batch, after checkpoint-2 and step 3
        _during_save(patch, _ctrl_c, step=3)  # a second Ctrl-C while checkpoint-3 is written
        summary = train(_faults_recipe(setup, run_dir))
    assert summary["interrupted"] and summary["step"] == 3
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((run_dir / "checkpoint-3" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done"]) == (3, 1, 0)  # epoch 0 done; not step 4's batch
    train(_faults_recipe(setup, run_dir, resume="auto"))
    _assert_same_losses(run_dir, straight)


def test_epochs_end_with_the_data_even_when_a_batch_was_wholly_bad(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(setup["data"]).parent, data)
    (data / "images" / "3.png").write_bytes(b"not a png")  # found at build time, unreadable when loaded
    recipe = _recipe({**setup, "data": str(data / "captions.json")}, tmp_path / "run", max_steps=None, epochs=1)
    recipe.train.batch_size, recipe.train.grad_accum, recipe.train.save_every = 1, 1, 0
    summary = train(recipe)
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "train/loss" in r]
    assert summary["step"] == 11 and {r["epoch"] for r in records} == {0}  # one epoch, one batch short
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-11" and summary["eval_loss"] > 0
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert {b["file"] for b in bad} == {str(data / "images" / "3.png")}  # the image path, from the worker's item
    assert all(b["image_id"] == "3" and b["reason"].startswith("unreadable image") for b in bad)


def _killed_in_child(run) -> int:
    """Run `run()` in a forked child that is expected to die by SIGKILL; return its exit code."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no tqdm monitor thread holding a lock across the fork
    if tqdm.monitor is not None:
        tqdm.monitor.exit()
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(3)  # it was meant to be killed before returning
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _sigkill(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def _sigkill_while_pruning(monkeypatch):
    real_rmtree = shutil.rmtree

    def delete_part_then_die(path, *args, **kwargs):
        if "-pruned-" in Path(path).name:
            real_rmtree(Path(path) / "adapter")
            _sigkill()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", delete_part_then_die)


def test_kills_and_ctrl_c_at_any_point_then_resume_give_the_uninterrupted_losses(
    setup, straight, tmp_path, monkeypatch
):
    """One run folder through seven runs, each ended by a different fault, and every step's loss as if none."""
    run_dir = tmp_path / "run"
    fresh, resume = _faults_recipe(setup, run_dir), _faults_recipe(setup, run_dir, resume="auto")

    def child(arrange, recipe):
        def run():
            arrange(monkeypatch)
            train(recipe)

        assert _killed_in_child(run) == -signal.SIGKILL

    def interrupted(arrange) -> dict:
        with monkeypatch.context() as patch:
            arrange(patch)
            summary = train(resume)
        assert summary["interrupted"]
        return summary

    child(lambda patch: _on_forward(patch, {6}, _sigkill), fresh)  # mid-step 3 (its second micro-batch)
    assert latest_checkpoint(run_dir).name == "checkpoint-2"
    assert interrupted(lambda patch: _on_forward(patch, {3}, _ctrl_c))["step"] == 3  # mid-step 4: saves step 3
    child(lambda patch: _during_save(patch, _sigkill, step=4), resume)  # SIGKILL while writing checkpoint-4
    assert latest_checkpoint(run_dir).name == "checkpoint-3" and list(run_dir.glob(".checkpoint-4-*"))
    assert interrupted(lambda patch: _during_save(patch, _ctrl_c, step=4))["step"] == 4  # waits for the save
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-3", "checkpoint-4"]

    def ctrl_c_mid_step_and_during_the_save(patch):
        _on_forward(patch, {3}, _ctrl_c)  # mid-step 6
        _during_save(patch, _ctrl_c, step=5)  # and again while checkpoint-5 is written

    assert interrupted(ctrl_c_mid_step_and_during_the_save)["step"] == 5
    child(_sigkill_while_pruning, resume)  # saving checkpoint-6 prunes checkpoint-4: killed halfway
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-5", "checkpoint-6"]
    train(resume)
    _assert_same_losses(run_dir, straight)
    assert not list(run_dir.glob(".checkpoint-*")) and (run_dir / "run.lock").read_text() == ""
