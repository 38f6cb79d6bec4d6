"""The shipped synthetic caption set: 64x64 images of coloured shapes in COCO captions format.

Each image holds one shape, two or three identical shapes, or two different shapes in a spatial
relation; its 3-5 reference captions are worded differently but each states what is drawn
(colour, kind, and where they fit size, position, count and relation). Splits: train, val, test,
and test_novel, whose images all contain a colour-kind combination never drawn in the other
splits (e.g. a purple triangle), to measure generalisation.

Everything derives from (split, index) through string-seeded generators, so

    python -m vlm_tune.data.shapes --out data/shapes

regenerates the committed set bit-identically (same Pillow/zlib build for the PNG bytes).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CANVAS = 64
BACKGROUND = (255, 255, 255)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 7, "large": 13}  # half-extent of a shape in pixels
# Held out of train/val/test; every test_novel image has one. Each kind and colour stays seen elsewhere.
NOVEL_COMBINATIONS = (("purple", "triangle"), ("orange", "circle"), ("green", "diamond"), ("yellow", "square"))
POSITIONS = {"centre": (32, 32), "left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
POSITION_PHRASES = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200, "test_novel": 200}
SPLIT_ID_OFFSET = {"train": 0, "val": 100_000, "test": 200_000, "test_novel": 300_000}
SCENE_WEIGHTS = {"single": 4, "count": 3, "relation": 3}
NUMBER_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: what it is, and its centre in pixels."""

    kind: str
    colour: str
    size: str
    x: int
    y: int


