"""The training command: loss falls, exact resume, atomic checkpoints, NaN stop, accelerate launch."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw
from tiny import tiny_vlm_folder

from vlm_tune.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from vlm_tune.recipe import recipe_from_dict
from vlm_tune.run_log import read_log
from vlm_tune.train import TrainingError, main, train
from vlm_tune.train_step import due

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _coco_set(folder: Path, n_images: int = 8) -> Path:
    """A small COCO-captions set: one coloured square per image, two captions each."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(n_images):
        name = list(COLOURS)[index % len(COLOURS)]
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle([4 + index % 3, 4, 24, 24], fill=COLOURS[name])
        image.save(folder / "images" / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "width": 32, "height": 32})
        annotations += [
            {"id": 2 * index, "image_id": index, "caption": f"a {name} square"},
            {"id": 2 * index + 1, "image_id": index, "caption": f"one {name} box"},
        ]
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"model": str(tiny_vlm_folder("idefics3", root / "model")), "data": str(_coco_set(root / "data"))}


def _raw_recipe(setup, output_dir, **train_overrides) -> dict:
    """The tiny idefics3 training recipe as a dict (tests that vary other sections start from it)."""
    return {
        "model": {"name_or_path": setup["model"], "dtype": "float32", "attn_implementation": "eager"},
        "components": {
            "projector": {"mode": "full", "lr": 1e-3},
            "language": {"mode": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "lr": 3e-3},
        },
        "data": {"train": {"format": "coco", "path": setup["data"]}, "eval": {"format": "coco", "path": setup["data"]}},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 6,
            "batch_size": 2,
            "grad_accum": 2,
            "mixed_precision": "no",
            "save_every": 2,
            "keep_checkpoints": 0,
            "seed": 3,
            "schedule": "cosine",
            "warmup_steps": 1,
            **train_overrides,
        },
    }


def _recipe(setup, output_dir, **train_overrides):
    return recipe_from_dict(_raw_recipe(setup, output_dir, **train_overrides))


def _losses(run_dir) -> dict[int, float]:
    """step -> training loss."""
    return {r["step"]: r["train/loss"] for r in read_log(Path(run_dir) / "log.jsonl") if "train/loss" in r}


def _benchmark(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SimulatedCrash(Exception):
    """Stands for the process being killed between two steps."""


def test_loss_falls_and_run_folder_is_complete(setup, tmp_path):
    summary = train(_recipe(setup, tmp_path / "run", max_steps=12, save_every=0))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3
    for name in ("recipe.yaml", "components.txt", "components.json", "log.jsonl", "loss.png"):
        assert (tmp_path / "run" / name).is_file(), name
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-12"
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    assert "eval_loss" in summary and summary["eval_loss"] > 0
    records = read_log(tmp_path / "run" / "log.jsonl")
    start, record = records[:2]
    assert start["event"] == "start" and start["total_steps"] == 12
    assert set(record["train/lr"]) == {"projector", "language"} and record["train/tokens_per_s"] > 0
    sweep = _benchmark("relevance_sweep")  # the benchmark reads these logs
    assert sweep.read_last_logged(tmp_path / "run", "eval/loss", "eval_loss") == summary["eval_loss"]
    last_speed = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r][-1]
    assert sweep.read_last_logged(tmp_path / "run", "train/tokens_per_s", "tokens_per_s") == last_speed


def test_data_seconds_counts_the_wait_for_batches(setup, tmp_path, monkeypatch):
    import time

    from vlm_tune.data import TrainCollator

    collate = TrainCollator.__call__

    def slow_collate(self, items):
        time.sleep(0.05)
        return collate(self, items)

    monkeypatch.setattr(TrainCollator, "__call__", slow_collate)
    train(_recipe(setup, tmp_path / "run", max_steps=3, save_every=0, eval_every=0))
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "train/data_seconds" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:  # two micro-batches a step, each 0.05 s late; the wait is part of the step time
        assert 0.1 * record["step"] <= record["train/data_seconds"] < record["train/seconds"]


