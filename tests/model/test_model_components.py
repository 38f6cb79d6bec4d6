"""find_components: family tables, structural detection, recipe `modules:` overrides, LoRA leaf choice."""

import pytest
import torch
import transformers as tf
from tiny import tiny_model

from vlm_tune.model.components import ComponentError, find_components, linear_kind
from vlm_tune.recipe import ComponentConfig

# What each family's parts are, written out by hand from the transformers module trees.
EXPECTED = {
    "llava": {
        "vision": ["model.vision_tower"],
        "projector": ["model.multi_modal_projector"],
        "language": ["model.language_model", "lm_head"],
    },
    "idefics3": {
        "vision": ["model.vision_model"],
        "projector": ["model.connector"],
        "language": ["model.text_model", "lm_head"],
    },
    "qwen2_5_vl": {
        "vision": ["model.visual.patch_embed", "model.visual.rotary_pos_emb", "model.visual.blocks"],
        "projector": ["model.visual.merger"],
        "language": ["model.language_model", "lm_head"],
    },
    "paligemma": {
        "vision": ["model.vision_tower"],
        "projector": ["model.multi_modal_projector"],
        "language": ["model.language_model", "lm_head"],
    },
    "blip2": {
        "vision": ["vision_model"],
        "projector": ["qformer", "language_projection"],
        "language": ["language_model"],
    },
}
ARCHS = ["llava", "idefics3", "qwen2_5_vl", "mllama", "paligemma", "blip2", "gemma3", "qwen2_vl", "llava_next"]


def _meta_model(model_type: str, **config_kwargs) -> torch.nn.Module:
    """A full-size default model of `model_type` on the meta device (no memory, builds in ~0.1 s)."""
    config = tf.CONFIG_MAPPING[model_type](**config_kwargs)
    with torch.device("meta"):
        return tf.AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_family_table_gives_the_known_parts(arch):
    cmap = find_components(tiny_model(arch))
    for comp, names in EXPECTED[arch].items():
        assert cmap.modules[comp] == names, comp
        assert cmap.detected[comp] is False
    assert cmap.modules["cross_attention"] == []


def test_qwen_merger_is_projector_not_vision():
    cmap = find_components(tiny_model("qwen2_5_vl"))
    assert cmap.component_of("model.visual.merger.mlp.0.weight") == "projector"
    assert cmap.component_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert cmap.component_of("model.visual.patch_embed.proj.weight") == "vision"
    assert all(cmap.component_of(n) == "projector" for n in cmap.lora_candidates("projector", ["attention", "mlp"]))
    assert not any("merger" in n for n in cmap.lora_candidates("vision", ["attention", "mlp"]))


