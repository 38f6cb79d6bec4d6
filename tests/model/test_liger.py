"""speed.liger_kernel: which modules of the language decoder take liger-kernel's kernels, that the patched model
computes what the plain one does, that `remove()` and other models are untouched, and the refusals.

Triton kernels do not run on the CPU, so the CPU tests put reference functions (the kernels' semantics in torch)
in place of liger's: they test the wiring (which modules, which norm settings, LoRA inside the MLP), not liger.
The CUDA test runs liger's kernels themselves."""

import collections
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_vlm, tiny_vlm_folder
from vlm_batches import loss_and_grads, make_batch, randomize_lora_b

from vlm_tune.model import liger
from vlm_tune.model.build import build_model
from vlm_tune.model.components import find_components
from vlm_tune.model.liger import install_liger_kernels
from vlm_tune.model.speed import SpeedError
from vlm_tune.model.targeting import apply_targeting, base_name
from vlm_tune.recipe import ComponentConfig, RecipeError, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0, targets=["attention", "mlp"])
COUNTS = {  # case -> RMSNorms, MLPs and attention layers patched in its tiny (2-layer) decoder
    "llava": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "llava+mistral": {"rms_norm": 5, "mlp": 2, "rope": 2},  # LLaVA-NeXT-Mistral's decoder
    "llava+qwen2": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "llava_next": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "idefics3": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "smolvlm": {"rms_norm": 5, "mlp": 2, "rope": 2},  # SmolVLM2's model class, Idefics3's tiny sizes
    "qwen2_vl": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "qwen2_5_vl": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "mllama": {"rms_norm": 5, "mlp": 2, "rope": 1},  # layer 1 is a cross-attention layer (its q/k norms: not language)
    "paligemma": {"rms_norm": 5, "mlp": 2, "rope": 2},
    "paligemma+gemma2": {"rms_norm": 9, "mlp": 2, "rope": 2},  # PaliGemma 2: four norms around each block
    "gemma3": {"rms_norm": 13, "mlp": 2, "rope": 2},  # four norms around each block and q / k norms per layer
}


def _rms_norm(x, weight, eps, offset, casting_mode, in_place):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        return normed.to(x.dtype) * (offset + weight)
    return (normed * (offset + weight.float())).to(x.dtype)


def _rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


REFERENCES = {
    "rms_norm": _rms_norm,
    "swiglu": lambda a, b: F.silu(a) * b,
    "geglu": lambda a, b: F.gelu(a, approximate="tanh") * b,
    "rope": _rope,
}


@pytest.fixture
def kernels(monkeypatch):
    """Reference functions in place of liger's, counting their calls; CUDA reported available while installing."""
    calls = collections.Counter()

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return REFERENCES[name](*args, **kwargs)

        return call

    monkeypatch.setattr(liger, "liger_functions", lambda: SimpleNamespace(**{n: counted(n) for n in REFERENCES}))
    return calls


def _install(monkeypatch, function, *args):
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        return function(*args)


