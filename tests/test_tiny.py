"""The tiny fixtures are real, consistent VLMs: processor output feeds the model, ids agree,
training and generation run, and a save/load round trip reproduces the logits."""

import pytest
import torch
from PIL import Image
from tiny import SPECIAL_TOKENS, TINY_ARCHS, tiny_model, tiny_processor, tiny_vlm, tiny_vlm_folder
from transformers import AutoModelForImageTextToText, AutoProcessor

PROMPT = "Describe the image."
CAPTION = "Two red squares on the left."


def _chat(with_answer: bool = True, image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    chat = [{"role": "user", "content": [image_part, {"type": "text", "text": PROMPT}]}]
    if with_answer:
        chat.append({"role": "assistant", "content": [{"type": "text", "text": CAPTION}]})
    return chat


def _image(width: int = 40, height: int = 28) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 30, 200))
    image.paste((220, 20, 20), (0, 0, width // 2, height // 2))
    return image


def _model_inputs(processor, chat, image) -> dict:
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=len(chat) == 1)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemmaProcessor adds its own labels
    return dict(inputs)


def _image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise AssertionError(f"{type(config).__name__} has no image token id")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_train_step_and_generate(arch):
    model, processor = tiny_vlm(arch)
    model.train()
    inputs = _model_inputs(processor, _chat(), _image())
    input_ids = inputs["input_ids"]
    assert (input_ids == _image_token_id(model.config)).sum() > 0, "no image tokens in the prompt"
    assert int(input_ids.max()) < model.get_input_embeddings().num_embeddings

    loss = model(**inputs, labels=input_ids).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("embed_tokens" in name or "lm_head" in name for name in with_grad)
    assert any("vision" in name or "visual" in name for name in with_grad), "no gradient reached the vision tower"

    model.eval()
    other_image = _model_inputs(processor, _chat(), _image().transpose(Image.Transpose.ROTATE_180))
    with torch.no_grad():
        logits, other_logits = model(**inputs).logits, model(**other_image).logits
    assert logits.shape == other_logits.shape
    assert not torch.allclose(logits, other_logits, atol=1e-4), "the image does not change the logits"

    prompt = _model_inputs(processor, _chat(with_answer=False), _image())
    output = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    prompt_len = prompt["input_ids"].shape[1]
    assert prompt_len < output.shape[1] <= prompt_len + 3
    assert torch.equal(output[:, :prompt_len], prompt["input_ids"])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_token_ids_match_model_config(arch):
    model, processor = tiny_model(arch), tiny_processor(arch)
    tokenizer = processor.tokenizer
    text_config = model.config.get_text_config()
    assert len(tokenizer) <= text_config.vocab_size
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id == text_config.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    if tokenizer.bos_token is not None:
        assert tokenizer.bos_token_id == text_config.bos_token_id
    image_token = tokenizer.convert_ids_to_tokens(_image_token_id(model.config))
    assert image_token in SPECIAL_TOKENS[arch]
    for token_id, token in enumerate(SPECIAL_TOKENS[arch]):
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.decode([token_id]) == token  # one piece, never split into bytes


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chat_template_prompt_is_prefix_of_training_text(arch):
    processor = tiny_processor(arch)
    full = processor.apply_chat_template(_chat(), tokenize=False)
    prompt = processor.apply_chat_template(_chat(with_answer=False), tokenize=False, add_generation_prompt=True)
    assert CAPTION in full and PROMPT in prompt
    assert full.startswith(prompt)
    assert full.index(CAPTION) >= len(prompt)
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_processor_chat_template_tokenizes_with_one_bos(arch):
    processor = tiny_processor(arch)
    inputs = processor.apply_chat_template(
        _chat(image=_image()),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    input_ids = inputs["input_ids"][0].tolist()
    bos_id = processor.tokenizer.bos_token_id
    if bos_id is not None and bos_id != processor.tokenizer.eos_token_id:
        assert input_ids.count(bos_id) == 1
    assert "pixel_values" in inputs


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folder_round_trip_gives_same_logits(arch, tmp_path):
    model, processor = tiny_vlm(arch)
    folder = tiny_vlm_folder(arch, tmp_path)
    loaded_model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert type(loaded_model) is type(model)
    assert type(loaded_processor) is type(processor)

    inputs = _model_inputs(processor, _chat(), _image())
    loaded_inputs = _model_inputs(loaded_processor, _chat(), _image()) if arch != "blip2" else None
    if loaded_inputs is not None:  # Blip2Processor drops its chat template on load (tokenizer keeps it)
        assert inputs.keys() == loaded_inputs.keys()
        assert all(torch.equal(inputs[key], loaded_inputs[key]) for key in inputs)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, loaded_model(**inputs).logits, atol=1e-6)


def test_models_are_seeded_and_fresh():
    first, again, other = tiny_model("llava", seed=0), tiny_model("llava", seed=0), tiny_model("llava", seed=1)
    weight = "lm_head.weight"
    state, state_again, state_other = first.state_dict(), again.state_dict(), other.state_dict()
    assert torch.equal(state[weight], state_again[weight])
    assert not torch.equal(state[weight], state_other[weight])
    with torch.no_grad():
        first.lm_head.weight.add_(1.0)
    assert torch.equal(tiny_model("llava", seed=0).lm_head.weight, state_again[weight])
    assert all(p.dtype == torch.float32 for p in first.parameters())


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*llava.*idefics3"):
        tiny_vlm("llava3000")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padded_batch_of_differently_sized_images(arch):
    model, processor = tiny_vlm(arch)
    images = [[_image(40, 28)], [_image(24, 64)]]
    captions = ["A red box.", "Two green circles on the top left of the image."]
    texts = [
        processor.apply_chat_template(
            [_chat(with_answer=False)[0], {"role": "assistant", "content": caption}], tokenize=False
        )
        for caption in captions
    ]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    batch.pop("labels", None)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert torch.isfinite(model(**batch, labels=labels).loss)

    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(_chat(with_answer=False), tokenize=False, add_generation_prompt=True)
    inputs = dict(processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True))
    inputs.pop("labels", None)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[0] == 2 and output.shape[1] > inputs["input_ids"].shape[1]