def test_mllama_cross_attention_blocks_and_gates():
    model = tiny_model("mllama")
    cross_layers = model.config.text_config.cross_attention_layers
    cmap = find_components(model)
    assert cmap.modules["cross_attention"] == [f"model.language_model.layers.{i}.cross_attn" for i in cross_layers]
    assert cmap.modules["projector"] == ["model.multi_modal_projector"]
    layer = f"model.language_model.layers.{cross_layers[0]}"
    assert cmap.component_of(f"{layer}.cross_attn_attn_gate") == "cross_attention"
    assert cmap.component_of(f"{layer}.cross_attn.q_proj.weight") == "cross_attention"
    assert cmap.component_of(f"{layer}.mlp.up_proj.weight") == "language"
    assert cmap.component_of("model.language_model.layers.0.self_attn.q_proj.weight") == "language"
    # the language list must not contain (or be contained in) a cross-attention block
    for name in cmap.modules["language"]:
        assert not any(c.startswith(name + ".") or name.startswith(c) for c in cmap.modules["cross_attention"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_has_exactly_one_component(arch):
    model = tiny_model(arch)
    cmap = find_components(model)
    owners = {name: cmap.component_of(name) for name, _ in model.named_parameters()}
    assert None not in owners.values(), [n for n, c in owners.items() if c is None]
    flat = [m for names in cmap.modules.values() for m in names]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_detection_agrees_with_the_table(arch):
    model = tiny_model(arch)
    table = find_components(model)
    model.config.model_type = f"unlisted_{arch}"  # forces detection
    found = find_components(model)
    assert found.modules == table.modules
    assert found.params == table.params
    assert found.detected["vision"] and found.detected["language"] and found.detected["projector"]


@pytest.mark.parametrize(
    "model_type,vision,projector",
    [
        ("mistral3", "model.vision_tower", "model.multi_modal_projector"),
        ("internvl", "model.vision_tower", "model.multi_modal_projector"),
        ("kosmos-2", "vision_model", "image_to_text_projection"),
    ],
)
def test_unlisted_architectures_are_detected(model_type, vision, projector):
    cmap = find_components(_meta_model(model_type))
    assert cmap.modules["vision"] == [vision] and cmap.modules["projector"] == [projector]
    assert cmap.detected == {"vision": True, "projector": True, "cross_attention": False, "language": True}
    assert cmap.lora_candidates("language", ["attention"])


def test_text_only_model_fails_with_how_to_name_components():
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(ComponentError, match=r"cannot find the vision component.*components\.vision\.modules"):
        find_components(tf.LlamaForCausalLM(config))


def test_recipe_modules_define_and_override_components():
    model = tiny_model("llava")
    policy = {"projector": ComponentConfig(mode="lora", modules=[r"model\.multi_modal_projector\.linear_1"])}
    cmap = find_components(model, policy)
    assert cmap.modules["projector"] == ["model.multi_modal_projector.linear_1"]
    assert cmap.detected["projector"] is False
    assert cmap.component_of("model.multi_modal_projector.linear_2.weight") is None


def test_recipe_modules_regex_matching_nothing_is_an_error():
    policy = {"vision": ComponentConfig(modules=[r"model\.vision_tower", r"model\.no_such_tower"])}
    with pytest.raises(ComponentError) as error:
        find_components(tiny_model("llava"), policy)
    message = str(error.value)
    assert "components.vision.modules" in message and "no_such_tower" in message
    assert "model.vision_tower" in message  # lists real names to pick from


def test_recipe_modules_two_components_cannot_claim_one_module():
    policy = {
        "vision": ComponentConfig(modules=["model.vision_tower"]),
        "projector": ComponentConfig(modules=["model.vision_tower"]),
    }
    with pytest.raises(ComponentError, match="claimed by both"):
        find_components(tiny_model("llava"), policy)


def test_lora_candidates_skip_lm_head_unless_named():
    cmap = find_components(tiny_model("llava"))
    assert "lm_head" not in cmap.lora_candidates("language", ["attention", "mlp"])
    assert cmap.lora_candidates("language", ["lm_head"]) == ["lm_head"]
    assert cmap.lora_candidates("language", [r"layers\.0\.self_attn\.q_proj"]) == [
        "model.language_model.layers.0.self_attn.q_proj"
    ]


def test_lora_candidates_by_kind():
    cmap = find_components(tiny_model("idefics3"))
    attention = cmap.lora_candidates("language", ["attention"])
    mlp = cmap.lora_candidates("language", ["mlp"])
    assert attention and mlp and not set(attention) & set(mlp)
    assert {n.rsplit(".", 1)[-1] for n in attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {n.rsplit(".", 1)[-1] for n in mlp} == {"gate_proj", "up_proj", "down_proj"}
    assert linear_kind("qformer.encoder.layer.0.crossattention.output.dense") == "attention"
    assert linear_kind("qformer.encoder.layer.0.output_query.dense") == "mlp"


def test_unused_llava_vision_layers_are_not_lora_targets():
    model = tiny_model("llava")
    layers = len(model.model.vision_tower.encoder.layers)
    model.config.vision_feature_layer = -2  # hidden_states[-2]: the last encoder layer's output is never read
    cmap = find_components(model)
    vision = cmap.lora_candidates("vision", ["attention", "mlp"])
    assert vision and not any(f"encoder.layers.{layers - 1}." in n for n in vision)
    model.config.vision_feature_layer = [-2, 0]  # multi-layer features (VipLlava style): the deepest one counts
    multi = find_components(model).lora_candidates("vision", ["attention", "mlp"])
    assert multi == vision
    model.config.vision_feature_layer = -1
    assert any(
        f"encoder.layers.{layers - 1}." in n
        for n in find_components(model).lora_candidates("vision", ["attention", "mlp"])
    )


def test_siglip_pooling_head_is_not_a_lora_target():
    model = _meta_model("paligemma", vision_config={"vision_use_head": True})
    cmap = find_components(model)
    assert any(".head." in n for n in cmap.linear_leaves)
    assert not any(".head." in n for n in cmap.lora_candidates("vision", ["attention", "mlp"]))


def test_mha_out_proj_and_conv_patch_embeddings_are_never_candidates():
    cmap = find_components(_meta_model("paligemma", vision_config={"vision_use_head": True}))
    assert not any(n.endswith("head.attention.out_proj") for n in cmap.linear_leaves)  # used via its weight only
    assert not any("patch_embedding" in n for n in cmap.linear_leaves)
