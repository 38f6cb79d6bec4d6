"""Caption images with a merged vlm_tune export, using plain transformers only (this script never imports vlm_tune).

    python scripts/plain_transformers_caption.py EXPORT_DIR IMAGE [IMAGE ...] [--prompt TEXT] [--max-new-tokens N]

Prints `path<TAB>caption` per image: what a user who received the folder, without vlm_tune, gets from it.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def caption(folder: str, paths: list[str], prompt: str, max_new_tokens: int) -> tuple[list[list[int]], object]:
    """Greedy new token ids per image from the folder's model, processor and chat template; and the processor."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    conversations = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        content = [{"type": "image", "image": image}, {"type": "text", "text": prompt}]
        conversations.append([{"role": "user", "content": content}])
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[:, inputs["input_ids"].shape[1] :].tolist(), processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a merged export: python -m vlm_tune.export RUN --out DIR --merge")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    new_tokens, processor = caption(args.folder, args.images, args.prompt, args.max_new_tokens)
    for path, text in zip(args.images, processor.batch_decode(new_tokens, skip_special_tokens=True)):
        print(f"{path}\t{' '.join(text.split())}")


if __name__ == "__main__":
    main()
