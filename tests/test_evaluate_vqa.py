"""`python -m vlm_tune.evaluate` with data.eval.task vqa: answers scored, the same evaluation folder, --split."""

import json
from pathlib import Path

import yaml
from PIL import Image
from tiny import tiny_vlm_folder

from vlm_tune.evaluate import compare_evaluations, evaluate_run, main
from vlm_tune.recipe import recipe_from_dict


def _questions(folder: Path, name: str) -> Path:
    """Three questions: two about an image, one text-only, in the messages format."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (220, 30, 30)).save(folder / "red.png")
    rows = []
    for index, (question, answers) in enumerate([("What colour?", ["red", "dark red"]), ("How many?", ["1"])]):
        rows.append(
            {
                "id": f"q{index}",
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answers[0]},
                ],
                "images": ["red.png"],
                "answers": answers,
            }
        )
    rows.append({"id": "t", "messages": [{"role": "user", "content": "Yes?"}, {"role": "assistant", "content": "yes"}]})
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_vqa_evaluation_writes_the_folder_with_questions(tmp_path):
    model = tiny_vlm_folder("qwen2_5_vl", tmp_path / "model")
    data = _questions(tmp_path / "data", "val.jsonl")
    _questions(tmp_path / "data", "test.jsonl")
    raw = {
        "model": {"name_or_path": str(model), "dtype": "float32", "attn_implementation": "eager"},
        "components": {"language": {"mode": "lora"}},
        "data": {"eval": {"format": "messages", "path": str(data), "task": "vqa"}},
        "train": {"output_dir": str(tmp_path / "run"), "mixed_precision": "no"},
        "eval": {"batch_size": 2, "max_new_tokens": 3, "use_java": True},  # VQA needs no Java, whatever this says
    }
    result = evaluate_run(recipe_from_dict(raw), show_progress=False)
    assert set(result["metrics"]) == {"exact_match", "vqa_accuracy", "anls"}
    assert all(0.0 <= value <= 1.0 for value in result["metrics"].values())
    folder = result["output_dir"]  # eval-base-<set folder>-<split file>
    assert folder == tmp_path / "run" / "eval-base-data-val" and set(result["files"]) == {
        "metrics.json",
        "predictions.jsonl",
        "summary.md",
        "contact_sheet.png",
    }
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["question"], r["references"]) for r in rows] == [
        ("q0", "What colour?", ["red", "dark red"]),
        ("q1", "How many?", ["1"]),
        ("t", "Yes?", ["yes"]),
    ]
    info = json.loads((folder / "metrics.json").read_text())
    assert info["task"] == "vqa" and info["num_images"] == 3 and "tokenizer" not in info
    summary = (folder / "summary.md").read_text()
    assert "| sample | question | prediction | first reference |" in summary and "| q0 | What colour? |" in summary
    assert "METEOR" not in summary
    raw["eval"]["output_dir"] = str(tmp_path / "other")
    assert main([_write(raw, tmp_path), "--split", "test", "--no-progress"]) == 0  # test.jsonl beside val.jsonl
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["data"].endswith("test.jsonl")
    assert "| exact_match |" in compare_evaluations(folder, tmp_path / "other")


def _write(raw: dict, tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)
