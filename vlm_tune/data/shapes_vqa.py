"""The shipped VQA set: questions and answers about the shapes images (colour, count, position, shape).

Questions derive from the scene of each image of `data/shapes` (vlm_tune.data.shapes, which draws the images
this set points at: nothing is copied). Files, in the `messages` format (JSONL, one conversation per line):
    train.jsonl       one conversation per train image: three of its questions in a row (multi-turn)
    val.jsonl, test.jsonl, test_novel.jsonl
                      one question per line, two questions per image; test_novel's images each hold a
                      colour-kind combination never drawn in train, val or test (the held-out split)
Each evaluation line has "answers": ten reference answers, as VQA v2 has, cycling through the accepted
wordings (e.g. "left", "on the left"), and "kind": the question kind. Everything derives from (split, index)
through string-seeded generators, so

    python -m vlm_tune.data.shapes_vqa --out data/shapes_vqa

rewrites the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from vlm_tune.data.shapes import (
    NUMBER_WORDS,
    POSITION_PHRASES,
    SPLIT_SIZES,
    Scene,
    file_name,
    make_scene,
)

QUESTION_KINDS = ("colour", "count", "position", "shape")
QUESTIONS_PER_IMAGE = {"train": 3, "val": 2, "test": 2, "test_novel": 2}
REFERENCES_PER_QUESTION = 10  # as VQA v2: an accepted wording that fills 4 or more of them scores 1.0
# A position's accepted answers: the word, its phrase, and how people also say it.
POSITION_ANSWERS = {
    "centre": ["centre", "center", "in the centre", "middle"],
    "left": ["left", "on the left"],
    "right": ["right", "on the right"],
    "top": ["top", "at the top", "above"],
    "bottom": ["bottom", "at the bottom", "below"],
}
# Where each shape of a relation scene sits: the first shape is above / left of the second.
RELATION_PLACES = {"above": ("top", "bottom"), "left_of": ("left", "right")}
COUNT_WORDS = {1: "one", **NUMBER_WORDS}


def _count_answers(count: int) -> list[str]:
    return [str(count), COUNT_WORDS[count]]


def _single_questions(scene: Scene) -> dict[str, tuple[str, list[str]]]:
    shape, where = scene.shapes[0], scene.arrangement
    return {
        "colour": (f"What colour is the {shape.kind}?", [shape.colour]),
        "count": ("How many shapes are there?", _count_answers(1)),
        "position": (f"Where is the {shape.colour} {shape.kind}?", POSITION_ANSWERS[where]),
        "shape": (f"What shape is {POSITION_PHRASES[where]}?", [shape.kind]),
    }


def _count_questions(scene: Scene) -> dict[str, tuple[str, list[str]]]:
    shape, count = scene.shapes[0], len(scene.shapes)
    return {
        "colour": (f"What colour are the {shape.kind}s?", [shape.colour]),
        "count": (f"How many {shape.kind}s are there?", _count_answers(count)),
        "shape": (f"What shape are the {shape.colour} shapes?", [shape.kind]),
    }


def _relation_questions(scene: Scene, rng: random.Random) -> dict[str, tuple[str, list[str]]]:
    places = RELATION_PLACES[scene.arrangement]
    asked, other = rng.sample(range(2), 2)  # which shape each question is about
    shape, place = scene.shapes[asked], places[asked]
    named, named_place = scene.shapes[other], places[other]
    return {
        "colour": (f"What colour is the shape {POSITION_PHRASES[place]}?", [shape.colour]),
        "count": ("How many shapes are there?", _count_answers(2)),
        "position": (f"Where is the {named.colour} {named.kind}?", POSITION_ANSWERS[named_place]),
        "shape": (f"What shape is {POSITION_PHRASES[place]}?", [shape.kind]),
    }


def scene_questions(scene: Scene, split: str, index: int) -> list[tuple[str, str, list[str]]]:
    """(kind, question, reference answers) about `scene`, `QUESTIONS_PER_IMAGE[split]` of them, in a
    deterministic order per (split, index); every answer follows from the scene alone."""
    rng = random.Random(f"vqa:{split}:{index}")
    if scene.layout == "single":
        questions = _single_questions(scene)
    elif scene.layout == "count":
        questions = _count_questions(scene)
    else:
        questions = _relation_questions(scene, rng)
    kinds = rng.sample(sorted(questions), min(QUESTIONS_PER_IMAGE[split], len(questions)))
    return [(kind, *questions[kind]) for kind in kinds]


def _user(question: str, with_image: bool) -> dict:
    parts = [{"type": "image"}] if with_image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def _assistant(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def references(accepted: list[str]) -> list[str]:
    """Ten reference answers cycling through the accepted wordings (the first one most often)."""
    return [accepted[i % len(accepted)] for i in range(REFERENCES_PER_QUESTION)]


def split_records(split: str, count: int, image_folder: str) -> list[dict]:
    """The lines of one split's file; `image_folder` is the shapes images folder relative to that file."""
    records = []
    for index in range(count):
        scene = make_scene(split, index)
        questions = scene_questions(scene, split, index)
        image = f"{image_folder}/{file_name(split, index)}"
        sample = f"{split}_{index:05d}"
        if split == "train":  # all questions of an image in one conversation: one image read, several answers
            messages = []
            for turn, (_, question, answers) in enumerate(questions):
                messages += [_user(question, with_image=turn == 0), _assistant(answers[0])]
            kinds = "+".join(kind for kind, _, _ in questions)
            records.append({"id": sample, "kind": kinds, "messages": messages, "images": [image]})
            continue
        for kind, question, answers in questions:
            messages = [_user(question, with_image=True), _assistant(answers[0])]
            records.append(
                {
                    "id": f"{sample}_{kind}",
                    "kind": kind,
                    "messages": messages,
                    "images": [image],
                    "answers": references(answers),
                }
            )
    return records


def write_shapes_vqa(out: str | Path, shapes: str | Path = "data/shapes", sizes: dict[str, int] | None = None):
    """Write `<split>.jsonl` for every split into `out`, pointing at the images of the shapes set in `shapes`.

    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_folder = Path(os.path.relpath(Path(shapes) / "images", out)).as_posix()
    written = []
    for split, count in (sizes or SPLIT_SIZES).items():
        path = out / f"{split}.jsonl"
        lines = [json.dumps(record, ensure_ascii=False) for record in split_records(split, count, image_folder)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the shapes VQA set."""
    parser = argparse.ArgumentParser(description="Write the shapes VQA set (messages JSONL) about data/shapes.")
    parser.add_argument("--out", default="data/shapes_vqa", help="output folder (default data/shapes_vqa)")
    parser.add_argument("--shapes", default="data/shapes", help="the shapes set whose images it asks about")
    args = parser.parse_args(argv)
    written = write_shapes_vqa(args.out, args.shapes)
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
