"""python -m vlm_tune.generate: one line per image (or JSON lines), the same captions from a run, its adapter
export and its merged export, greedy decoding as evaluation decodes, and a 4-bit base under the adapter."""

import json

import pytest
import torch
from deploy_runs import IMAGES, make_run, prompt_inputs

from vlm_tune.export import export_checkpoint
from vlm_tune.generate import caption_images, load_generator, load_images, main
from vlm_tune.model.build import load_for_inference
from vlm_tune.recipe import DataSourceConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A llava run (LoRA on vision and language, full projector) and both of its exports."""
    root = tmp_path_factory.mktemp("generate")
    run_dir, recipe = make_run("llava", root)
    return {
        "run": run_dir,
        "recipe": recipe,
        "adapter": export_checkpoint(run_dir, root / "adapter"),
        "merged": export_checkpoint(run_dir, root / "merged", merge=True),
    }


def _greedy_captions(recipe, checkpoint) -> list[str]:
    """The captions of the first two test images, straight from model.generate on vlm_tune's inputs."""
    model, processor = load_for_inference(recipe, checkpoint)
    inputs = prompt_inputs(processor, recipe)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=recipe.eval.max_new_tokens, do_sample=False)
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]


def test_run_adapter_export_and_merged_export_print_the_same_captions(run, capsys):
    images = [str(path) for path in IMAGES[:2]]
    expected = _greedy_captions(run["recipe"], run["run"])
    capsys.readouterr()
    outputs = {}
    for flag, source in (("--checkpoint", run["run"]), ("--model", run["adapter"]), ("--model", run["merged"])):
        assert main([flag, str(source), "--image", images[0], "--image", images[1]]) == 0
        outputs[str(source)] = capsys.readouterr().out.splitlines()
    for lines in outputs.values():
        assert lines == [f"{path}\t{caption}" for path, caption in zip(images, expected)]

    assert main(["--model", str(run["merged"]), "--image", images[0], "--json", "--max-new-tokens", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    shorter = json.loads(line)
    assert shorter["image"] == images[0] and len(shorter["text"]) < len(expected[0])


def test_beam_search_and_batching_follow_the_arguments(run):
    model, processor, recipe = load_generator(checkpoint=run["run"])
    images = load_images(IMAGES[:3])
    one_by_one = [caption_images(model, processor, [image], recipe)[0] for image in images]
    assert caption_images(model, processor, images, recipe, batch_size=2) == one_by_one
    beams = caption_images(model, processor, images, recipe, num_beams=3)
    assert len(beams) == 3 and all(isinstance(text, str) for text in beams)


def test_a_4bit_base_carries_the_adapter_for_generate_and_evaluate(run, capsys):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from vlm_tune.evaluate import evaluate_run

    model, processor, recipe = load_generator(checkpoint=run["run"], overrides=["model.quantization.bits=4"])
    assert recipe.model.quantization is not None
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the language model in 4 bit
    trained, _ = load_for_inference(run["recipe"], run["run"])
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora.keys() == loaded.keys() and all(torch.equal(loaded[n], lora[n]) for n in lora)
    assert len(caption_images(model, processor, load_images(IMAGES[:2]), recipe)) == 2

    recipe.data.eval = DataSourceConfig(path=str(IMAGES[0].parents[1] / "captions_test.json"), limit=2)
    recipe.eval.use_java, recipe.eval.output_dir = False, str(run["run"] / "eval-4bit")
    capsys.readouterr()
    result = evaluate_run(recipe, run["run"], show_progress=False)
    assert result["num_images"] == 2 and "(4-bit nf4)" in capsys.readouterr().out
