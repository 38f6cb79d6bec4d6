"""The README stays true: its recipe reference is the generated one, its quick start the Makefile's."""

from pathlib import Path

from vlm_tune.recipe_reference import readme_section, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_matches_the_code():
    assert readme_section((ROOT / "README.md").read_text()) == reference_markdown(), (
        "README recipe reference is stale: run python -m vlm_tune.recipe_reference --write"
    )


def test_reference_documents_every_field_with_a_help_line():
    text = reference_markdown()
    for line in text.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"field without a help comment: {line}"


def test_quick_start_commands_exist_in_makefile_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
