"""The README's recipe reference, generated from the recipe dataclasses so that it cannot drift.

`python -m vlm_tune.recipe_reference` prints it, `--write` puts it into README.md; a test checks that the
README holds exactly this text.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Optional

from vlm_tune import recipe as schema
from vlm_tune.cli import CommandParser, run_command
from vlm_tune.errors import VlmTuneError


class ReadmeError(VlmTuneError):
    """A README that cannot take the reference (missing, or without the reference markers)."""


# section prefix -> dataclass, in README order
SECTIONS: dict[str, type] = {
    "model": schema.ModelConfig,
    "model.quantization": schema.QuantizationConfig,
    "components.NAME": schema.ComponentConfig,  # NAME: vision, projector, cross_attention, language
    "data": schema.DataConfig,
    "data.SET": schema.DataSourceConfig,  # SET: train, eval
    "train": schema.TrainConfig,
    "train.adalora": schema.AdaLoraSchedule,
    "eval": schema.EvalConfig,
    "relevance": schema.RelevanceConfig,
    "speed": schema.SpeedConfig,
}


def field_help(cls: type) -> dict[str, str]:
    """Field name -> the help line of the field (`field(metadata={"help": ...})`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin is typing.Union:
        return " or ".join(_type(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """One markdown table per recipe section: key, type, default, meaning."""
    blocks = []
    for prefix, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        helps = field_help(cls)
        rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_strip_optional(hints[field.name])):
                continue  # nested sections get their own table
            rows.append(
                f"| `{prefix}.{field.name}` | {_type(hints[field.name])} | `{_default(field)}` | "
                f"{helps.get(field.name, '').replace('|', '/')} |"
            )
        blocks.append(f"**`{prefix}`**\n\n" + "\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def _strip_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) in (typing.Union,) and len(args) == 1 else annotation


START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def readme_section(readme_text: str) -> str:
    """The text between the reference markers of the README.

    Raises:
        ReadmeError: the text lacks the markers.
    """
    if START not in readme_text or END not in readme_text.split(START, 1)[1]:
        raise ReadmeError(f"the README has no recipe reference section: put the lines {START} and {END} into it")
    return readme_text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_into_readme(path: str = "README.md") -> None:
    """Replace the README's reference section with the generated one.

    Raises:
        ReadmeError: the README does not exist or lacks the reference markers.
    """
    readme = Path(path)
    if not readme.is_file():
        raise ReadmeError(f"{readme}: no such file; run from the repository root, where README.md is")
    text = readme.read_text()
    readme_section(text)  # the markers are there
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{reference_markdown()}{END}{tail}")


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code (2: a mistake, named on stderr)."""
    parser = CommandParser(prog="python -m vlm_tune.recipe_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the reference into ./README.md instead of printing")
    args = parser.parse_args(argv)

    def command() -> int:
        if args.write:
            write_into_readme()
        else:
            print(reference_markdown(), end="")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
