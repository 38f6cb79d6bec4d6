"""speed.offload_activations: checkpointed layers' inputs wait in CPU memory, and the result does not change."""

import pytest
import torch
from test_model_speed import _assert_same, _mllama_tile_batch, _targeted
from vlm_batches import loss_and_grads, make_batch

from vlm_tune.model import offload
from vlm_tune.model.compile import _CHECKPOINTS_INSIDE_FORWARD
from vlm_tune.model.components import find_components
from vlm_tune.model.load import _enable_checkpointing
from vlm_tune.model.speed import apply_speed, checkpoint_layers
from vlm_tune.recipe import ComponentConfig, ModelConfig, RecipeError, SpeedConfig, recipe_from_dict

LORA = ComponentConfig(mode="lora", rank=4, alpha=8.0)
CASES = {  # arch -> components
    "qwen2_5_vl": {"language": LORA, "vision": LORA},
    "mllama": {"language": LORA, "cross_attention": LORA},
    "idefics3": {"language": LORA},
}


@pytest.fixture
def offload_every_input(monkeypatch):
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)  # tiny models' hidden states are far under 1 MiB


def _checkpointed(arch: str):
    model, processor = _targeted(arch, CASES[arch])
    _enable_checkpointing(model.get_base_model())
    batch = _mllama_tile_batch(processor) if arch == "mllama" else make_batch(arch, processor, batch_size=2)
    return model, batch


@pytest.mark.parametrize("arch", list(CASES))
def test_offloaded_inputs_give_the_same_loss_and_gradients(arch, offload_every_input):
    model, batch = _checkpointed(arch)
    on_device = loss_and_grads(model, batch)
    cmap = find_components(model.get_base_model())
    patches = apply_speed(model, SpeedConfig(offload_activations=True), ModelConfig(gradient_checkpointing=True), cmap)
    handle = patches.handles[-1]
    assert patches.offloaded == sum(patches.checkpointed.values()) > 0
    offloaded = loss_and_grads(model, batch)
    training = sum(patches.checkpointed.get(name, 0) for name in CASES[arch])  # frozen towers run without grad
    assert handle.packed >= training > 0  # each training layer's hidden states went out and came back
    _assert_same(on_device, offloaded)
    patches.remove()
    functions = [m.__dict__.get("_gradient_checkpointing_func") for m in model.modules()]
    assert not any(isinstance(function, offload.OffloadingCheckpoint) for function in functions)


def test_layers_that_do_not_checkpoint_keep_their_inputs(offload_every_input):
    model, batch = _checkpointed("qwen2_5_vl")
    cmap = find_components(model.get_base_model())
    checkpoint_layers(model, cmap, ["language"], every=2)  # one decoder layer of two, no vision block
    handle = offload.offload_checkpoint_inputs(model)
    assert len(handle.layers) == 1 and handle.layers[0] is model.get_base_model().model.language_model.layers[0]
    loss_and_grads(model, batch)
    assert handle.packed == 1  # that layer's hidden states, nothing else


def test_small_tensors_and_parameters_stay_where_they_are():
    weight = torch.nn.Parameter(torch.zeros(1024, 1024))
    assert offload._pack(weight) is weight
    small = torch.zeros(16)
    assert offload._pack(small) is small
    large = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB
    packed = offload._pack(large)
    assert isinstance(packed, offload._Offloaded) and packed.copy.data_ptr() != large.data_ptr()
    assert torch.equal(offload._unpack(packed), large)


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"components": {"language": {"mode": "lora"}}, "speed": {"offload_activations": True}})
    assert "speed.offload_activations: offloads the inputs of checkpointed layers" in str(error.value)
    assert "model.gradient_checkpointing: true" in str(error.value)


def test_compiled_layers_offload_their_inputs_and_keep_one_graph(offload_every_input):
    model, batch = _checkpointed("qwen2_5_vl")
    cmap = find_components(model.get_base_model())
    checkpointing = ModelConfig(gradient_checkpointing=True)
    eager_patches = apply_speed(model, SpeedConfig(), checkpointing, cmap)
    eager = loss_and_grads(model, batch)
    eager_patches.remove()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    speed = SpeedConfig(offload_activations=True, compile="layers", compile_components=["language"])
    patches = apply_speed(model, speed, checkpointing, cmap)
    offloaded = next(h for h in patches.handles if isinstance(h, offload.OffloadedInputs))
    compiled = loss_and_grads(model, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the offload hooks break no graph
    assert offloaded.packed >= 2  # both decoder layers' hidden states (vision blocks run eagerly, offloaded too)
    _assert_same(eager, compiled, rtol=1e-4)
    wrappers = [layer._gradient_checkpointing_func for layer in offloaded.layers]
    # transformers >= 5.23 checkpoints inside the compiled forward: the hooks of both decoder layers go around it
    # (vision: eager); earlier versions checkpoint around the compiled forward, with the hooks inside as usual
    assert sum(wrapper.hooked_outside for wrapper in wrappers) == (2 if _CHECKPOINTS_INSIDE_FORWARD else 0)
    patches.remove()
    assert not any(wrapper.hooked_outside for wrapper in wrappers)


def test_fsdp_refuses_offload_naming_the_field(monkeypatch):
    from vlm_tune.distributed import ShardingError, fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    raw = {
        "model": {"gradient_checkpointing": True},
        "components": {"language": {"mode": "lora"}},
        "speed": {"offload_activations": True},
    }
    with pytest.raises(ShardingError, match=r"speed.offload_activations is not checked under FSDP"):
        fsdp_plugin(recipe_from_dict(raw))


@pytest.mark.gpu
def test_on_cuda_the_inputs_go_to_pinned_memory_and_the_result_holds(offload_every_input, monkeypatch):
    model, batch = _checkpointed("qwen2_5_vl")
    model.cuda()
    batch = {key: value.cuda() if hasattr(value, "cuda") else value for key, value in batch.items()}
    on_device = loss_and_grads(model, batch)
    cmap = find_components(model.get_base_model())
    patches = apply_speed(model, SpeedConfig(offload_activations=True), ModelConfig(gradient_checkpointing=True), cmap)
    pinned = []
    original = offload._Offloaded.__init__

    def record(self, tensor):  # with the 0-byte threshold small CPU-resident saves go too (copied, not pinned)
        original(self, tensor)
        if tensor.is_cuda:
            pinned.append(self.copy.is_pinned() and self.copy.device.type == "cpu")

    monkeypatch.setattr(offload._Offloaded, "__init__", record)
    offloaded = loss_and_grads(model, batch)
    assert pinned and all(pinned)
    _assert_same(on_device, offloaded)
    patches.remove()
