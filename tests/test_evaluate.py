"""`python -m vlm_tune.evaluate`: batched generation, the evaluation folder, --compare, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from tiny import TINY_ARCHS, tiny_vlm, tiny_vlm_folder

from vlm_tune.data import build_dataset
from vlm_tune.evaluate import EvaluationError, compare_evaluations, eval_source, evaluate_run, generate_captions, main
from vlm_tune.metrics import score_captions
from vlm_tune.recipe import DataConfig, DataSourceConfig, EvalConfig, recipe_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
METRIC_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}


def _coco_set(
    folder: Path, name: str = "captions_val.json", empty_captions: bool = False, broken_image: int | None = None
) -> Path:
    """Four images (a coloured square each) with two captions each, in COCO captions layout."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, colour in enumerate(COLOURS):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle([6, 6, 24, 24], fill=COLOURS[colour])
        image.save(folder / "images" / f"{index}.png")
        if index == broken_image:
            (folder / "images" / f"{index}.png").write_bytes(b"not a png at all")
        images.append({"id": 100 + index, "file_name": f"{index}.png"})
        for number, text in enumerate([f"a {colour} square", f"one {colour} box on white"]):
            annotations.append(
                {"id": 10 * index + number, "image_id": 100 + index, "caption": "" if empty_captions else text}
            )
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {"model": tiny_vlm_folder("idefics3", root / "model"), "data": _coco_set(root / "data")}


def _raw_recipe(files, output_dir: Path, **eval_cfg) -> dict:
    return {
        "model": {"name_or_path": str(files["model"]), "dtype": "float32", "attn_implementation": "eager"},
        "components": {"language": {"mode": "lora", "rank": 4, "alpha": 8}},
        "data": {"eval": {"format": "coco", "path": str(files["data"])}},
        "train": {"output_dir": str(output_dir), "mixed_precision": "no"},
        "eval": {"batch_size": 3, "max_new_tokens": 6, "use_java": False, **eval_cfg},
    }


# ----------------------------------------------------------------------------------------------
# generate_captions
# ----------------------------------------------------------------------------------------------


def _record_generate(model) -> list[dict]:
    """Make `model.generate` record its prompt, output and decoding arguments in the returned list."""
    calls = []
    original_generate = model.generate

    def recording_generate(**kwargs):
        output = original_generate(**kwargs)
        calls.append(
            {
                "input_ids": kwargs["input_ids"].clone(),
                "output": output.clone(),
                **{k: kwargs[k] for k in ("max_new_tokens", "num_beams", "do_sample")},
            }
        )
        return output

    model.generate = recording_generate
    return calls


def test_generate_captions_decodes_only_new_tokens_and_skips_unreadable_images(tmp_path):
    model, processor = tiny_vlm("idefics3")
    model.train()
    data_path = _coco_set(tmp_path, broken_image=2)
    data_cfg = DataConfig(eval=DataSourceConfig(format="coco", path=str(data_path)))
    dataset = build_dataset(data_cfg.eval, data_cfg, train=False)
    calls = _record_generate(model)
    eval_cfg = EvalConfig(batch_size=2, max_new_tokens=5, num_beams=2)
    rows = generate_captions(model, processor, dataset, data_cfg, eval_cfg, show_progress=False)

    # Image 2 is unreadable: skipped; the others keep dataset order and all their references.
    assert [r["image_id"] for r in rows] == ["100", "101", "103"]
    assert rows[1]["references"] == ["a green square", "one green box on white"]
    assert model.training  # the caller's mode is restored
    assert [c["num_beams"] for c in calls] == [2, 2] and all(c["max_new_tokens"] == 5 for c in calls)
    assert not any(c["do_sample"] for c in calls)
    decoded = []
    for call in calls:  # the prediction is the part after the (left-padded) prompt, nothing else
        prompt_length = call["input_ids"].shape[1]
        assert torch.equal(call["output"][:, :prompt_length], call["input_ids"])
        decoded += processor.tokenizer.batch_decode(call["output"][:, prompt_length:], skip_special_tokens=True)
    assert [r["prediction"] for r in rows] == [" ".join(text.split()) for text in decoded]

    again = generate_captions(model, processor, dataset, data_cfg, eval_cfg, show_progress=False)
    assert again == rows  # greedy / beam search is deterministic


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_captions_works_for_every_family(arch, files):
    model, processor = tiny_vlm(arch)
    data_cfg = DataConfig(eval=DataSourceConfig(format="coco", path=str(files["data"])))
    dataset = build_dataset(data_cfg.eval, data_cfg, train=False)
    calls = _record_generate(model)
    rows = generate_captions(
        model, processor, dataset, data_cfg, EvalConfig(batch_size=3, max_new_tokens=4), show_progress=False
    )
    assert [r["image_id"] for r in rows] == ["100", "101", "102", "103"]
    new_tokens = [seq[call["input_ids"].shape[1] :] for call in calls for seq in call["output"]]
    assert all(len(tokens) <= 4 for tokens in new_tokens)
    assert [r["prediction"] for r in rows] == [
        " ".join(processor.tokenizer.decode(t, skip_special_tokens=True).split()) for t in new_tokens
    ]