def test_padding_free_training_gives_the_padded_runs_losses(setup, tmp_path, monkeypatch):
    from vlm_tune.model import padding_free as module

    flatten, rows = module.flatten_batch, []

    def recorded(base, kwargs):
        out = flatten(base, kwargs)
        rows.append(out["input_ids"].shape[0])
        return out

    monkeypatch.setattr(module, "flatten_batch", recorded)
    losses = {}
    for padding_free in (False, True):
        raw = _raw_recipe(setup, tmp_path / str(padding_free), max_steps=3, save_every=0, eval_every=0)
        raw["components"]["language"]["dropout"] = 0.0  # dropout masks would differ between the two layouts
        raw["data"]["group_by_length"] = False  # captions of mixed lengths in a batch: padding to drop
        raw["speed"] = {"padding_free": padding_free}
        train(recipe_from_dict(raw))
        losses[padding_free] = list(_losses(tmp_path / str(padding_free)).values())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4) and len(losses[True]) == 3
    assert 1 in rows and len(rows) >= 6  # padded micro-batches went in as one row (2 per step, 3 steps)


def test_an_activation_budget_keeps_the_losses_and_dropout_draws_of_full_checkpointing(setup, tmp_path, caplog):
    losses = {}
    for budget in (None, 1000.0):  # 1000 GiB: no layer needs to recompute
        raw = _raw_recipe(setup, tmp_path / str(budget), max_steps=3, save_every=0, eval_every=0)
        raw["model"]["gradient_checkpointing"] = True
        raw["speed"] = {"activation_budget_gib": budget}
        with caplog.at_level("INFO", logger="vlm_tune.model.checkpoint_budget"):
            train(recipe_from_dict(raw))
        losses[budget] = list(_losses(tmp_path / str(budget)).values())
    assert losses[1000.0] == pytest.approx(losses[None], rel=1e-5)  # dropout 0.1: the probe forks the RNG
    assert "speed.activation_budget_gib 1000.00: checkpointing 0 of" in caplog.text


def test_the_vision_cache_reuses_features_in_later_epochs_with_the_same_losses(setup, tmp_path, monkeypatch):
    from vlm_tune.model.vision_cache import VisionCache

    hits = []
    call = VisionCache.__call__
    monkeypatch.setattr(VisionCache, "__call__", lambda self, *a, **k: (call(self, *a, **k), hits.append(self.hits))[0])
    qwen = str(tiny_vlm_folder("qwen2_5_vl", tmp_path / "qwen"))
    losses = {}
    for limit in (0.0, 1.0):
        raw = _raw_recipe(setup, tmp_path / str(limit), max_steps=6, save_every=0, eval_every=0)  # 3 epochs of 8
        raw["model"]["name_or_path"] = qwen
        raw["components"] = {"language": raw["components"]["language"]}  # vision and projector frozen
        raw["speed"] = {"vision_cache_gib": limit}
        train(recipe_from_dict(raw))
        losses[limit] = list(_losses(tmp_path / str(limit)).values())
    assert losses[1.0] == pytest.approx(losses[0.0], rel=1e-5) and len(losses[1.0]) == 6
    assert hits[-1] >= 8  # epochs 2 and 3 (4 micro-batches each): every micro-batch found its images


