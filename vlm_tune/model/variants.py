"""Which PEFT adapter a component policy becomes, and what is done to its layers right after PEFT wraps them.

One adapter covers every LoRA component: a `LoraConfig` (lora / dora / rslora, per-component rank and alpha
patterns) or an `AdaLoraConfig` (adalora: the components' own ranks and budgets, see adalora.py). After
wrapping, components with `init: pissa | olora | loftq` get their start (inits.py); their initial A, B are
kept on the model, so a saved adapter can be turned into one for the original base (adapter_files.py).
"""

from __future__ import annotations

from torch import nn

from vlm_tune.model.adalora import PLACEHOLDER_STEPS, attach_rank_allocation
from vlm_tune.model.components import ComponentMap
from vlm_tune.model.inits import SixteenBitWeights, loftq_init, principal_init
from vlm_tune.recipe import ComponentConfig

ADAPTER = "default"
INITIAL_STATE = "vlm_tune_initial_lora"  # PeftModel attribute: {"inits", "pattern_keys", "layers": {name: (A0, B0)}}


def adapter_config(cmap: ComponentMap, policy: dict, wrapped: dict[str, list[str]], full_plan: dict):
    """One PEFT config for every LoRA component (and the `full` ones that PEFT saves as modules_to_save).

    Args:
        cmap: the model's components. policy: component -> ComponentConfig.
        wrapped: component -> the Linear leaves LoRA wraps. full_plan: component -> modules_to_save names or None.
    """
    from peft import AdaLoraConfig, LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    from vlm_tune.model.targeting import component_regex

    lora = [policy[c] for c in wrapped] or [ComponentConfig()]
    common = dict(
        lora_alpha=lora[0].alpha,
        lora_dropout=lora[0].dropout,
        bias="none",
        # no LoRA component: PEFT's own "no target" marker keeps a standard PeftModel for modules_to_save
        target_modules=[leaf for c in wrapped for leaf in wrapped[c]] or DUMMY_TARGET_MODULES,
        modules_to_save=[m for plan in full_plan.values() if plan for m in plan] or None,
    )
    if lora[0].variant == "adalora":  # ranks per component are set after wrapping (AdaLoRA has one init_r)
        return AdaLoraConfig(
            init_r=lora[0].rank, target_r=lora[0].adalora_target_rank, total_step=PLACEHOLDER_STEPS, **common
        )
    return LoraConfig(
        r=lora[0].rank,
        rank_pattern={component_regex(cmap, c): policy[c].rank for c in wrapped},
        alpha_pattern={component_regex(cmap, c): policy[c].alpha for c in wrapped},
        use_dora=lora[0].variant == "dora",
        use_rslora=lora[0].variant == "rslora",
        **common,
    )


def component_layers(peft_model: nn.Module, cmap: ComponentMap, wrapped: dict) -> dict[str, dict[str, nn.Module]]:
    """Component -> {base-model module name: its PEFT LoRA layer}, in model order."""
    from peft.tuners.lora import LoraLayer

    from vlm_tune.model.targeting import base_name

    layers: dict[str, dict[str, nn.Module]] = {component: {} for component in wrapped}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.r:
            name = base_name(name)
            component = cmap.component_of(name)
            if component in layers:
                layers[component][name] = module
    return layers


def prepare_layers(peft_model: nn.Module, cmap: ComponentMap, policy: dict, wrapped: dict) -> None:
    """AdaLoRA ranks and allocator, or the PiSSA / OLoRA / LoftQ starts, per component.

    Raises:
        InitError: loftq finds no 16-bit weight for a layer in the base model's safetensors.
    """
    layers = component_layers(peft_model, cmap, wrapped)
    if any(policy[c].variant == "adalora" for c in wrapped):
        attach_rank_allocation(peft_model, layers, policy)
        return
    from vlm_tune.model.targeting import component_regex

    initial, inits, sixteen_bit = {}, {}, None
    for component, component_layers_ in layers.items():
        init = policy[component].init
        if init == "default":
            continue
        inits[component] = init
        for name, layer in component_layers_.items():
            four_bit = getattr(layer.get_base_layer().weight, "quant_state", None) is not None
            if init == "loftq" and four_bit:  # a 16-bit layer of the component has no error to recover
                if sixteen_bit is None:
                    sixteen_bit = SixteenBitWeights(peft_model.get_base_model().name_or_path)
                loftq_init(layer, sixteen_bit.weight_of(name, layer))
            elif init != "loftq":
                principal_init(layer, init)
            initial[name] = tuple(
                getattr(layer, kind)[ADAPTER].weight.detach().float().cpu().clone() for kind in ("lora_A", "lora_B")
            )
    if inits:
        pattern_keys = [component_regex(cmap, component) for component in inits]
        setattr(peft_model, INITIAL_STATE, {"inits": inits, "pattern_keys": pattern_keys, "layers": initial})
