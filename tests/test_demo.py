"""The shipped demo: the README's demo section agrees with recipes/demo.yaml, and a first run (which builds
the model) trains exactly like a later one (which finds it cached)."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_tune.recipe import load_recipe
from vlm_tune.run_log import read_log

ROOT = Path(__file__).resolve().parent.parent
BUDGET = re.compile(r"[Tt]ime budget: (\d+) minutes")
FIGURE_ROW = re.compile(
    r"^\| (test|test_novel) \| (base|trained) \| (\d+\.\d\d ± \d+\.\d\d) \| (\d+\.\d\d ± \d+\.\d\d) \|"
)
TIME_ROW = re.compile(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+)")


def _demo_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## The demo\n")
    return readme[start : readme.index("\n## ", start + 1)]


def _figures(section: str) -> str:
    return section[section.index("<!-- demo-figures:start -->") : section.index("<!-- demo-figures:end -->")]


def test_readme_demo_section_agrees_with_the_recipe():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [])
    section, recipe_text = _demo_section(), (ROOT / "recipes" / "demo.yaml").read_text()
    steps = recipe.train.max_steps
    assert f"{steps} steps" in section, f"the README's demo section does not say the recipe's {steps} steps"
    budget = BUDGET.search(recipe_text).group(1)
    assert BUDGET.search(section).group(1) == budget, "README and recipes/demo.yaml state different time budgets"

    figures = _figures(section)
    assert f"3 seeds (0, 1, 2), {steps} steps" in figures, "the figures are not from 3 seeds of this recipe"
    rows = {(m.group(1), m.group(2)) for m in map(FIGURE_ROW.match, figures.splitlines()) if m}
    assert rows == {(s, m) for s in ("test", "test_novel") for m in ("base", "trained")}, rows
    times = [m.groups() for m in map(TIME_ROW.match, figures.splitlines()) if m]
    assert [seed for seed, *_ in times] == ["0", "1", "2"], "a wall time per seed"
    for seed, *seconds in times:  # numbers, or the placeholder until a run alone measured them
        if seconds[-1] != "TBD":
            assert float(seconds[-1]) <= 60 * int(budget), f"seed {seed}: the run takes longer than the budget"
    assert "python benchmarks/demo_seeds.py" in section, "the command that gives the figures"


@pytest.mark.slow  # builds the demo model (about a minute) and trains it twice for two steps
def test_a_run_that_builds_the_model_trains_like_one_that_finds_it_cached(tmp_path, monkeypatch):
    from vlm_tune.model.builtin import fetch_smollm2_gguf
    from vlm_tune.train import train

    monkeypatch.setenv("VLM_TUNE_SMOLLM2_GGUF", str(fetch_smollm2_gguf()))  # the usual cache: nothing downloads
    monkeypatch.setenv("VLM_TUNE_CACHE", str(tmp_path / "cache"))  # empty: the first run builds the model
    runs = []
    for name in ("builds", "cached"):
        overrides = [f"train.output_dir={tmp_path / name}", "train.max_steps=2", "train.log_every=1", "data.eval=null"]
        train(load_recipe(ROOT / "recipes" / "demo.yaml", overrides))
        runs.append(tmp_path / name)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1  # built once, by the first run
    losses = [[r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r] for run in runs]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    files = sorted(path.relative_to(runs[0]) for path in runs[0].glob("checkpoint-2/**/*.safetensors"))
    assert files and files == sorted(
        path.relative_to(runs[1]) for path in runs[1].glob("checkpoint-2/**/*.safetensors")
    )
    for name in files:  # same initialisation, same updates: the same trained weights
        first, later = load_file(runs[0] / name), load_file(runs[1] / name)
        assert first.keys() == later.keys() and all(torch.equal(first[key], later[key]) for key in first), name
