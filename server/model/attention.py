"""Attention over the paged KV cache (serving) or over the whole sequence (training)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.model.context import AttentionMetadata, get_context

# (q, k, v) as [B, heads, S, head_dim] -> [B, heads, S, head_dim]; LongLoRA swaps in S2-Attn.
DenseAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (q, k, v, k_cache, v_cache, metadata, sliding_window) -> [T, heads * head_dim]: the serving
# path's kernel (server.kernels.paged_attention.paged_attention_layer) when one is bound.
PagedKernelFn = Callable[..., torch.Tensor]
# (q [B, heads, dim], k_cache, v_cache, block_tables, ctx_lens, sliding_window) -> [B, heads,
# dim]: one query per sequence, K/V read in place (server.kernels.cpu_kernels on a CPU).
DecodeKernelFn = Callable[..., torch.Tensor]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] bool: causal, and each query sees only the last `window` keys."""
    pos = torch.arange(seq_len, device=device)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist < window)


class Attention(nn.Module):
    """Scaled dot-product attention for one layer; owns views of that layer's KV cache."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        # Set by the model runner once the page pool exists: [num_pages, block, kv_heads, dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.dense_attention: DenseAttentionFn = causal_attention
        self.paged_kernel: PagedKernelFn | None = None  # set by the model runner
        # Set by the torch backend where it runs: the decode groups' attention.
        self.decode_kernel: DecodeKernelFn | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [..., heads, dim]  k, v: [..., kv_heads, dim]  ->  [..., heads * dim]."""
        ctx = get_context()
        if ctx is not None and ctx.attn is not None:
            if self.paged_kernel is not None:
                kv = (self.k_cache, self.v_cache)
                return self.paged_kernel(q, k, v, *kv, ctx.attn, self.sliding_window)
            return self._paged(q, k, v, ctx.attn)
        return self._dense(q, k, v)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [B, S, heads, dim]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        seq_len = q.shape[2]
        if self.sliding_window is not None and seq_len > self.sliding_window:
            mask = sliding_window_mask(seq_len, self.sliding_window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            out = self.dense_attention(q, k, v)
        return out.transpose(1, 2).flatten(-2)

    @staticmethod
    def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        # cache: [pages, block, kv_heads, dim] -> whole blocks per sequence, one copy each.
        # index_select copies whole pages: on the CPU 3x faster than advanced indexing.
        num_seqs = block_tables.shape[0]
        blocks = cache.index_select(0, block_tables.flatten())  # [B * max_blocks, block, ...]
        return blocks.view(num_seqs, -1, *cache.shape[2:]).transpose(1, 2)

    def _paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [T, heads, dim]  k, v: [T, kv_heads, dim]
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        self.k_cache[meta.slot_pages, meta.slot_offsets] = k
        self.v_cache[meta.slot_pages, meta.slot_offsets] = v
        out = torch.empty_like(q)
        for g in meta.groups:
            if self.decode_kernel is not None and g.q_index.shape[1] == 1:
                rows = g.out_index  # one query per sequence, none padded
                out[rows] = self.decode_kernel(
                    q[rows],
                    self.k_cache,
                    self.v_cache,
                    g.block_tables,
                    g.ctx_lens,
                    self.sliding_window,
                )
                continue
            qg = q[g.q_index].transpose(1, 2)  # [B, heads, max_q, dim]
            kg = self._gather(self.k_cache, g.block_tables)  # [B, kv_heads, max_ctx, dim]
            vg = self._gather(self.v_cache, g.block_tables)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
            out[g.out_index] = og.transpose(1, 2).flatten(0, 1)[g.valid_rows]
        return out.flatten(-2)