def test_resume_after_crash_gives_the_same_losses(setup, tmp_path):
    train(_recipe(setup, tmp_path / "straight"))
    straight = _losses(tmp_path / "straight")

    def crash_at_three(step):
        if step == 3:
            raise SimulatedCrash  # after step 3, before the step-4 save: checkpoint-2 is the last one

    with pytest.raises(SimulatedCrash):
        train(_recipe(setup, tmp_path / "crashed"), on_step=crash_at_three)
    assert latest_checkpoint(tmp_path / "crashed").name == "checkpoint-2"
    train(_recipe(setup, tmp_path / "crashed", resume="auto"))
    resumed = _losses(tmp_path / "crashed")
    logged = [r["step"] for r in read_log(tmp_path / "crashed" / "log.jsonl") if "train/loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # the redone step 3 is logged once (loss.png plots each step once)
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step


def test_interrupted_save_is_ignored_by_resume(setup, tmp_path, monkeypatch):
    import torch

    run = tmp_path / "run"
    train(_recipe(setup, run, max_steps=2, save_every=2))
    assert latest_checkpoint(run).name == "checkpoint-2"
    # What a kill during a save leaves: a half-written staging folder, never a checkpoint-N without COMPLETE.
    import vlm_tune.checkpoint as checkpoint_module

    def killed_halfway(*args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr(
        checkpoint_module, "_save_weights", lambda model, folder, full=None: (folder / "adapter").mkdir()
    )
    monkeypatch.setattr(checkpoint_module, "save_training_state", killed_halfway)
    with pytest.raises(SimulatedCrash):
        save_checkpoint(run, 4, torch.nn.Linear(2, 2), {"epoch": 0, "batches_done": 8})
    assert not (run / "checkpoint-4").exists()
    (run / "checkpoint-6" / "adapter").mkdir(parents=True)  # a non-atomic writer's leftovers
    (run / ".checkpoint-8-abc").mkdir()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert latest_checkpoint(run).name == "checkpoint-2"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    import vlm_tune.model.load as load_module

    real_load_vlm = load_module.load_vlm
    calls = {"forward": 0}

    def load_vlm_whose_logits_turn_nan(*args, **kwargs):  # fault injection: NaN logits from the 5th forward on
        loaded = real_load_vlm(*args, **kwargs)

        def count(module, inputs):
            calls["forward"] += 1

        def poison(module, inputs, output):
            return output * float("nan") if calls["forward"] >= 5 else output

        loaded.model.register_forward_pre_hook(count)  # one model forward per step (the head may run per loss chunk)
        loaded.model.get_output_embeddings().register_forward_hook(poison)
        return loaded

    monkeypatch.setattr(load_module, "load_vlm", load_vlm_whose_logits_turn_nan)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*last good checkpoint is .*checkpoint-2"):
        train(_recipe(setup, tmp_path / "run", max_steps=6, save_every=1))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2"]


def test_a_cadence_falls_on_every_nth_step_and_always_on_the_last():
    assert [step for step in range(1, 11) if due(3, step, 10)] == [3, 6, 9, 10]
    assert [step for step in range(1, 11) if due(0, step, 10)] == [10]  # 0: only at the end
    assert [step for step in range(1, 5) if due(1, step, 4)] == [1, 2, 3, 4]
    assert [step for step in range(1, 8) if due(10, step, 7)] == [7]


def test_cli_reports_recipe_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"components": {"vision": {"mode": "lora", "rank": 0}}, "trian": {}}))
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "components.vision.rank: must be a positive integer, got 0" in err
    assert "trian: unknown key (did you mean 'train'?)" in err
    assert "Traceback" not in err


def readme_command(program: str) -> list[str]:
    """The README's command line that starts with `program` (the documented way to run something)."""
    readme = (ROOT / "README.md").read_text()
    return shlex.split(next(line for line in readme.splitlines() if line.startswith(f"{program} ")))


