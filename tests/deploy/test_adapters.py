"""Several adapters on one base: switching changes the outputs and switching back restores them exactly, a batch
mixing adapters gives each sample its own adapter's output (language adapters, 16-bit and 4-bit bases), and what
cannot share a base or a batch is refused with the reason. The README's Deploy snippet runs as written."""

import os
import re

import pytest
import torch
from deploy_runs import IMAGES, LANGUAGE_ONLY, ROOT, logits, make_run, prompt_inputs

from vlm_tune.adapters import BASE, AdapterError, AdapterSet
from vlm_tune.data.images import load_rgb
from vlm_tune.export import export_checkpoint
from vlm_tune.model.build import load_for_inference


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


def _adapter_exports(arch: str, root, components=LANGUAGE_ONLY, seeds=(1, 2)) -> dict:
    """name -> (run folder, recipe, adapter export) of runs that differ only in their trained weights."""
    made = {}
    for seed in seeds:
        name = f"{arch}-{seed}" if components is LANGUAGE_ONLY else f"{arch}-full-{seed}"
        run_dir, recipe = make_run(arch, root, name=name, components=components, seed=seed)  # one base folder
        made[f"s{seed}"] = (run_dir, recipe, export_checkpoint(run_dir, root / f"{name}-export"))
    return made


def _load(exports: dict, **kwargs) -> AdapterSet:
    return AdapterSet.load({name: export for name, (_, _, export) in exports.items()}, **kwargs)


def test_switching_adapters_changes_outputs_and_switching_back_restores_them_exactly(root):
    exports = _adapter_exports(
        "llava",
        root,
        components={"vision": {"mode": "lora"}, "projector": {"mode": "full"}, "language": {"mode": "lora"}},
    )
    adapters = _load(exports)
    inputs = prompt_inputs(adapters.processor, exports["s1"][1])
    adapters.use("s1")
    first = logits(adapters.model, inputs)
    adapters.use("s2")
    second = logits(adapters.model, inputs)
    adapters.use("s1")
    again = logits(adapters.model, inputs)
    assert (first - second).abs().max() > 1e-2 and torch.equal(first, again)
    for name, (run_dir, recipe, _) in exports.items():  # each adapter computes what its own run computes
        adapters.use(name)
        alone, _ = load_for_inference(recipe, run_dir)
        assert torch.allclose(logits(adapters.model, inputs), logits(alone, inputs), atol=1e-6)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['s3'\]"):
        adapters.use("s3")
    with pytest.raises(AdapterError, match="trains the vision component"):  # rows of the vision tower are images
        adapters.caption([load_rgb(IMAGES[0]), load_rgb(IMAGES[1])], adapter=["s1", "s2"])


@pytest.mark.parametrize(
    "arch, quantized", [("llava", False), ("qwen2_5_vl", False), ("mllama", False), ("llava", True)]
)
def test_a_mixed_batch_gives_each_sample_its_own_adapters_output(arch, quantized, root):
    overrides = []
    if quantized:
        pytest.importorskip("bitsandbytes")
        overrides = ["model.quantization.bits=4", "model.dtype=bfloat16"]
    exports = _adapter_exports(arch, root / ("4bit" if quantized else "16bit"))
    adapters = _load(exports, overrides=overrides)
    dtype = torch.bfloat16 if quantized else torch.float32
    inputs = prompt_inputs(adapters.processor, exports["s1"][1], count=3, dtype=dtype)
    per_adapter = {}
    for name in ("s1", "s2"):
        adapters.use(name)
        per_adapter[name] = logits(adapters.model, inputs)
    with adapters.model.disable_adapter():
        per_adapter[BASE] = logits(adapters.model, inputs)
    names = ["s2", BASE, "s1"]
    with torch.no_grad():
        mixed = adapters.model(**inputs, adapter_names=names).logits.float()
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], per_adapter[name][row], atol=1e-5), (arch, row, name)
    assert (per_adapter["s1"] - per_adapter["s2"]).abs().max() > 1e-2  # the adapters differ

    images = [load_rgb(path) for path in IMAGES[:3]]
    one_each = [adapters.caption([image], adapter=name)[0] for image, name in zip(images, ["s2", "s1", "s1"])]
    assert adapters.caption(images, adapter=["s2", "s1", "s1"]) == one_each


def test_what_cannot_share_the_base_or_a_batch_is_refused_with_the_reason(root):
    exports = _adapter_exports("llava", root / "refusals", seeds=(1,))
    run_dir, _, export = exports["s1"]
    merged = export_checkpoint(run_dir, root / "refusals" / "merged", merge=True)
    with pytest.raises(AdapterError, match="merged export"):
        AdapterSet.load({"a": export, "m": merged})
    where = root / "refusals"
    relevance_run, _ = make_run("llava", where, "rel", components=LANGUAGE_ONLY, relevance={"enabled": True})
    with pytest.raises(AdapterError, match="relevance modules, which cannot switch"):
        AdapterSet.load({"a": export, "r": export_checkpoint(relevance_run, where / "rel-export")})
    other_run, _ = make_run("qwen2_5_vl", where, "qwen", components=LANGUAGE_ONLY)
    with pytest.raises(AdapterError, match="adapters share a base only when they were trained on it"):
        AdapterSet.load({"a": export, "q": export_checkpoint(other_run, where / "qwen-export")})
    dora_run, _ = make_run("llava", where, "dora", components={"language": {"mode": "lora", "variant": "dora"}})
    adapters = AdapterSet.load({"a": export, "d": export_checkpoint(dora_run, where / "dora-export")})
    with pytest.raises(AdapterError, match="DoRA"):
        adapters.check_mixed_batch()
    with pytest.raises(AdapterError, match="2 names for 1 images"):
        adapters.caption([load_rgb(IMAGES[0])], adapter=["a", "d"])


def test_the_readme_deploy_snippet_runs_as_written(root, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- adapters-snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    workdir = root / "readme"
    for seed, name in ((1, "shapes"), (2, "shapes-short")):
        run_dir, _ = make_run("llava", workdir / "runs", f"{name}-run", components=LANGUAGE_ONLY, seed=seed)
        export_checkpoint(run_dir, workdir / "runs" / name)
    os.symlink(ROOT / "data", workdir / "data")
    monkeypatch.chdir(workdir)
    exec(compile(snippet, "README.md (adapters snippet)", "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(printed) == 3
