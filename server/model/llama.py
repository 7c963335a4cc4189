"""The Llama-family decoder (Llama, Mistral, Qwen2), as plain PyTorch.

q/k/v and gate/up are packed into one linear each, so a step runs one matmul where the
checkpoint has three (or two). Quantization and LoRA are module swaps applied to a built model;
nothing here knows about them. Serving passes flat token batches ([T] ids) with a
ForwardContext set; training passes [B, S] ids without one.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from server.model.attention import Attention
from server.model.config import PACKED_LINEARS, ModelConfig
from server.model.context import get_context
from server.model.layers import LlamaMLP, RMSNorm, RotaryEmbedding, apply_rope

# Packed module -> the checkpoint's modules it holds, in output order (those packing several).
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    packed: parts for packed, parts in PACKED_LINEARS.items() if len(parts) > 1
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.qkv_widths = cfg.packed_slices("qkv_proj").widths
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias)
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden]  cos, sin: [..., head_dim]
        qkv = self.qkv_proj(x)
        lead, q_k_width = x.shape[:-1], self.qkv_widths[0] + self.qkv_widths[1]
        # RoPE on q and k in one pass: [..., heads + kv_heads, head_dim]
        heads = self.num_heads + self.num_kv_heads
        q_k = apply_rope(qkv[..., :q_k_width].view(*lead, heads, self.head_dim), cos, sin)
        q, k = q_k.split((self.num_heads, self.num_kv_heads), dim=-2)
        v = qkv[..., q_k_width:].view(*lead, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rope_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] or [B, S]; rope_scale: same shape, per-token linear factor
        (training passes it; serving sets it in the ForwardContext)."""
        ctx = get_context()
        if rope_scale is None and ctx is not None:
            rope_scale = ctx.rope_scale
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, rope_scale, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rope_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm; call compute_logits on the rows you sample."""
        return self.model(input_ids, positions, rope_scale)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
