"""The model a run trains: the base (NF4 or float) plus LoRA, and S2-Attn for LongLoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.config import AdapterSpec
from server.model.llama import LlamaForCausalLM
from server.model.loader import load_model
from server.model.quant import is_nf4, quantize_nf4
from server.training.hparams import HParams
from server.training.lora import TrainableAdapter, apply_adapter
from server.training.s2attn import enable_s2_attention


def build_training_model(
    model_dir: Path, hp: HParams, spec: AdapterSpec, device: torch.device, dtype: torch.dtype
) -> tuple[LlamaForCausalLM, TrainableAdapter]:
    """Load the base, quantize it (hp.quantize), add the adapter; returned in train mode."""
    model = load_model(model_dir, dtype)
    if hp.quantize == "nf4":
        quantize_nf4(model, dtype, device)
        for module in model.modules():
            if is_nf4(module):
                # On AVX512-BF16 CPUs bitsandbytes repacks the 4-bit weights in place on the
                # first eval-mode forward, and its repacked kernel has no backward: training
                # after an evaluation would then stop gradients at every base linear.
                module.support_avx512bf16_for_cpu = False
    model.to(device)
    torch.manual_seed(hp.seed)  # the LoRA init follows the seed
    adapter = apply_adapter(model, spec, hp.lora_dropout)
    if hp.is_longlora and hp.s2_attn:
        enable_s2_attention(model, hp.s2_num_groups)
    model.model.gradient_checkpointing = hp.gradient_checkpointing
    return model.train(), adapter


def rope_scale_like(positions: torch.Tensor, factor: float) -> torch.Tensor | None:
    """The per-token RoPE factor tensor the model takes, or None for plain RoPE."""
    if factor == 1.0:
        return None
    return torch.full(positions.shape, factor, device=positions.device)


@torch.no_grad()
def greedy_generate(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    rope_scaling_factor: float = 1.0,
    eos_token_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """Greedy continuation by full recomputation (no KV cache): slow and simple, a reference."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=device)
        positions = torch.arange(len(ids), device=device)[None]
        hidden = model(x, positions, rope_scale_like(positions, rope_scaling_factor))
        token = int(model.compute_logits(hidden[:, -1]).argmax(-1))
        ids.append(token)
        if token in eos_token_ids:
            break
    return ids[len(prompt_ids) :]
