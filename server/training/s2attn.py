"""LongLoRA's shifted sparse attention (S2-Attn), the variant without wrap-around.

The sequence is cut into groups of G tokens and attention is causal within each group. The
first half of the heads uses groups [0, G), [G, 2G), ...; the second half is shifted by G/2:
[0, G/2), [G/2, 3G/2), ..., [S - G/2, S). The reference implementation rolls the shifted
heads, so its last group mixes the final G/2 tokens with the first G/2 and early tokens see
the end of the sequence; here the first half-group attends only to itself. Training only:
inference uses full causal attention (the hook falls back to it in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.attention import causal_attention
from server.model.llama import LlamaForCausalLM


def shift(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Roll the second half of the heads G/2 tokens toward the start: x [B, H, S, D]."""
    half_heads = x.shape[1] // 2
    rolled = x[:, half_heads:].roll(-(group_size // 2), dims=2)
    return torch.cat([x[:, :half_heads], rolled], dim=1)


def unshift(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of shift: x [B, H, S, D]."""
    half_heads = x.shape[1] // 2
    rolled = x[:, half_heads:].roll(group_size // 2, dims=2)
    return torch.cat([x[:, :half_heads], rolled], dim=1)


def group_size_for(seq_len: int, num_groups: int) -> int:
    """G = S / num_groups; S must split into num_groups groups of an even size."""
    assert seq_len % (2 * num_groups) == 0, (
        f"S2-Attn needs the sequence length ({seq_len}) to be a multiple of {2 * num_groups}"
    )
    return seq_len // num_groups


def s2_mask(seq_len: int, num_heads: int, group_size: int, device: torch.device) -> torch.Tensor:
    """[H, S, S] bool, True = may attend: the semantics s2_attention implements."""
    pos = torch.arange(seq_len, device=device)
    plain = pos // group_size
    shifted = (pos + group_size // 2) // group_size  # half-groups at both ends
    causal = pos[:, None] >= pos[None, :]
    same_plain = (plain[:, None] == plain[None, :]) & causal
    same_shifted = (shifted[:, None] == shifted[None, :]) & causal
    half_heads = num_heads // 2
    return torch.stack([same_plain] * half_heads + [same_shifted] * (num_heads - half_heads))


def s2_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int
) -> torch.Tensor:
    """S2-Attn. q: [B, H, S, D]  k, v: [B, H_kv, S, D]  ->  [B, H, S, D].

    Semantics: softmax attention under s2_mask(S, H, group_size) (k/v heads repeated for GQA).
    """
    batch, num_heads, seq_len, head_dim = q.shape
    assert seq_len % group_size == 0 and group_size % 2 == 0, (seq_len, group_size)
    # LongLoRA repeats k/v before splitting heads, so shifted queries meet shifted keys.
    repeat = num_heads // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    num_groups, half = seq_len // group_size, group_size // 2
    q, k, v = (shift(t, group_size) for t in (q, k, v))
    # Each (head, group) pair becomes one "head" of a 4-D SDPA call: a view, and 4-D inputs let
    # CUDA pick its flash kernel.
    grouped = [t.reshape(batch, num_heads * num_groups, group_size, head_dim) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*grouped, is_causal=True)
    out = out.reshape(batch, num_heads, seq_len, head_dim)
    # After the roll, the shifted heads' last group is [end half-group, start half-group]; the
    # start half-group must not see the end, so it is recomputed on its own.
    h = num_heads // 2
    tail = slice(seq_len - half, seq_len)
    start = F.scaled_dot_product_attention(
        q[:, h:, tail], k[:, h:, tail], v[:, h:, tail], is_causal=True
    )
    shifted_out = torch.cat([out[:, h:, : seq_len - half], start], dim=2)
    return unshift(torch.cat([out[:, :h], shifted_out], dim=1), group_size)


class S2Attention(nn.Module):
    """The dense-attention hook for LongLoRA: S2-Attn while training, full attention in eval."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = num_groups

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [B, H, S, D]  k, v: [B, H_kv, S, D]
        if not self.training:
            return causal_attention(q, k, v)
        return s2_attention(q, k, v, group_size_for(q.shape[2], self.num_groups))


def enable_s2_attention(model: LlamaForCausalLM, num_groups: int) -> None:
    """Install S2-Attn as every layer's dense attention (a submodule, so it follows .eval())."""
    for attn in model.attention_layers():
        attn.dense_attention = S2Attention(num_groups)