# ----------------------------------------------------------------------------------------------
# evaluate_run and the CLI
# ----------------------------------------------------------------------------------------------


def test_cli_writes_the_evaluation_folder_and_compares_two(files, tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_raw_recipe(files, tmp_path / "run")))
    assert main([str(recipe_path), "--no-progress", "eval.contact_sheet_images=3"]) == 0
    folder = tmp_path / "run" / "eval-base-data-val"  # data/captions_val.json: set "data", split "val"
    assert f"to {folder}" in capsys.readouterr().out

    info = json.loads((folder / "metrics.json").read_text())
    assert set(info["metrics"]) == METRIC_KEYS  # no METEOR: eval.use_java is false
    assert info["num_images"] == 4 and info["checkpoint"] is None and info["split"] == "val"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == ["100", "101", "102", "103"]
    assert all(isinstance(r["prediction"], str) and len(r["references"]) == 2 for r in rows)
    rescored = score_captions(
        {r["image_id"]: r["prediction"] for r in rows}, {r["image_id"]: r["references"] for r in rows}, use_java=False
    )
    assert rescored == pytest.approx(info["metrics"])
    summary = (folder / "summary.md").read_text()
    assert "| CIDEr-D |" in summary and "| 100 |" in summary and "base model" in summary
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.width > 3 * 192 and sheet.height > 192  # three images side by side, captions below

    # A second evaluation with beam search, then the two side by side.
    assert main([str(recipe_path), "--no-progress", "eval.num_beams=2", "--output-dir", str(tmp_path / "beam")]) == 0
    capsys.readouterr()
    assert main(["--compare", str(folder), str(tmp_path / "beam"), "--out", str(tmp_path / "compare.md")]) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "compare.md").read_text()
    beam = json.loads((tmp_path / "beam" / "metrics.json").read_text())["metrics"]
    delta = beam["BLEU-1"] - info["metrics"]["BLEU-1"]
    assert f"| BLEU-1 | {info['metrics']['BLEU-1']:.4f} | {beam['BLEU-1']:.4f} | {delta:+.4f} |" in table
    assert "| 100 |" in table  # example predictions side by side


def test_evaluate_run_with_a_checkpoint_writes_next_to_it(files, tmp_path):
    from vlm_tune.checkpoint import save_checkpoint
    from vlm_tune.model.load import load_model
    from vlm_tune.model.targeting import apply_targeting

    recipe = recipe_from_dict(_raw_recipe(files, tmp_path / "run", limit=2, contact_sheet_images=0))
    model, _ = load_model(recipe.model)
    model, _ = apply_targeting(model, recipe.components)
    with torch.no_grad():  # a trained adapter: LoRA B is zero at init, so give it weight
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    (tmp_path / "run").mkdir()
    checkpoint = save_checkpoint(tmp_path / "run", 3, model, {"epoch": 0, "batches_done": 0})

    result = evaluate_run(recipe, checkpoint=tmp_path / "run", show_progress=False)  # a run folder: its newest
    assert result["output_dir"] == checkpoint / "eval-data-val"
    info = json.loads((checkpoint / "eval-data-val" / "metrics.json").read_text())
    assert info["checkpoint"] == str(checkpoint) and info["num_images"] == 2
    assert not (checkpoint / "eval-data-val" / "contact_sheet.png").exists()  # contact_sheet_images=0
    base = evaluate_run(recipe, show_progress=False)
    assert base["output_dir"] == tmp_path / "run" / "eval-base-data-val"
    base_rows = (base["output_dir"] / "predictions.jsonl").read_text()
    assert base_rows != (checkpoint / "eval-data-val" / "predictions.jsonl").read_text()  # the adapter was loaded

    from vlm_tune.model.build import load_for_inference

    loaded, _ = load_for_inference(recipe, tmp_path / "run")  # a run folder, as the command line takes it
    trained = dict(model.named_parameters())
    lora = [name for name, _ in loaded.named_parameters() if "lora_B" in name]
    assert lora and all(torch.equal(dict(loaded.named_parameters())[n], trained[n]) for n in lora)


