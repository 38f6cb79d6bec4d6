"""load_model: 16-bit and 4-bit loading from saved folders, QLoRA training path, clear errors."""

import sys

import pytest
import torch
import transformers as tf
from tiny import tiny_vlm, tiny_vlm_folder
from vlm_batches import make_batch, open_visual_path, randomize_lora_b

from vlm_tune.model.load import LoadError, load_model, resolve_source
from vlm_tune.model.targeting import TargetingError, apply_targeting
from vlm_tune.recipe import ComponentConfig, ModelConfig, QuantizationConfig

bnb = pytest.importorskip("bitsandbytes")


def _qlora(folder, **quant) -> ModelConfig:
    return ModelConfig(
        name_or_path=str(folder),
        dtype="bfloat16",
        gradient_checkpointing=True,
        quantization=QuantizationConfig(**quant),
    )


def test_16bit_load_from_folder_is_frozen_with_processor(tmp_path, capsys):
    folder = tiny_vlm_folder("idefics3", tmp_path)
    model, processor = load_model(ModelConfig(name_or_path=str(folder), dtype="bfloat16", gradient_checkpointing=True))
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert (
        model.is_activation_checkpointing
        if hasattr(model, "is_activation_checkpointing")
        else model.is_gradient_checkpointing
    )
    table = capsys.readouterr().out
    assert "idefics3" in table and all(c in table for c in ("vision", "projector", "language", "bfloat16"))


def _mllama_two_cross_layers_folder(tmp_path):
    """The tiny mllama with two cross-attention layers: both read the same projected image states,
    which is what makes re-entrant checkpointing backward through one graph twice."""
    base, processor = tiny_vlm("mllama")
    config = base.config
    config.text_config.num_hidden_layers = 3
    config.text_config.cross_attention_layers = [1, 2]
    torch.manual_seed(0)
    model = tf.MllamaForConditionalGeneration(config)
    with torch.no_grad():  # open the tanh gates, as in a trained model
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(1.0)
    model.save_pretrained(tmp_path / "mllama2")
    processor.save_pretrained(tmp_path / "mllama2")
    return tmp_path / "mllama2"


@pytest.mark.parametrize("arch", ["llava", "mllama"])
def test_4bit_forward_backward_reaches_every_lora_parameter(arch, tmp_path):
    folder = _mllama_two_cross_layers_folder(tmp_path) if arch == "mllama" else tiny_vlm_folder(arch, tmp_path)
    model, processor = load_model(_qlora(folder), verbose=False)
    linear4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all("language_model" in n for n in linear4)  # vision / projector / lm_head stay 16-bit
    policy = {
        "vision": ComponentConfig(mode="lora", rank=2),
        "projector": ComponentConfig(mode="full"),
        "language": ComponentConfig(mode="lora", rank=4),
    }
    if arch == "mllama":  # the architecture whose re-entrant checkpointing fails in peers
        policy["cross_attention"] = ComponentConfig(mode="lora", rank=3)
    peft_model, report = apply_targeting(model, policy)
    open_visual_path(peft_model)
    randomize_lora_b(peft_model)
    peft_model.train()
    batch = make_batch(arch, processor, model=peft_model)
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    for comp in policy:
        assert report.param_names[comp], comp
    assert any("vision" in n and "lora_A" in n for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()] == []
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".base_layer" in n]
    assert wrapped  # LoRA sits on the 4-bit leaves


def test_4bit_keeps_vision_16bit_and_norms_fp32_in_quantized_parts(tmp_path):
    model, _ = load_model(_qlora(tiny_vlm_folder("llava", tmp_path)), verbose=False)
    vision = dict(model.model.vision_tower.named_parameters())
    assert vision and all(p.dtype == torch.bfloat16 for p in vision.values())  # not upcast to fp32
    norm = model.model.language_model.norm
    assert norm.weight.dtype == torch.float32
    hidden = torch.randn(1, 3, norm.weight.shape[0], dtype=torch.bfloat16, device=norm.weight.device)
    assert norm(hidden).dtype == torch.bfloat16  # residual stream keeps its dtype


def test_keep_16bit_is_configurable_and_full_on_4bit_is_refused(tmp_path):
    model, _ = load_model(_qlora(tiny_vlm_folder("llava", tmp_path), keep_16bit=["projector"]), verbose=False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.vision_tower.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.multi_modal_projector.modules())
    with pytest.raises(TargetingError, match=r"components.vision: mode full needs 16-bit.*keep_16bit"):
        apply_targeting(model, {"vision": ComponentConfig(mode="full")})


