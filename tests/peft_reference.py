"""PEFT as the oracle: adapters saved by PEFT on a given base checkpoint, and their greedy
generations (test-only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.hf_reference import hf_greedy, load_hf


def save_peft_adapter(base_dir: Path, out: Path, seed: int = 0, rope_scaling_factor=None, **lora):  # type: ignore[no-untyped-def]
    """A PEFT LoRA adapter on `base_dir` with random non-zero weights, saved to `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(load_hf(base_dir), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # PEFT starts lora_B at zero, which would make every adapter equal the base.
            if "lora_B" in name:
                param.normal_(std=0.3)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(str(out))
    if rope_scaling_factor is not None:
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["rope_scaling_factor"] = rope_scaling_factor
        config_path.write_text(json.dumps(config))
    return out


def load_peft(base_dir: Path, adapter_dir: Path):  # type: ignore[no-untyped-def]
    """The base with this one adapter, as PEFT runs it (float32, eval mode)."""
    from peft import PeftModel

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = load_hf(base_dir)
    factor = config.get("rope_scaling_factor")
    if factor:
        base = _with_linear_rope(base_dir, factor)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def peft_greedy(base_dir: Path, adapter_dir: Path, prompt: list[int], max_new_tokens: int):  # type: ignore[no-untyped-def]
    """Greedy tokens of the base with this one adapter, as PEFT computes them."""
    return hf_greedy(load_peft(base_dir, adapter_dir), prompt, max_new_tokens)


def _with_linear_rope(base_dir: Path, factor: float) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    return AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32).eval()