@dataclass(frozen=True)
class Scene:
    """What an image shows. layout: single | count | relation; arrangement names where
    (a position for single, side_by_side / above_each_other / row for count, above / left_of
    for relation, where the first shape is above / left of the second)."""

    layout: str
    arrangement: str
    shapes: tuple[Shape, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick_look(rng: random.Random, novel: bool) -> tuple[str, str]:
    """A (colour, kind) pair: a held-out one when `novel`, otherwise never a held-out one."""
    if novel:
        return rng.choice(NOVEL_COMBINATIONS)
    while True:
        look = (rng.choice(sorted(COLOURS)), rng.choice(KINDS))
        if look not in NOVEL_COMBINATIONS:
            return look


def make_scene(split: str, index: int) -> Scene:
    """The scene of image `index` of `split`; a pure function of its arguments.

    Raises:
        KeyError: unknown split (valid: train, val, test, test_novel).
    """
    SPLIT_ID_OFFSET[split]  # noqa: B018 - validates the split name
    rng = random.Random(f"shapes:{split}:{index}")
    novel = split == "test_novel"
    layout = rng.choices(list(SCENE_WEIGHTS), weights=list(SCENE_WEIGHTS.values()))[0]

    def jitter() -> int:
        return rng.randint(-2, 2)

    if layout == "single":
        colour, kind = _pick_look(rng, novel)
        position = rng.choice(list(POSITIONS))
        cx, cy = POSITIONS[position]
        shape = Shape(kind, colour, rng.choice(list(SIZES)), cx + jitter(), cy + jitter())
        return Scene("single", position, (shape,))
    if layout == "count":
        colour, kind = _pick_look(rng, novel)
        count = rng.choice([2, 3])
        if count == 3:  # three fit in a row only when small
            centres, size, arrangement = [(12, 32), (32, 32), (52, 32)], "small", "row"
        else:
            size = rng.choice(list(SIZES))
            arrangement = rng.choice(["side_by_side", "above_each_other"])
            centres = [(16, 32), (48, 32)] if arrangement == "side_by_side" else [(32, 16), (32, 48)]
        dy = jitter()
        shapes = tuple(Shape(kind, colour, size, cx + jitter() // 2, cy + dy) for cx, cy in centres)
        return Scene("count", arrangement, shapes)
    first = _pick_look(rng, novel and rng.random() < 0.5)
    second = _pick_look(rng, novel and first not in NOVEL_COMBINATIONS)
    while second == first:
        second = _pick_look(rng, novel and first not in NOVEL_COMBINATIONS)
    arrangement = rng.choice(["above", "left_of"])
    centres = [(32, 16), (32, 48)] if arrangement == "above" else [(16, 32), (48, 32)]
    shapes = tuple(
        Shape(kind, colour, rng.choice(list(SIZES)), cx + jitter(), cy + jitter() // 2)
        for (colour, kind), (cx, cy) in zip((first, second), centres)
    )
    return Scene("relation", arrangement, shapes)


def _single_captions(shapes: tuple[Shape, ...], position: str) -> list[str]:
    shape = shapes[0]
    s, c, k, where = shape.size, shape.colour, shape.kind, POSITION_PHRASES[position]
    return [
        f"a {s} {c} {k}",
        f"{_article(c)} {c} {k} {where}",
        f"a {s} {c} {k} {where}",
        f"there is a {s} {c} {k} {where}",
        f"{_article(c)} {c} {k}",
    ]


def _count_captions(shapes: tuple[Shape, ...], arrangement: str) -> list[str]:
    shape = shapes[0]
    n, s, c, ks = NUMBER_WORDS[len(shapes)], shape.size, shape.colour, shape.kind + "s"
    where = {"side_by_side": "side by side", "above_each_other": "one above the other", "row": "in a row"}[arrangement]
    return [
        f"{n} {c} {ks}",
        f"{n} {s} {c} {ks}",
        f"{n} {c} {ks} {where}",
        f"there are {n} {s} {c} {ks}",
        f"{n} {s} {c} {ks} {where}",
    ]


def _relation_captions(shapes: tuple[Shape, ...], arrangement: str) -> list[str]:
    a, b = shapes
    relation, inverse = ("above", "below") if arrangement == "above" else ("to the left of", "to the right of")

    def full(shape: Shape) -> str:
        return f"a {shape.size} {shape.colour} {shape.kind}"

    def short(shape: Shape) -> str:
        return f"{_article(shape.colour)} {shape.colour} {shape.kind}"

    return [
        f"{full(a)} {relation} {full(b)}",
        f"{full(b)} {inverse} {full(a)}",
        f"{short(a)} and {short(b)}",
        f"{short(a)} {relation} {short(b)}",
        f"there is {short(b)} {inverse} {short(a)}",
    ]


CAPTION_BUILDERS = {"single": _single_captions, "count": _count_captions, "relation": _relation_captions}


def scene_captions(scene: Scene, split: str, index: int) -> list[str]:
    """3 to 5 distinct captions of `scene`, each stating what is drawn; deterministic per (split, index)."""
    phrasings = CAPTION_BUILDERS[scene.layout](scene.shapes, scene.arrangement)
    rng = random.Random(f"captions:{split}:{index}")
    return rng.sample(phrasings, rng.randint(3, 5))


def draw_scene(scene: Scene) -> Image.Image:
    """Render `scene` as a 64x64 RGB image (flat colours on white, no anti-aliasing)."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        r, x, y, fill = SIZES[shape.size], shape.x, shape.y, COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            half = round(r * 0.85)
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        elif shape.kind == "triangle":
            base = y + round(r * 0.8)
            draw.polygon([(x, y - r), (x + r, base), (x - r, base)], fill=fill)
        else:  # diamond
            half = round(r * 0.8)
            draw.polygon([(x, y - r), (x + half, y), (x, y + r), (x - half, y)], fill=fill)
    return image


def file_name(split: str, index: int) -> str:
    """Image file name of image `index` of `split` (relative to the images folder)."""
    return f"{split}_{index:05d}.png"


def split_annotations(split: str, count: int) -> dict:
    """The COCO captions dict (`info`, `licenses`, `images`, `annotations`) of one split."""
    images, annotations = [], []
    for index in range(count):
        image_id = SPLIT_ID_OFFSET[split] + index + 1
        images.append({"id": image_id, "file_name": file_name(split, index), "width": CANVAS, "height": CANVAS})
        for caption in scene_captions(make_scene(split, index), split, index):
            annotations.append(
                {"id": len(annotations) + 1 + SPLIT_ID_OFFSET[split] * 10, "image_id": image_id, "caption": caption}
            )
    info = {
        "description": f"vlm_tune synthetic shapes captions, split {split}",
        "version": "1.0",
        "regenerate": "python -m vlm_tune.data.shapes --out data/shapes",
    }
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


def annotation_bytes(annotations: dict) -> bytes:
    """Canonical file bytes of an annotation dict (one image or caption per line)."""
    lines = ['{"info": ' + json.dumps(annotations["info"], sort_keys=True) + ', "licenses": [],', '"images": [']
    lines.append(",\n".join(json.dumps(entry) for entry in annotations["images"]) + "],")
    lines.append('"annotations": [')
    lines.append(",\n".join(json.dumps(entry) for entry in annotations["annotations"]) + "]}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_shapes(out: str | Path, sizes: dict[str, int] | None = None) -> list[Path]:
    """Write `images/*.png` and `captions_<split>.json` for every split into `out`.

    Args:
        out: the set's folder (created if needed).
        sizes: images per split (default `SPLIT_SIZES`: 2000 / 200 / 200 / 200).
    Returns:
        The annotation files written.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for split, count in (sizes or SPLIT_SIZES).items():
        for index in range(count):  # fixed PNG settings and no metadata: same bytes every time
            draw_scene(make_scene(split, index)).save(
                out / "images" / file_name(split, index), format="PNG", compress_level=9
            )
        path = out / f"captions_{split}.json"
        path.write_bytes(annotation_bytes(split_annotations(split, count)))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the shapes set; returns the exit code (2: a mistake, named on stderr)."""
    from vlm_tune.cli import CommandParser, run_command
    from vlm_tune.data.bad_samples import DataError

    parser = CommandParser(
        prog="python -m vlm_tune.data.shapes", description="Write the synthetic shapes caption set (COCO format)."
    )
    parser.add_argument("--out", default="data/shapes", help="output folder (default data/shapes)")
    for split, count in SPLIT_SIZES.items():
        parser.add_argument(
            f"--{split.replace('_', '-')}",
            type=int,
            default=count,
            dest=split,
            help=f"images in split {split} (default {count})",
        )
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in SPLIT_SIZES}
    for split, count in sizes.items():
        if count < 0:
            parser.error(f"--{split.replace('_', '-')}: a number of images is >= 0, got {count}")

    def command() -> int:
        try:
            written = write_shapes(args.out, sizes)
        except OSError as exc:
            raise DataError(f"--out {args.out}: cannot write the set there ({exc.strerror}); name a folder") from None
        print("wrote " + ", ".join(str(path) for path in written) + f" and {Path(args.out) / 'images'}/")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