def _launch(recipe, tmp_path, num_processes: int, cpu: bool) -> subprocess.CompletedProcess:
    """Run the training command as documented: the README's torchrun command for several CPU processes,
    `accelerate launch` otherwise."""
    path = tmp_path / f"recipe-{num_processes}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if cpu and num_processes > 1:
        command = readme_command("torchrun")  # torchrun --standalone --nproc_per_node 2 -m vlm_tune.train RECIPE
        assert command[-1].endswith(".yaml") and command[command.index("--nproc_per_node") + 1] == str(num_processes)
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:-1], str(path)]  # torchrun's module
    else:
        launcher = [
            "accelerate.commands.launch",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *(["--cpu"] if cpu else []),
            *(["--multi_gpu"] if num_processes > 1 else []),
        ]
        command = [sys.executable, "-m", *launcher, "-m", "vlm_tune.train", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_accelerate_launch_with_one_process(setup, tmp_path):
    _launch(_recipe(setup, tmp_path / "run", max_steps=2, save_every=0), tmp_path, 1, cpu=True)
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_two_processes_match_one_process_with_the_same_global_batch(setup, tmp_path, device):
    import torch

    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one = _recipe(setup, tmp_path / "one", max_steps=4, batch_size=4, grad_accum=1, save_every=0)
    two = _recipe(setup, tmp_path / "two", max_steps=4, batch_size=2, grad_accum=1, save_every=0)
    for recipe in (one, two):
        recipe.components["language"].dropout = 0.0
    _launch(one, tmp_path, 1, cpu=device == "cpu")
    result = _launch(two, tmp_path, 2, cpu=device == "cpu")
    single, data_parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(single) == sorted(data_parallel) == [1, 2, 3, 4]
    for step in single:  # same samples per step, loss normalised by the tokens of all processes
        assert data_parallel[step] == pytest.approx(single[step], abs=1e-4), step
    # Two processes of one group, one log: one start record saying so, every step once, one summary printed.
    records = read_log(tmp_path / "two" / "log.jsonl")
    (start,) = [r for r in records if r.get("event") == "start"]
    assert start["world_size"] == 2 and start["devices"].startswith(f"2 x {device}") and start["effective_batch"] == 4
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert result.stdout.count("Training plan") == 1 and result.stdout.count("Done: 4 steps") == 1


def test_accelerate_launch_cpu_with_several_processes_is_refused_in_one_line(setup, tmp_path):
    """accelerate launch --cpu starts one process whatever --num_processes says: refused, not a silent copy."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(setup, tmp_path / "run").to_dict()))
    launch = ["accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", *launch, "-m", "vlm_tune.train", str(path)], capture_output=True, text=True, env=env
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: `accelerate launch --cpu --num_processes N` started one process, not N")
    assert "torchrun --standalone --nproc_per_node N -m vlm_tune.train" in errors[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder, the data or the model


def test_relevance_trains_with_its_own_group_and_reloads_for_inference(setup, tmp_path):
    import torch
    from safetensors.torch import load_file

    from vlm_tune.model.build import load_for_inference

    recipe = _recipe(setup, tmp_path / "run", max_steps=3, save_every=0)
    recipe.relevance.enabled, recipe.relevance.keep, recipe.relevance.lr = True, 0.5, 1e-2
    train(recipe)
    report = json.loads((tmp_path / "run" / "components.json").read_text())
    assert "relevance" in json.dumps(report)
    first = read_log(tmp_path / "run" / "log.jsonl")[1]  # after the start record
    assert "relevance" in first["train/lr"] and first["train/relevance_grad_norm"] >= 0.0
    checkpoint = latest_checkpoint(tmp_path / "run")
    saved = load_file(checkpoint / "relevance.safetensors")
    model, _ = load_for_inference(recipe, checkpoint)
    loaded = model.relevance.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key].cpu()) for key in saved)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(setup, tmp_path):
    def press_ctrl_c(step):
        if step == 3:
            raise KeyboardInterrupt

    summary = train(_recipe(setup, tmp_path / "run", save_every=0), on_step=press_ctrl_c)
    assert summary["interrupted"] and summary["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "state.json").read_text())
    # 8 images, micro-batches of 2, 2 per step: an epoch is 2 steps, so step 3 ends 2 batches into epoch 1
    assert (state["step"], state["epoch"], state["batches_done"]) == (3, 1, 2)


def test_caption_metrics_are_logged_during_training(setup, tmp_path):
    recipe = _recipe(setup, tmp_path / "run", max_steps=2, save_every=0, eval_generate_every=2)
    recipe.eval.use_java, recipe.eval.generate_limit, recipe.eval.max_new_tokens = False, 4, 4
    train(recipe)
    scored = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "eval/CIDEr-D" in r]
    assert [r["step"] for r in scored] == [0, 2]  # before training, then every eval_generate_every steps
    assert all("eval/BLEU-4" in r and "eval/METEOR" not in r for r in scored)


def test_missing_training_set_is_a_clear_error(setup, tmp_path):
    recipe = _recipe(setup, tmp_path / "run")
    recipe.data.train = None
    with pytest.raises(TrainingError, match=r"data.train is not set: name a training set, e.g. data.train.path="):
        train(recipe)


def test_relevance_checkpoint_needs_relevance_enabled(setup, tmp_path):
    from vlm_tune.checkpoint import CheckpointError
    from vlm_tune.model.build import load_for_inference

    recipe = _recipe(setup, tmp_path / "run", max_steps=1, save_every=0)
    recipe.relevance.enabled, recipe.relevance.keep = True, 0.5
    train(recipe)
    recipe.relevance.enabled = False
    with pytest.raises(CheckpointError, match=r"holds relevance modules: set relevance.enabled=true"):
        load_for_inference(recipe, latest_checkpoint(tmp_path / "run"))


def test_relevance_gradients_are_clipped_apart_from_the_model():
    """A spike in the scoring modules' gradients must not scale down the model's update."""
    import torch
    from accelerate import Accelerator

    from vlm_tune.train_step import clip_gradients

    model_weight, scorer_weight = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW(
        [{"name": "language", "params": [model_weight]}, {"name": "relevance", "params": [scorer_weight]}]
    )
    model_weight.grad = torch.tensor([0.3, 0.0, 0.4])  # norm 0.5, under the limit
    scorer_weight.grad = torch.tensor([300.0, 0.0, 400.0])  # norm 500
    norms = clip_gradients(optimizer, Accelerator(cpu=True), max_grad_norm=1.0)
    assert norms["model"] == pytest.approx(0.5) and norms["relevance"] == pytest.approx(500.0)
    assert torch.allclose(model_weight.grad, torch.tensor([0.3, 0.0, 0.4]))  # untouched
    assert scorer_weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_training_stops_when_no_sample_can_be_used(setup, tmp_path, monkeypatch):
    """Every sample failing alike (here: a processor that cannot pad) must stop the run, not spin at step 0."""
    from vlm_tune.data.bad_samples import DataError
    from vlm_tune.data.collate import CaptionEncoder

    def encode_without_padding(self, *args, **kwargs):
        raise ValueError("Asking to pad but the tokenizer does not have a padding token.")

    monkeypatch.setattr(CaptionEncoder, "encode", encode_without_padding)
    with pytest.raises(DataError, match=r"last 8 batches in a row had no usable sample .*padding token"):
        train(_recipe(setup, tmp_path / "run", max_steps=3, save_every=0))
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert len(bad) >= 16 and all("padding token" in record["reason"] for record in bad)


def test_init_from_starts_a_new_run_from_an_earlier_runs_weights(setup, tmp_path):
    import torch
    from safetensors.torch import load_file

    from vlm_tune.checkpoint import CheckpointError

    train(_recipe(setup, tmp_path / "first", max_steps=2, save_every=0))
    first = latest_checkpoint(tmp_path / "first")
    second = _recipe(setup, tmp_path / "second", max_steps=1, save_every=0, init_from=str(first))
    for component in second.components.values():
        component.lr = 1e-12  # one step that changes nothing measurable: the weights must be the first run's
    train(second)
    saved = load_file(first / "adapter" / "adapter_model.safetensors")
    loaded = load_file(latest_checkpoint(tmp_path / "second") / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == loaded.keys()
    assert any(key.endswith("lora_B.weight") and saved[key].abs().max() > 1e-4 for key in saved)  # trained, not init
    assert all(torch.allclose(saved[key], loaded[key], atol=1e-6) for key in saved)
    assert [r["step"] for r in read_log(tmp_path / "second" / "log.jsonl") if "train/loss" in r] == [1]  # fresh count

    missing = _recipe(setup, tmp_path / "third", max_steps=1, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"train.init_from: checkpoint .*nowhere does not exist"):
        train(missing)


def test_relevance_start_step_holds_the_modules_then_follows_the_schedule(setup, tmp_path):
    recipe = _recipe(
        setup, tmp_path / "run", max_steps=4, save_every=0, log_every=1, warmup_steps=0, schedule="constant"
    )
    recipe.relevance.enabled, recipe.relevance.keep, recipe.relevance.lr = True, 0.5, 1e-2
    recipe.relevance.start_step = 2
    train(recipe)
    rates = [r["train/lr"] for r in read_log(tmp_path / "run" / "log.jsonl") if "train/loss" in r]  # the next step's
    assert [r["relevance"] for r in rates] == [0.0, 1e-2, 1e-2, 1e-2]  # steps 0 and 1 wait, then lr 1e-2
    assert all(r["language"] == 3e-3 for r in rates)  # the model learns from the first step


# ----------------------------------------------------------------------------------------------
# The run lifecycle: start summary, warnings, early checks, best checkpoint, early stopping, trackers
# ----------------------------------------------------------------------------------------------


def _set_with_bad_samples(folder: Path) -> Path:
    """7 images: one whose file is missing, one whose two captions are empty, so 5 usable."""
    path = _coco_set(folder, n_images=7)
    raw = json.loads(path.read_text())
    (folder / "images" / "5.png").unlink()
    for annotation in raw["annotations"]:
        if annotation["image_id"] == 6:
            annotation["caption"] = " "
    path.write_text(json.dumps(raw))
    return path


def test_start_summary_counts_what_will_happen_and_warns_in_one_line_each(setup, tmp_path, monkeypatch, capsys, caplog):
    from safetensors.torch import load_file

    import vlm_tune.train as train_module

    data = str(_set_with_bad_samples(tmp_path / "data"))
    recipe = _recipe(setup, tmp_path / "run", epochs=3, max_steps=4, warmup_steps=4, save_every=0, log_every=2)
    recipe.data.train.path = recipe.data.eval.path = data
    recipe.components["projector"].rank = 16  # no effect on a full component
    losses = []

    def recording_train_step(*args, **kwargs):
        result = real_train_step(*args, **kwargs)
        losses.append(result.loss)
        return result

    real_train_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", recording_train_step)
    train(recipe)
    records = read_log(tmp_path / "run" / "log.jsonl")
    start = records[0]
    # Hand count: 5 usable images, micro-batches of 2 -> 3 per epoch; 2 per step -> 2 steps per epoch; 4 steps.
    examples = {"used": 5, "skipped": {"image file not found": 1, "empty caption": 2}}
    assert start["event"] == "start" and start["examples"] == {"train": examples, "eval": examples}
    assert (start["micro_batches_per_epoch"], start["steps_per_epoch"], start["total_steps"]) == (3, 2, 4)
    assert (start["epochs"], start["world_size"], start["batch_per_device"], start["grad_accum"]) == (2.0, 1, 2, 2)
    assert start["effective_batch"] == 4 and start["devices"] == "cpu"
    adapter = load_file(latest_checkpoint(tmp_path / "run") / "adapter" / "adapter_model.safetensors")
    assert start["trainable_params"] == sum(tensor.numel() for tensor in adapter.values())  # LoRA + projector
    assert start["precision"] == "no autocast; model weights float32"
    assert start["checkpoints"] == f"{tmp_path / 'run'}/checkpoint-N, at the end; all kept"
    out = capsys.readouterr()
    assert "Training plan\n  examples      train 5 (3 skipped: image file not found 1, empty caption 2)" in out.out
    assert "2 per device x 2 accumulated x 1 process(es) = 4 samples per step" in out.out

    assert len(start["warnings"]) == 3
    warmup, epochs, no_effect = start["warnings"]
    assert warmup.startswith("train.warmup_steps (4) is not below the 4 optimizer steps: the whole run is warmup")
    assert epochs.startswith("train.epochs (3) is ignored: train.max_steps (4) sets the length, 2.00 epoch(s)")
    assert no_effect == "components.projector.rank: no effect, components.projector.mode is full"
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(warning in logged for warning in start["warnings"])

    # The logged loss is the mean over the log_every window, and says which steps it covers.
    logged_losses = {r["step"]: (r["train/loss"], r["loss_over_steps"]) for r in records if "train/loss" in r}
    assert logged_losses.keys() == {2, 4} and len(losses) == 4
    assert logged_losses[2] == (pytest.approx((losses[0] + losses[1]) / 2), [1, 2])
    assert logged_losses[4] == (pytest.approx((losses[2] + losses[3]) / 2), [3, 4])
    assert "step 2/4 (50%) | loss" in out.err and "(mean of steps 1-2)" in out.err  # plain lines: not a terminal
    assert "\rtrain" not in out.err and "\rstep" not in out.err  # no bar redrawn into the log (transformers' may be)


def test_data_sets_are_checked_before_the_model_loads(setup, tmp_path, monkeypatch):
    import vlm_tune.model.load as load_module
    from vlm_tune.data.bad_samples import DataError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(load_module, "load_vlm", no_loading)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": "0.png", "text": "a red square"}) + "\n")
    recipe = _recipe(setup, tmp_path / "run")
    recipe.data.train.format, recipe.data.train.path = "jsonl", str(rows)
    with pytest.raises(DataError, match=r"no column \['caption'\] \(columns: \['image', 'text'\]\)"):
        train(recipe)


def test_keep_best_and_early_stopping_on_a_run_whose_eval_loss_goes_up(setup, tmp_path, monkeypatch):
    import vlm_tune.train_step as step_module
    from vlm_tune.checkpoint import resolve_checkpoint
    from vlm_tune.eval_target import resolve_eval_checkpoint

    forced = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # eval loss after steps 1, 2, ...: best at step 2, then up
    monkeypatch.setattr(step_module, "eval_loss", lambda model, loader, accelerator: next(forced))
    run = tmp_path / "run"
    recipe = _recipe(setup, run, max_steps=8, save_every=0, eval_every=1, keep_checkpoints=1)
    recipe.train.keep_best, recipe.train.early_stopping_patience = "eval_loss", 2
    summary = train(recipe)
    assert summary["step"] == 4 and summary["stopped_early"].startswith(
        "early stopping: best eval_loss 2.0000 at step 2"
    )
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]  # the best, and the newest
    assert json.loads((run / "best.json").read_text()) == {
        "checkpoint": "checkpoint-2",
        "step": 2,
        "metric": "eval_loss",
        "value": 2.0,
    }
    assert resolve_checkpoint(run / "best") == run / "checkpoint-2"
    assert resolve_eval_checkpoint(str(run), "best") == run / "checkpoint-2"  # evaluate --checkpoint best
    assert json.loads((run / "checkpoint-4" / "state.json").read_text())["best"] == {
        "metric": "eval_loss",
        "value": 2.0,
        "step": 2,
        "stale": 2,
    }
    records = read_log(run / "log.jsonl")
    assert [r["eval/loss"] for r in records if "eval/loss" in r] == [3.0, 2.0, 2.5, 2.6]
    assert records[-1]["event"] == "early_stop" and records[-1]["step"] == 4


def test_trackers_log_one_naming_scheme_to_mlflow_offline_and_tensorboard(setup, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = tmp_path / "run"
    recipe = _recipe(setup, run, max_steps=2, save_every=0, eval_every=1, report_to=["tensorboard", "mlflow"])
    train(recipe)
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())  # a local file store, no server
    experiment = client.get_experiment_by_name("vlm_tune")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "run" and mlflow_run.data.params["train.lr"] == str(recipe.train.lr)
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key)]
        for key in ("train/loss", "eval/loss", "train/lr/language")
    }
    logged = read_log(run / "log.jsonl")
    assert history["train/loss"] == [(r["step"], pytest.approx(r["train/loss"])) for r in logged if "train/loss" in r]
    assert [step for step, _ in history["eval/loss"]] == [1, 2] and len(history["train/lr/language"]) == 2
    assert mlflow.get_tracking_uri().startswith("file:")

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/loss", "train/lr/language", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_a_tracker_that_is_not_installed_is_named_before_anything_loads(setup, tmp_path, monkeypatch):
    import importlib.util

    from vlm_tune.run_log import TrackerError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(TrackerError, match=r"train.report_to: wandb not installed: pip install wandb"):
        train(_recipe(setup, tmp_path / "run", report_to=["wandb"]))
    assert not (tmp_path / "run").exists()
