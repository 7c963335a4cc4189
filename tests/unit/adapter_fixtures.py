"""Test helpers for adapters: a tiny Llama base, adapters saved by PEFT itself, and small
hand-built adapters for store and registry tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from adapters.base import BaseModelInfo, linear_name
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterWeights, lora_config_dict
from tests.tiny_models import hf_config

MAX_RANK = 16
_LORA_MODULE_NAME = re.compile(r".*model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def tiny_base(**overrides: Any) -> BaseModelInfo:
    """The tiny Llama of tests.tiny_models (vocab 320, hidden 64, 2 layers, 4 heads, 2 kv)."""
    return BaseModelInfo.from_hf_config(hf_config("llama", **overrides).to_dict())


def make_peft_adapter(path: Path, seed: int = 0, base_overrides: dict | None = None, **lora: Any):
    """Save a PEFT LoRA adapter for the tiny Llama with random (non-zero) weights.

    Returns the PeftModel, whose state and `scaling` values are the reference.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config("llama", **(base_overrides or {})))
    lora.setdefault("task_type", "CAUSAL_LM")
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # PEFT initializes lora_B to zero, which would hide any B/A mix-up.
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_()
    peft_model.save_pretrained(str(path))
    return peft_model


def peft_lora_layers(peft_model: Any) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, module) -> (rank, scaling) PEFT applies, read from its LoRA layers."""
    result = {}
    for name, module in peft_model.named_modules():
        match = _LORA_MODULE_NAME.match(name)
        if match and isinstance(getattr(module, "scaling", None), dict):
            key = int(match.group(1)), match.group(2)
            result[key] = (module.r["default"], module.scaling["default"])
    return result


def saved_state(path: Path) -> dict[str, torch.Tensor]:
    """The safetensors state PEFT wrote."""
    return load_file(str(path / WEIGHTS_FILE))


def edit_config(path: Path, **changes: Any) -> None:
    """Rewrite keys of a saved adapter_config.json."""
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def tiny_weights(
    rank: int = 2,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    base: BaseModelInfo | None = None,
) -> AdapterWeights:
    """Random LoRA weights for every layer of the tiny base."""
    base = base or tiny_base()
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in range(base.num_layers):
        for module in modules:
            in_f, out_f = base.linear_shapes[module]
            a = torch.randn(rank, in_f, generator=gen)  # [r, in]
            b = torch.randn(out_f, rank, generator=gen)  # [out, r]
            lora[layer, module] = (a, b)
    return AdapterWeights(lora=lora)


def tiny_config(rank: int = 2, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> dict:
    return lora_config_dict(rank, 2.0 * rank, modules)


def tiny_files(
    rank: int = 2, modules: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0
) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors bytes of a small valid adapter."""
    weights = tiny_weights(rank, modules, seed)
    tensors = {}
    for (layer, module), (a, b) in weights.lora.items():
        tensors[f"base_model.model.{linear_name(layer, module)}.lora_A.weight"] = a
        tensors[f"base_model.model.{linear_name(layer, module)}.lora_B.weight"] = b
    return {
        CONFIG_FILE: json.dumps(tiny_config(rank, modules)).encode(),
        WEIGHTS_FILE: save(tensors),
    }
