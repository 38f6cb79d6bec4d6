"""Batched caption generation over a dataset, for any model built by vlm_tune (base, PEFT or relevance wrapper).

Used by evaluation (`vlm_tune.evaluate`), the caption metrics logged during training, `vlm_tune.generate`
and `vlm_tune.adapters`: one decoding for all of them.
"""

from __future__ import annotations

import logging
from typing import Optional

from vlm_tune.data.bad_samples import is_skipped
from vlm_tune.recipe import DataConfig, EvalConfig

logger = logging.getLogger("vlm_tune.evaluate")


class _CountingCollate:
    """Wraps a collator so the loop also learns how many items (None ones included) a batch had."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list):
        usable = sum(not is_skipped(item) for item in items)
        return (self.collator(items) if usable else None), len(items), usable


def _device_and_dtype(model):
    """Where inputs go, and the dtype of floating-point inputs (pixel values)."""
    import torch

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = next((p.dtype for p in params if p.dtype.is_floating_point), torch.float32)
    return device, dtype


def _new_tokens(sequences, prompt_ids):
    """The generated part of `generate`'s output: decoder-only models return prompt + new tokens."""
    if (
        prompt_ids is not None
        and sequences.shape[1] >= prompt_ids.shape[1]
        and bool((sequences[:, : prompt_ids.shape[1]] == prompt_ids.to(sequences.device)).all())
    ):
        return sequences[:, prompt_ids.shape[1] :]
    return sequences  # encoder-decoder models, or generation from embeddings only, return new tokens


def _to_device(value, device, dtype):
    """A tensor input on the model's device; floating-point ones (pixel values) in its dtype too."""
    import torch

    if not torch.is_tensor(value):
        return value
    if value.is_floating_point():
        return value.to(device, dtype)
    return value.to(device)


def on_accelerator(model):
    """The model on the GPU when there is one (16-bit loads stay on the CPU; 4-bit ones are placed at load)."""
    import torch

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if torch.cuda.is_available() and on_cpu and not getattr(model, "is_loaded_in_4bit", False):
        return model.to("cuda")
    return model


def _caption_batch(model, tokenizer, inputs: dict, meta: dict, eval_cfg: EvalConfig, extra: dict) -> list[dict]:
    """Generate for one collated batch; one `{"image_id", ("question",) "prediction", "references"}` per sample."""
    output = model.generate(
        **inputs, max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams, do_sample=False, **extra
    )
    sequences = getattr(output, "sequences", output)  # [B, prompt + new] or [B, new]
    texts = tokenizer.batch_decode(_new_tokens(sequences, inputs.get("input_ids")), skip_special_tokens=True)
    questions = meta.get("questions") or [None] * len(texts)  # conversations: the question asked
    return [
        {
            "image_id": image_id,
            **({"question": question} if question is not None else {}),
            "prediction": " ".join(text.split()),
            "references": list(references),
        }
        for image_id, question, text, references in zip(meta["image_ids"], questions, texts, meta["references"])
    ]


def _loader(processor, dataset, count: int, data_cfg: DataConfig, batch_size: int):
    """Batches of the first `count` items, collated for generation, counting what the collator drops."""
    from torch.utils.data import DataLoader, Subset

    from vlm_tune.data.chat_collate import generate_collator_for

    collate = _CountingCollate(generate_collator_for(dataset, processor, data_cfg))
    subset = Subset(dataset, range(count))
    return DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=data_cfg.num_workers, collate_fn=collate
    )


def generate_captions(
    model,
    processor,
    dataset,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    show_progress: bool = True,
    adapter_of: Optional[dict] = None,
) -> list[dict]:
    """Caption every image of `dataset` (the first `eval_cfg.limit` when set), in batches; for a conversation
    set, answer the last question of every sample instead.

    Args:
        model: a VLM (base, PEFT or relevance wrapper) with a `generate` method.
        processor: its processor (the tokenizer decodes the new tokens).
        dataset: items `{"image_id", "image", "captions", ...}` (or conversation items) or None for an unreadable
            image (skipped).
        data_cfg: the `data` section (prompt, image size) for the generation collator.
        eval_cfg: batch size, number of beams, max new tokens, limit.
        show_progress: draw a tqdm progress bar.
        adapter_of: image id -> the name of the PEFT adapter that captions it (per-sample adapters in one
            batch, PEFT's `adapter_names`); None uses the active adapter.
    Returns:
        `[{"image_id", ("question",) "prediction", "references"}]`, without skipped samples (logged).
    """
    import torch
    from tqdm.auto import tqdm

    count = len(dataset) if eval_cfg.limit is None else min(eval_cfg.limit, len(dataset))
    loader = _loader(processor, dataset, count, data_cfg, eval_cfg.batch_size)
    tokenizer = getattr(processor, "tokenizer", processor)
    device, dtype = _device_and_dtype(model)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    skipped = 0
    try:
        with (
            tqdm(total=count, desc="generate", unit="img", disable=not show_progress, dynamic_ncols=True) as progress,
            torch.inference_mode(),
        ):
            for collated, n_items, n_usable in loader:
                progress.update(n_items)
                skipped += n_items - n_usable
                if collated is None:
                    continue
                inputs, meta = collated
                skipped += n_usable - len(meta["image_ids"])  # the collator may drop more (e.g. too long)
                for record in meta.get("skipped", []):
                    logger.warning("not captioned: image %s: %s", record.get("image_id"), record.get("reason"))
                inputs = {key: _to_device(value, device, dtype) for key, value in inputs.items()}
                extra = {"adapter_names": [adapter_of[i] for i in meta["image_ids"]]} if adapter_of else {}
                rows += _caption_batch(model, tokenizer, inputs, meta, eval_cfg, extra)
    finally:
        model.train(was_training)
    if skipped:
        logger.warning("%d image(s) were not captioned (unreadable, or dropped by the collator)", skipped)
    return rows


def score_predictions(rows: list[dict], task: str, use_java: Optional[bool]) -> dict[str, float]:
    """Caption metrics (task caption) or exact match / VQA accuracy / ANLS (task vqa) of generated rows."""
    predictions = {r["image_id"]: r["prediction"] for r in rows}
    references = {r["image_id"]: r["references"] for r in rows}
    if task == "vqa":
        from vlm_tune.vqa_metrics import score_answers

        return score_answers(predictions, references)
    from vlm_tune.metrics import score_captions

    return score_captions(predictions, references, use_java=use_java)