def _tiny(case: str):
    """The tiny model and processor of `arch`, or of `arch+decoder`: its model with another decoder of the same size."""
    import tiny
    import transformers as tf

    if case == "smolvlm":
        vision, text = tf.SmolVLMVisionConfig(**tiny._vit()), tf.LlamaConfig(**tiny._decoder("idefics3"))
        config = tf.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=5, scale_factor=2)
        return tf.SmolVLMForConditionalGeneration(config).eval(), None
    arch, _, decoder = case.partition("+")
    model, processor = tiny_vlm(arch)
    if decoder:
        config = model.config
        text = {"gemma2": tf.Gemma2Config, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[decoder]
        extra = {"head_dim": 16} if decoder == "gemma2" else {}
        config.text_config = text(**tiny._decoder(arch, **extra))
        torch.manual_seed(0)
        model = type(model)(config).float().eval()
    return model, processor


def _targeted(case: str):
    model, processor = _tiny(case)
    model, _ = apply_targeting(model, {"language": LORA})
    randomize_lora_b(model)
    return model.train(), processor, find_components(model.get_base_model())


def _own_forwards(model) -> dict[str, object]:
    return {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}


@pytest.mark.parametrize("case", list(COUNTS))
def test_the_decoders_norms_mlps_and_attention_layers_are_patched_and_nothing_else(case, kernels, monkeypatch):
    model, _, cmap = _targeted(case)
    before = _own_forwards(model)
    handle = _install(monkeypatch, install_liger_kernels, model, cmap)
    assert handle.counts == COUNTS[case]
    patched = {name for name, forward in _own_forwards(model).items() if before.get(name) is not forward}
    assert len(patched) == sum(COUNTS[case].values())
    assert {cmap.component_of(base_name(name)) for name in patched} == {"language"}  # no vision tower, projector
    handle.remove()
    assert _own_forwards(model) == before


def _batch_size(arch: str) -> int:
    return 1 if arch in ("gemma3", "mllama") else 2  # their processors take a list of images per sample


@pytest.mark.parametrize("case", ["qwen2_5_vl", "gemma3", "mllama", "paligemma", "paligemma+gemma2", "llava+qwen2"])
def test_the_patched_model_gives_the_same_loss_and_lora_gradients_and_remove_restores_it(case, kernels, monkeypatch):
    model, processor, cmap = _targeted(case)
    arch = case.partition("+")[0]
    batch = make_batch(arch, processor, batch_size=_batch_size(arch))
    plain = loss_and_grads(model, batch)
    handle = _install(monkeypatch, install_liger_kernels, model, cmap)
    patched = loss_and_grads(model, batch)
    assert kernels["rms_norm"] == handle.counts["rms_norm"] and kernels["rope"] == handle.counts["rope"]
    assert kernels["swiglu" if "gemma" not in arch else "geglu"] == handle.counts["mlp"]
    mlp_lora = [name for name in plain[1] if "mlp" in name and "lora_" in name]
    assert len(mlp_lora) == 2 * 3 * handle.counts["mlp"]  # gate, up and down: A and B each
    assert patched[0] == plain[0]
    assert patched[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(patched[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)
    handle.remove()
    calls = sum(kernels.values())
    assert loss_and_grads(model, batch)[0] == plain[0] and sum(kernels.values()) == calls


def test_no_class_or_modeling_function_of_transformers_changes(kernels, monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    rope, mlp_forward = modeling.apply_rotary_pos_emb, modeling.Qwen2MLP.forward
    model, processor, cmap = _targeted("qwen2_5_vl")
    _install(monkeypatch, install_liger_kernels, model, cmap)
    loss_and_grads(model, make_batch("qwen2_5_vl", processor))
    assert kernels["rope"] and modeling.apply_rotary_pos_emb is rope and modeling.Qwen2MLP.forward is mlp_forward
    later, processor = tiny_vlm("qwen2_5_vl")  # a model built in the same process afterwards
    calls = sum(kernels.values())
    later(**make_batch("qwen2_5_vl", processor))
    assert sum(kernels.values()) == calls and not _own_forwards(later)


def _step(folder, speed: dict, precision: str, device: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one checkpointed training step through build_model (bf16 autocast or fp32)."""
    bf16 = precision == "bf16"
    raw = {
        "model": {"name_or_path": str(folder), "dtype": "bfloat16" if bf16 else "float32"},
        "components": {"language": {"mode": "lora", "rank": 4}},
        "train": {"mixed_precision": "bf16" if bf16 else "no"},
        "speed": speed,
    }
    raw["model"]["gradient_checkpointing"] = True
    torch.manual_seed(0)  # the same LoRA A init in every build
    built = build_model(recipe_from_dict(raw))
    model = built.model.to(device)
    randomize_lora_b(model)
    model.train()
    batch = make_batch(folder.name, built.processor, batch_size=_batch_size(folder.name), model=model)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def test_the_recipe_switch_patches_the_built_model_and_keeps_its_checkpointed_step(kernels, monkeypatch, tmp_path):
    folder = tiny_vlm_folder("qwen2_5_vl", tmp_path)
    plain = _step(folder, {}, "float32", "cpu")
    patched = _install(monkeypatch, _step, folder, {"liger_kernel": True}, "float32", "cpu")
    assert kernels["rope"] == 2 * 2  # both attention layers, in the forward and in their recompute
    assert patched[0] == plain[0] and patched[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(patched[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)


def _refusal(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refused_on_the_cpu_without_liger_kernel_and_on_other_families(monkeypatch):
    model, _, cmap = _targeted("qwen2_5_vl")
    with pytest.raises(SpeedError) as error:
        install_liger_kernels(model, cmap)
    assert "set speed.liger_kernel: false on CPU" in _refusal(error)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # makes the import fail
    with pytest.raises(SpeedError) as error:
        _install(monkeypatch, install_liger_kernels, model, cmap)
    assert "needs liger-kernel (pip install liger-kernel)" in _refusal(error)
    monkeypatch.undo()
    blip, _ = tiny_vlm("blip2")
    with pytest.raises(SpeedError) as error:
        _install(monkeypatch, install_liger_kernels, blip, find_components(blip))
    assert "speed.liger_kernel is not checked on blip-2 models (valid: llava, llava_next, idefics3" in _refusal(error)


def test_refused_with_compiled_layers():
    raw = {"components": {"language": {"mode": "lora"}}, "speed": {"liger_kernel": True, "compile": "layers"}}
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    line = next(line for line in str(error.value).splitlines() if "speed.liger_kernel" in line)
    assert "does not combine with speed.compile: layers" in line
    assert "set speed.liger_kernel: false or speed.compile: none" in line


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3", "mllama", "idefics3"])
def test_on_cuda_liger_kernels_give_the_loss_and_lora_gradients_within_bf16_rounding(arch, tmp_path):
    """bf16 autocast on bf16 weights: the kernels round differently, so each side is compared with the fp32 step;
    the patched step must be no further from it than the plain bf16 step."""
    pytest.importorskip("liger_kernel")
    folder = tiny_vlm_folder(arch, tmp_path)
    reference = _step(folder, {}, "float32", "cuda")
    plain = _step(folder, {}, "bf16", "cuda")
    patched = _step(folder, {"liger_kernel": True}, "bf16", "cuda")
    assert patched[1].keys() == reference[1].keys() and reference[1]
    assert patched[0] == pytest.approx(plain[0], rel=2e-2)
    errors = {}
    for name, (_, grads) in (("plain", plain), ("liger", patched)):
        errors[name] = max(float((grads[k] - g).norm() / g.norm()) for k, g in reference[1].items())
    assert errors["liger"] <= 1.5 * errors["plain"] + 1e-3, errors
