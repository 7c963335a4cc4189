"""Triton paged attention: queries of decodes and (chunked) prefills attend straight to the pool.

K and V stay in the page pool ([num_pages, block_size, kv_heads, head_dim] views per layer);
the kernels (server.kernels.paged_attention_kernels) follow each sequence's block table key by
key, so there is no gathered copy of the history and no dense mask. One launch covers a mixed
batch: every sequence brings q_len new queries (1 for a decode) at the end of its ctx_len keys,
causal within the chunk, over the cached prefix, optionally limited to a sliding window.

A decode step whose sequences x KV heads would leave most SMs idle also splits each sequence's
keys into partitions (flash decoding): one more launch combines them. The choice depends only
on shapes the host knows (batch, heads, block-table width), so a CUDA graph replays it.

Block sizes are untuned: no GPU was available when these kernels were written.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton

from server.kernels import paged_attention_kernels as kernels
from server.model.context import AttentionMetadata, SeqLayout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535
# Split a decode's keys while sequences x KV heads is below the SM count, into about enough
# partitions for 2 programs per SM (untuned); an interpreter run assumes an H100's 132 SMs.
_DEFAULT_SMS = 132


def _check_cache(cache: torch.Tensor, name: str) -> None:
    assert cache.dim() == 4, f"{name} must be [num_pages, block_size, kv_heads, head_dim]"
    _, _, kv_heads, head_dim = cache.shape
    assert cache.stride(3) == 1 and cache.stride(2) == head_dim, f"{name}: rows not contiguous"
    assert cache.stride(1) == kv_heads * head_dim, f"{name}: block tokens not contiguous"


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pages: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """k, v: [T, kv_heads, head_dim] written into the caches at (slot_pages, slot_offsets).

    Semantics: k_cache[slot_pages, slot_offsets] = k; v_cache[slot_pages, slot_offsets] = v.
    """
    _check_cache(k_cache, "k_cache")
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    num_tokens, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.shape[1:] == k_cache.shape[2:], "k/v do not fit the cache"
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "k, v rows must be contiguous"
        assert t.dtype == k_cache.dtype and t.device == k_cache.device
    for t in (slot_pages, slot_offsets):
        assert t.shape == (num_tokens,) and t.dtype == torch.int64 and t.is_contiguous()
        assert t.device == k_cache.device
    if num_tokens == 0:
        return
    width = kv_heads * head_dim
    kernels.store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_pages,
        slot_offsets,
        k.stride(0),
        v.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
    )


def _check_layout(seqs: SeqLayout, device: torch.device) -> None:
    num_seqs = seqs.q_lens.shape[0]
    for name in ("q_starts", "q_lens", "ctx_lens"):
        t = getattr(seqs, name)
        assert t.shape == (num_seqs,) and t.dtype == torch.int32, f"seqs.{name}: [B] int32"
        assert t.is_contiguous() and t.device == device, f"seqs.{name}: contiguous, on {device}"
    tables = seqs.block_tables
    assert tables.dim() == 2 and tables.shape[0] == num_seqs and tables.dtype == torch.int32
    assert tables.stride(1) == 1 and tables.device == device, "block_tables: rows contiguous"
    assert num_seqs <= 2**31 - 1 and seqs.max_q_len >= 1


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def decode_partitions(
    num_seqs: int, kv_heads: int, max_keys: int, block_n: int, num_sms: int
) -> tuple[int, int]:
    """(partitions, keys per partition) for a decode step: 1 partition unless sequences x KV
    heads leave SMs idle; then about 2 programs per SM, each partition whole key tiles."""
    programs = num_seqs * kv_heads
    if programs >= num_sms:
        return 1, max_keys
    parts = min(triton.cdiv(max_keys, block_n), triton.cdiv(2 * num_sms, programs))
    keys = triton.cdiv(triton.cdiv(max_keys, max(parts, 1)), block_n) * block_n
    return triton.cdiv(max_keys, keys), keys


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: SeqLayout,
    sliding_window: int | None = None,
    num_parts: int | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim] -> out: [T, heads, head_dim], keys and values from the pool.

    Semantics: paged_attention_ref (softmax scale 1/sqrt(head_dim), causal, GQA by head
    groups). The new tokens' K/V must already be in the cache (store_kv). num_parts: key
    partitions of a decode-only step (split-KV); None chooses from the shapes, 1 never splits.
    """
    assert q.dim() == 3 and q.stride(2) == 1, "q must be [T, heads, head_dim], dim contiguous"
    assert q.dtype in _FLOAT_DTYPES and q.dtype == k_cache.dtype == v_cache.dtype
    _check_cache(k_cache, "k_cache")
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert q.device == k_cache.device == v_cache.device
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and num_heads % kv_heads == 0, "heads do not match"
    assert sliding_window is None or sliding_window >= 1
    _check_layout(seqs, q.device)
    out = torch.empty_like(q)
    num_seqs = seqs.q_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out

    per_kv = num_heads // kv_heads
    group = triton.next_power_of_2(per_kv)
    decode = seqs.max_q_len == 1
    # A decode-only step needs one query per tile; tl.dot wants at least 16 rows.
    block_m = max(16 if decode else 64, group)
    block_n = 64 if head_dim <= 64 else 32  # two K/V tiles stay in registers (prefetch)
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_keys = seqs.block_tables.shape[1] * block_size
    if num_parts is None:
        num_parts = 1
        if decode:
            sms = _num_sms(q.device)
            num_parts = decode_partitions(num_seqs, kv_heads, max_keys, block_n, sms)[0]
    assert num_parts == 1 or decode, "only a decode-only step splits its keys"
    keys_per_part = triton.cdiv(triton.cdiv(max_keys, num_parts), block_n) * block_n
    num_parts = triton.cdiv(max_keys, keys_per_part)
    split = num_parts > 1
    if split:
        slabs = (num_seqs, kv_heads, num_parts)
        part_acc = torch.empty(*slabs, group, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(*slabs, 2, group, dtype=torch.float32, device=q.device)
        axis1 = num_parts
    else:
        part_acc = part_ml = out  # not read
        axis1 = triton.cdiv(seqs.max_q_len, block_m // group)
    assert axis1 <= _MAX_GRID_YZ and kv_heads <= _MAX_GRID_YZ
    kernels.paged_attention_kernel[(num_seqs, axis1, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_ml,
        seqs.block_tables,
        seqs.q_starts,
        seqs.q_lens,
        seqs.ctx_lens,
        math.log2(math.e) / math.sqrt(head_dim),
        sliding_window or 0,
        num_parts,
        keys_per_part,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        seqs.block_tables.stride(0),
        BLOCK_SIZE=block_size,
        QUERIES_PER_KV=per_kv,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SLIDING=sliding_window is not None,
        SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # A prefill tile's accumulator and two K/V tiles need 8 warps' registers at dim 128.
        num_warps=8 if not decode and head_dim > 64 else 4,
    )
    if split:
        kernels.reduce_parts_kernel[(num_seqs, kv_heads)](
            part_acc,
            part_ml,
            out,
            seqs.q_starts,
            seqs.q_lens,
            num_parts,
            out.stride(0),
            out.stride(1),
            QUERIES_PER_KV=per_kv,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
        )
    return out


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: SeqLayout,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """What paged_attention computes, in plain torch, one sequence at a time (tests)."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for b in range(seqs.q_lens.shape[0]):
        start, q_len, ctx = (int(t[b]) for t in (seqs.q_starts, seqs.q_lens, seqs.ctx_lens))
        slots = torch.arange(ctx, device=q.device)
        pages = seqs.block_tables[b].long()[slots // block_size]
        k = k_cache[pages, slots % block_size].transpose(0, 1)  # [kv_heads, ctx, dim]
        v = v_cache[pages, slots % block_size].transpose(0, 1)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = slots[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= slots[None, :] > q_pos[:, None] - sliding_window
        qb = q[start : start + q_len].transpose(0, 1)  # [heads, q_len, dim]
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, enable_gqa=True)
        out[start : start + q_len] = ob.transpose(0, 1)
    return out


def paged_attention_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sliding_window: int | None,
) -> torch.Tensor:
    """One layer's serving attention on the kernel path: write the step's K/V, then attend.

    q: [T, heads, dim]  k, v: [T, kv_heads, dim]  ->  [T, heads * dim], as Attention._paged.
    """
    assert meta.seqs is not None, "the kernel path needs the step's SeqLayout"
    store_kv(k, v, k_cache, v_cache, meta.slot_pages, meta.slot_offsets)
    return paged_attention(q, k_cache, v_cache, meta.seqs, sliding_window).flatten(-2)
