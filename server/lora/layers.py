"""Module swaps that make the plain model adapter-aware for serving.

Each wrapper segments the base module, then applies whatever the step's LoRABatch says about the
tokens' adapters. Without a LoRABatch in the forward context (no adapter in the step, or
training) they cost one context lookup.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from server.lora.batch import Linear, LoRABatch
from server.lora.layout import LORA_MODULES
from server.model.config import ModelConfig, PackedSlices
from server.model.context import get_context
from server.model.layers import RMSNorm
from server.model.llama import LlamaForCausalLM


def _lora_batch() -> LoRABatch | None:
    ctx = get_context()
    # The model runner puts the step's LoRABatch there; the model layer keeps it opaque.
    return cast("LoRABatch | None", ctx.lora) if ctx is not None else None


class LoRALinear(nn.Module):
    """A packed linear (q/k/v, o, gate/up or down) plus the batched LoRA of its slices."""

    def __init__(self, base: nn.Module, layer: int, module: int, slices: PackedSlices) -> None:
        super().__init__()
        self.base = base
        self.linear = Linear(layer, module, slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora = _lora_batch()
        if lora is not None:
            lora.add_lora(x, out, self.linear)
        return out


class AdapterRMSNorm(nn.Module):
    """RMSNorm whose weight an adapter may replace (LongLoRA trains norms)."""

    def __init__(self, base: RMSNorm, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = _lora_batch()
        segments = lora.norm_segments(self.name) if lora is not None else []
        if not segments:
            return self.base(x)
        normed = self.base.normalize(x)  # x: [T, hidden]
        out = self.base.weight * normed
        for start, length, weight in segments:
            out[start : start + length] = weight * normed[start : start + length]
        return out


class AdapterEmbedding(nn.Module):
    """Token embedding whose table an adapter may replace (LongLoRA trains embeddings)."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)  # ids: [T] -> [T, hidden]
        lora = _lora_batch()
        if lora is None:
            return out
        hidden = out.shape[-1]
        cols = torch.arange(hidden, device=ids.device)
        for seg in lora.embed_segments():
            w = seg.weights
            chunks = w.embed_chunk_offsets  # [chunks] on the device since the adapter loaded
            assert chunks is not None
            tok = ids[seg.start : seg.end]
            rows = chunks[tok // w.embed_rows_per_chunk] + (tok % w.embed_rows_per_chunk) * hidden
            out[seg.start : seg.end] = lora.pool[rows[:, None] + cols[None, :]]
        return out


def enable_lora(model: LlamaForCausalLM) -> None:
    """Swap in the adapter-aware wrappers, in place."""
    cfg: ModelConfig = model.config
    inner = model.model
    for i, layer in enumerate(inner.layers):
        for m, (name, _) in enumerate(LORA_MODULES):
            parent = layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp
            setattr(parent, name, LoRALinear(getattr(parent, name), i, m, cfg.packed_slices(name)))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            wrapped = AdapterRMSNorm(getattr(layer, norm), f"model.layers.{i}.{norm}")
            setattr(layer, norm, wrapped)
    inner.norm = AdapterRMSNorm(inner.norm, "model.norm")
    inner.embed_tokens = AdapterEmbedding(inner.embed_tokens)