def test_builtin_names_resolve_through_the_builtin_registry(tmp_path, monkeypatch):
    folder = tiny_vlm_folder("paligemma", tmp_path)
    import vlm_tune.model.builtin as builtin

    asked = []
    monkeypatch.setattr(builtin, "resolve_builtin", lambda name: asked.append(name) or folder)
    model, processor = load_model(ModelConfig(name_or_path="vlm_tune:tiny-paligemma", dtype="float32"), verbose=False)
    assert asked == ["vlm_tune:tiny-paligemma"] and model.config.model_type == "paligemma"


def test_a_tokenizer_without_padding_pads_with_its_end_of_sequence_token(tmp_path):
    """transformers 5.17 builds SmolLM2's tokenizer from the GGUF without a padding token; batches need one."""
    import json

    folder = tiny_vlm_folder("idefics3", tmp_path)
    config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("pad_token", None)
    config_file.write_text(json.dumps(tokenizer_config))
    _, processor = load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))
    tokenizer = processor.tokenizer
    assert tokenizer.eos_token is not None and tokenizer.pad_token == tokenizer.eos_token
    image = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32), "red")
    batch = processor(
        text=["<image>a", "<image>a longer text"], images=[[image], [image]], padding=True, return_tensors="pt"
    )
    assert batch["input_ids"].shape[0] == 2


def test_a_tokenizer_without_padding_or_end_token_is_a_clear_error():
    from types import SimpleNamespace

    from vlm_tune.model.load import ensure_pad_token

    tokenizer = SimpleNamespace(pad_token=None, eos_token=None)
    with pytest.raises(LoadError, match=r"no padding and no end-of-sequence token; set tokenizer.pad_token"):
        ensure_pad_token(SimpleNamespace(tokenizer=tokenizer))


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="is not a model folder \\(no config.json\\)"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(LoadError, match="is a file"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "notes.txt")))
    with pytest.raises(LoadError, match="no such folder"):
        resolve_source(str(tmp_path / "missing"))
    assert resolve_source("HuggingFaceTB/SmolVLM-256M-Instruct") == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_trust_remote_code_is_suggested_only_for_a_config_that_names_custom_code(tmp_path):
    import json

    plain, custom = tmp_path / "plain", tmp_path / "custom"
    for folder, config in ((plain, {"model_type": "not-a-known-type"}), (custom, {"model_type": "mine"})):
        folder.mkdir()
        config.update({"auto_map": {"AutoConfig": "modeling_mine.MineConfig"}} if folder == custom else {})
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="cannot read the model config") as unknown:
        load_model(ModelConfig(name_or_path=str(plain)))
    assert "set model.trust_remote_code" not in str(unknown.value)
    with pytest.raises(LoadError, match="ships its own code: set model.trust_remote_code: true"):
        load_model(ModelConfig(name_or_path=str(custom)))


def test_an_attention_implementation_that_cannot_run_here_names_the_field(tmp_path):
    folder = tiny_vlm_folder("idefics3", tmp_path)
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(LoadError, match=r"model.attn_implementation=flash_attention_2: .*sdpa and eager"):
        load_model(ModelConfig(name_or_path=str(folder), dtype="float32", attn_implementation="flash_attention_2"))


def test_text_only_model_is_not_a_vlm(tmp_path):
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    with pytest.raises(LoadError, match="holds a llama model \\(LlamaForCausalLM\\), not a vision-language model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "llm")))


def test_missing_bitsandbytes_names_the_install(tmp_path, monkeypatch):
    folder = tiny_vlm_folder("llava", tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(LoadError, match="pip install bitsandbytes"):
        load_model(_qlora(folder))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_4bit_on_cuda_places_weights_and_trains(arch, tmp_path):
    model, processor = load_model(_qlora(tiny_vlm_folder(arch, tmp_path)), verbose=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"}  # placed at load: 4-bit weights cannot move
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    peft_model, _ = apply_targeting(
        model,
        {
            "vision": ComponentConfig(mode="lora", rank=2),
            "projector": ComponentConfig(mode="full"),
            "language": ComponentConfig(mode="lora", rank=4),
        },
    )
    randomize_lora_b(peft_model)
    peft_model.train()
    batch = make_batch(arch, processor, model=peft_model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = peft_model(**batch).loss
    loss.backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()] == []
