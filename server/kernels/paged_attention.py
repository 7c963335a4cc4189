"""Triton paged attention: queries of decodes and (chunked) prefills attend straight to the pool.

K and V stay in the page pool ([num_pages, block_size, kv_heads, head_dim] views per layer);
each program follows its sequence's block table key by key, so there is no gathered copy of the
history and no dense mask. One launch covers a mixed batch: every sequence brings q_len new
queries (1 for a decode) at the end of its ctx_len keys, causal within the chunk, over the
cached prefix, optionally limited to a sliding window. A program holds a tile of one sequence's
queries for all query heads of one KV head (grouped-query attention without repeating K/V) and
runs an online softmax over key tiles.

Keys outside [0, ctx_len) are never loaded (masked loads give 0), and keys a query may not see
get weight exactly 0 rather than exp(-inf) times whatever the slot holds: a stale NaN in a
reused page cannot reach the output (0 * NaN is NaN).

Block sizes are untuned: no GPU was available when these kernels were written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from server.model.context import AttentionMetadata, SeqLayout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535


@triton.jit
def _store_kv_kernel(
    k_ptr,  # k: [T, kv_heads, head_dim]
    v_ptr,  # v: [T, kv_heads, head_dim]
    k_cache_ptr,  # [num_pages, block_size, kv_heads, head_dim]
    v_cache_ptr,
    slot_pages_ptr,  # [T] int64
    slot_offsets_ptr,  # [T] int64
    stride_kt,
    stride_vt,
    stride_cp,
    stride_cb,
    WIDTH: tl.constexpr,  # kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    """Semantics: k_cache[slot_pages[t], slot_offsets[t]] = k[t]; the same for v. Grid: (T,)."""
    t = tl.program_id(0).to(tl.int64)
    page = tl.load(slot_pages_ptr + t)
    offset = tl.load(slot_offsets_ptr + t)
    cols = tl.arange(0, BLOCK)
    mask = cols < WIDTH
    dst = page * stride_cp + offset * stride_cb
    if WIDTH % 16 == 0:  # a token's K/V rows start at multiples of kv_heads * head_dim
        dst = tl.multiple_of(dst, 16)
    dst += cols
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + cols, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + cols, mask=mask), mask=mask)


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # q: [T, heads, head_dim]
    k_cache_ptr,  # [num_pages, BLOCK_SIZE, kv_heads, head_dim], head_dim contiguous
    v_cache_ptr,
    o_ptr,  # out: [T, heads, head_dim]
    block_tables_ptr,  # [B, max_blocks] int32
    q_starts_ptr,  # [B] int32
    q_lens_ptr,  # [B] int32
    ctx_lens_ptr,  # [B] int32
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cp,
    stride_cb,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,  # QUERIES_PER_KV rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows: BLOCK_M // GROUP queries x GROUP heads
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attention of one query tile of one sequence, for the query heads of one KV head.

    Semantics (see paged_attention_ref): query i of sequence b sits at position
    p = ctx_lens[b] - q_lens[b] + i and attends to keys j with j <= p (and j > p - window when
    SLIDING), read from k_cache[block_tables[b, j // BLOCK_SIZE], j % BLOCK_SIZE].
    Grid: (B, query tiles, kv_heads); tiles past a sequence's q_len exit at once.
    """
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    q_len = tl.load(q_lens_ptr + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    q_start = tl.load(q_starts_ptr + seq)
    ctx_len = tl.load(ctx_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP  # query within the sequence
    head = kv_head * QUERIES_PER_KV + offs_m % GROUP
    row_mask = (q_idx < q_len) & (offs_m % GROUP < QUERIES_PER_KV)
    q_pos = ctx_len - q_len + q_idx  # [BLOCK_M] absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tokens = (q_start + q_idx).to(tl.int64)
    q_ptrs = q_ptr + tokens[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    # Keys [lo, hi): up to the tile's last query, from the first query's window start.
    first_pos = ctx_len - q_len + q_tile * BLOCK_Q
    hi = tl.minimum(first_pos + BLOCK_Q, ctx_len)
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_pos - window + 1, 0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head.to(tl.int64) * stride_ch
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * stride_cp + (offs_n % BLOCK_SIZE) * stride_cb + head_offset  # [BLOCK_N]
        if HEAD_DIM % 16 == 0:  # rows of a head start at multiples of head_dim (asserted)
            slot = tl.multiple_of(slot, 16)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING:
            visible &= offs_n[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.where(visible, tl.exp2(s - m_safe[:, None]), 0.0)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + tokens[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
    _store_kv_kernel[(num_tokens,)](
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


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: SeqLayout,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim] -> out: [T, heads, head_dim], keys and values from the pool.

    Semantics: paged_attention_ref (softmax scale 1/sqrt(head_dim), causal, GQA by head
    groups). The new tokens' K/V must already be in the cache (store_kv).
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
    # A decode-only step needs one query per tile; tl.dot wants at least 16 rows.
    block_m = max(16 if seqs.max_q_len == 1 else 64, group)
    block_q = block_m // group
    num_q_tiles = triton.cdiv(seqs.max_q_len, block_q)
    assert num_q_tiles <= _MAX_GRID_YZ and kv_heads <= _MAX_GRID_YZ
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_attention_kernel[(num_seqs, num_q_tiles, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        seqs.block_tables,
        seqs.q_starts,
        seqs.q_lens,
        seqs.ctx_lens,
        math.log2(math.e) / math.sqrt(head_dim),
        sliding_window or 0,
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
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=64,
        SLIDING=sliding_window is not None,
        DOT_PRECISION=dot_precision,
        num_warps=4,
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
