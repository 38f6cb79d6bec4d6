"""A real processor-made training batch for the tiny VLMs (shared by the model tests)."""

import torch
from PIL import Image

PROMPT = "Describe the image."
CAPTION = "a red square on the left"
NO_CHAT_TEMPLATE = {"paligemma": "<image>{prompt}\n{caption}", "blip2": "{prompt} {caption}"}


def test_image(width: int = 48, height: int = 40) -> Image.Image:
    """A two-colour RGB image (not random noise, so features vary across patches)."""
    image = Image.new("RGB", (width, height), (30, 30, 200))
    image.paste((220, 20, 20), (0, 0, width // 2, height // 2))
    return image


test_image.__test__ = False  # not a pytest test


def make_batch(arch: str, processor, batch_size: int = 1, model: torch.nn.Module = None) -> dict:
    """Processor output for image + prompt + caption, with labels = input_ids (padding masked);
    on `model`'s device, pixel values in its vision dtype, when a model is given."""
    if arch in NO_CHAT_TEMPLATE:
        text = NO_CHAT_TEMPLATE[arch].format(prompt=PROMPT, caption=CAPTION)
    else:
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": CAPTION}]},
        ]
        text = processor.apply_chat_template(chat, tokenize=False)
    images = [test_image(48 + 8 * i, 40) for i in range(batch_size)]
    batch = dict(processor(images=images, text=[text] * batch_size, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    if model is not None:
        weight = next(p for n, p in model.named_parameters() if "vision" in n or "visual" in n)
        batch = {k: v.to(weight.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(weight.dtype)
    return batch


def open_visual_path(model: torch.nn.Module) -> None:
    """Give weights a tiny random init leaves at zero, as any trained checkpoint has them non-zero:
    BLIP-2 `query_tokens` (all-zero queries give the Q-Former's first self-attention a zero input)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("query_tokens") and not param.abs().sum():
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """PEFT starts lora_B at zero, so lora_A gets no gradient; give B values as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward from zeroed gradients: the loss and a copy of every parameter gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