def _trained_run(files, run_dir: Path, raw: dict) -> Path:
    """A run folder as training leaves it: recipe.yaml and one checkpoint with a trained-looking adapter."""
    from vlm_tune.checkpoint import save_checkpoint
    from vlm_tune.model.build import build_model
    from vlm_tune.recipe import dump_recipe

    recipe = recipe_from_dict(raw)
    model = build_model(recipe).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    run_dir.mkdir(parents=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")
    return save_checkpoint(run_dir, 2, model, {"epoch": 0, "batches_done": 0})


def test_a_run_is_evaluated_by_its_own_recipe_and_folders_never_collide(files, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    checkpoint = _trained_run(files, run, _raw_recipe(files, run, limit=2, contact_sheet_images=0))
    assert main(["--checkpoint", str(run), "--no-progress"]) == 0  # no recipe: the run's own
    own = json.loads((checkpoint / "eval-data-val" / "metrics.json").read_text())
    assert own["num_images"] == 2 and own["data"] == str(files["data"]) and own["max_new_tokens"] == 6
    assert "differs from the run's recipe" not in caplog.text

    # A checkpoint's own recipe.yaml comes first; overrides apply on top, with no recipe named.
    (checkpoint / "recipe.yaml").write_text(
        (run / "recipe.yaml").read_text().replace("max_new_tokens: 6", "max_new_tokens: 3")
    )
    assert main(["--checkpoint", str(run), "eval.limit=1", "--output-dir", str(tmp_path / "own"), "--no-progress"]) == 0
    info = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert (info["max_new_tokens"], info["num_images"]) == (3, 1)

    # Another recipe on another set: a warning names the keys that differ, the folder is the other set's.
    other_set = _coco_set(tmp_path / "photos", name="captions_test.json")
    other = _raw_recipe(files, tmp_path / "elsewhere", limit=2, contact_sheet_images=0)
    other["data"]["eval"]["path"] = str(other_set)
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    caplog.clear()
    assert main([str(other_path), "--checkpoint", str(run), "--no-progress"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "differs from the run's recipe" in r.getMessage())
    assert f"{other_path} differs from the run's recipe {checkpoint / 'recipe.yaml'} in " in warning
    assert "data.eval.path, train.output_dir, eval.max_new_tokens" in warning
    assert (checkpoint / "eval-photos-test" / "metrics.json").is_file()
    assert json.loads((checkpoint / "eval-data-val" / "metrics.json").read_text()) == own  # untouched

    # The same evaluation again: refused, unless --overwrite, which says so.
    capsys.readouterr()
    assert main(["--checkpoint", str(run), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{checkpoint / 'eval-data-val'} already holds an evaluation (of {files['data']} by {checkpoint})" in error
    assert "--overwrite" in error
    caplog.clear()
    assert main(["--checkpoint", str(run), "--no-progress", "--overwrite"]) == 0
    assert f"Replacing the earlier evaluation in {checkpoint / 'eval-data-val'}" in caplog.text


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_missing_checkpoint_names_the_path_and_lists_checkpoints(files, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "COMPLETE").write_text("ok\n")
    recipe = recipe_from_dict(_raw_recipe(files, run))
    with pytest.raises(EvaluationError, match=r"checkpoint-9 does not exist.*checkpoint-4"):
        evaluate_run(recipe, checkpoint=run / "checkpoint-9")

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_raw_recipe(files, run)))
    assert main([str(recipe_path), "--checkpoint", str(run / "checkpoint-9")]) == 2
    error = capsys.readouterr().err
    assert "checkpoint-9 does not exist" in error and "Traceback" not in error


def test_evaluation_set_without_references_is_a_clear_error(files, tmp_path):
    raw = _raw_recipe(files, tmp_path / "run")
    raw["data"]["eval"]["path"] = str(_coco_set(tmp_path / "empty", empty_captions=True))
    with pytest.raises(EvaluationError, match="at least one non-empty caption"):
        evaluate_run(recipe_from_dict(raw))


def test_recipe_without_eval_set_and_bad_recipe_are_clear_errors(files, tmp_path, capsys):
    raw = _raw_recipe(files, tmp_path / "run")
    del raw["data"]["eval"]
    with pytest.raises(EvaluationError, match=r"data\.eval\.path="):
        evaluate_run(recipe_from_dict(raw))
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_split_selection(files, tmp_path):
    _coco_set(tmp_path / "coco", name="captions_val.json")
    _coco_set(tmp_path / "coco", name="captions_test.json")
    raw = _raw_recipe(files, tmp_path / "run")
    raw["data"]["eval"]["path"] = str(tmp_path / "coco" / "captions_val.json")
    recipe = recipe_from_dict(raw)
    source, name = eval_source(recipe, "test")
    assert (Path(source.path).name, name) == ("captions_test.json", "coco-test")
    assert recipe.data.eval.path.endswith("captions_val.json")  # the recipe itself is untouched
    with pytest.raises(
        EvaluationError, match=r"captions_train\.json not found.*captions_test\.json, captions_val\.json"
    ):
        eval_source(recipe, "train")

    raw["data"]["eval"] = {"format": "karpathy", "path": "dataset_coco.json", "split": "val"}
    source, name = eval_source(recipe_from_dict(raw), "test")
    assert (source.split, name) == ("test", "dataset_coco-test")
    raw["data"]["eval"] = {"format": "coco", "path": str(tmp_path / "coco" / "annotations.json")}
    with pytest.raises(EvaluationError, match="a COCO file holds one split"):
        eval_source(recipe_from_dict(raw), "test")


def test_split_of_a_jsonl_set_selects_its_split_column(files, tmp_path):
    """--split sets data.eval.split for a JSONL set; a set without a split column says how --split got there."""
    _coco_set(tmp_path / "photos")  # the images
    rows = [
        {"image": f"images/{i}.png", "caption": f"photo {i}", "split": "train" if i < 3 else "test"} for i in range(4)
    ]
    (tmp_path / "photos" / "photos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = _raw_recipe(files, tmp_path / "run")
    raw["data"]["eval"] = {"format": "jsonl", "path": str(tmp_path / "photos" / "photos.jsonl")}
    recipe = recipe_from_dict(raw)
    assert eval_source(recipe)[1] == "photos"
    source, name = eval_source(recipe, "train")
    assert (source.split, name) == ("train", "photos-train")
    assert len(build_dataset(source, recipe.data, train=False)) == 3

    no_column = tmp_path / "photos" / "plain.jsonl"
    no_column.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "split"}) + "\n" for row in rows))
    recipe.data.eval.path = str(no_column)
    with pytest.raises(EvaluationError, match=r"no 'split' column.*\(--split train set data\.eval\.split\)"):
        evaluate_run(recipe, split="train", show_progress=False)  # fails before any model is loaded


def test_compare_reports_missing_metrics_in_either_folder(tmp_path):
    for name, metrics in (("a", {"BLEU-1": 0.5, "METEOR": 0.2}), ("b", {"BLEU-1": 0.75})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps(
                {"metrics": metrics, "model": "m", "checkpoint": None, "num_images": 2, "data": "d", "split": "val"}
            )
        )
    table = compare_evaluations(tmp_path / "a", tmp_path / "b")
    assert "| BLEU-1 | 0.5000 | 0.7500 | +0.2500 |" in table
    assert "| METEOR | 0.2000 | n/a | n/a |" in table
