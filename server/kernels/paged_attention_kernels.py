"""Triton kernels of paged attention: store the step's K/V, attend over the pool, reduce splits.

The launchers and the plain-torch reference are in server.kernels.paged_attention. A program
holds a tile of one sequence's queries for all query heads of one KV head (grouped-query
attention without repeating K/V) and runs an online softmax over key tiles, following the
sequence's block table key by key. Keys outside [0, ctx_len) are never loaded (masked loads
give 0), and keys a query may not see get weight exactly 0 rather than exp(-inf) times whatever
the slot holds: a stale NaN in a reused page cannot reach the output (0 * NaN is NaN).

The key loop is software-pipelined by hand (Triton's pipeliner keeps a K/V tile whose address
comes from a block-table load in a single buffer, waited on at the top of every iteration):
block-table entries are loaded two tiles ahead and K/V one tile ahead into registers, so each
tile's DRAM latency overlaps the previous tile's math (two K/V tiles live: double buffering).

Split-KV (flash decoding): for a decode step with few sequences x KV heads, programs also split
each sequence's keys into partitions; each writes its unnormalized partial (running max, sum,
accumulator) and a reduce kernel combines the partitions.
"""

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
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
def _tile_pages(table, start_n, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The page of each key of the tile at start_n (0 past hi: never read)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return tl.load(table + offs_n // BLOCK_SIZE, mask=offs_n < hi, other=0).to(tl.int64)


@triton.jit
def _tile_kv(
    k_cache_ptr,
    v_cache_ptr,
    pages,
    start_n,
    hi,
    head_offset,
    stride_cp,
    stride_cb,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """K and V of the tile at start_n: [BLOCK_N, BLOCK_D] each, 0 past hi."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = pages * stride_cp + (offs_n % BLOCK_SIZE) * stride_cb + head_offset  # [BLOCK_N]
    if HEAD_DIM % 16 == 0:  # rows of a head start at multiples of head_dim (asserted)
        slot = tl.multiple_of(slot, 16)
    mask = (offs_n < hi)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + slot[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + slot[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit(do_not_specialize=("num_parts", "keys_per_part", "window"))
def paged_attention_kernel(
    q_ptr,  # q: [T, heads, head_dim]
    k_cache_ptr,  # [num_pages, BLOCK_SIZE, kv_heads, head_dim], head_dim contiguous
    v_cache_ptr,
    o_ptr,  # out: [T, heads, head_dim]
    part_acc_ptr,  # SPLIT: [B, kv_heads, num_parts, GROUP, BLOCK_D] float32
    part_ml_ptr,  # SPLIT: [B, kv_heads, num_parts, 2, GROUP] float32 (running max, sum)
    block_tables_ptr,  # [B, max_blocks] int32
    q_starts_ptr,  # [B] int32
    q_lens_ptr,  # [B] int32
    ctx_lens_ptr,  # [B] int32
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    window,
    num_parts,
    keys_per_part,  # SPLIT: a multiple of BLOCK_N
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
    SPLIT: tl.constexpr,  # decode only: axis 1 is the key partition, not the query tile
    DOT_PRECISION: tl.constexpr,
):
    """Attention of one query tile of one sequence, for the query heads of one KV head.

    Semantics (see paged_attention_ref): query i of sequence b sits at position
    p = ctx_lens[b] - q_lens[b] + i and attends to keys j with j <= p (and j > p - window when
    SLIDING), read from k_cache[block_tables[b, j // BLOCK_SIZE], j % BLOCK_SIZE].
    Grid: (B, query tiles, kv_heads); tiles past a sequence's q_len exit at once. With SPLIT
    (q_len <= 1): (B, num_parts, kv_heads), partition p covering keys
    [p * keys_per_part, (p + 1) * keys_per_part), written unnormalized to the part buffers.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(2)
    q_tile = 0 if SPLIT else tl.program_id(1)
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
    if SPLIT:
        part = tl.program_id(1)
        lo = tl.maximum(lo, part * keys_per_part)
        hi = tl.minimum(hi, (part + 1) * keys_per_part)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head.to(tl.int64) * stride_ch
    pages = _tile_pages(table, lo, hi, BLOCK_SIZE, BLOCK_N)
    k, v = _tile_kv(
        k_cache_ptr, v_cache_ptr, pages, lo, hi, head_offset, stride_cp, stride_cb,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D,
    )  # fmt: skip
    pages = _tile_pages(table, lo + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1):
        next_n = start_n + BLOCK_N
        k_next, v_next = _tile_kv(
            k_cache_ptr, v_cache_ptr, pages, next_n, hi, head_offset, stride_cp, stride_cb,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D,
        )  # fmt: skip
        pages = _tile_pages(table, next_n + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)

        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        visible = (offs_n < hi)[None, :] & (offs_n[None, :] <= q_pos[:, None])
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
        k, v = k_next, v_next

    if SPLIT:
        # The decode's one query: rows [0, GROUP) hold its heads.
        first = offs_m < GROUP
        slab = (seq.to(tl.int64) * tl.num_programs(2) + kv_head) * num_parts + tl.program_id(1)
        acc_ptrs = part_acc_ptr + slab * (GROUP * BLOCK_D) + offs_m[:, None] * BLOCK_D
        tl.store(acc_ptrs + offs_d[None, :], acc, mask=first[:, None])
        tl.store(part_ml_ptr + slab * (2 * GROUP) + offs_m, m_i, mask=first)
        tl.store(part_ml_ptr + slab * (2 * GROUP) + GROUP + offs_m, l_i, mask=first)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + tokens[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        mask = row_mask[:, None] & d_mask[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("num_parts",))
def reduce_parts_kernel(
    part_acc_ptr,  # [B, kv_heads, num_parts, GROUP, BLOCK_D] float32
    part_ml_ptr,  # [B, kv_heads, num_parts, 2, GROUP] float32
    o_ptr,  # out: [T, heads, head_dim]
    q_starts_ptr,  # [B] int32
    q_lens_ptr,  # [B] int32
    num_parts,
    stride_ot,
    stride_oh,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Combine a decode's key partitions: out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p.

    Grid: (B, kv_heads). Every partition wrote its slab (an empty one: max -inf, sum 0).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tl.load(q_lens_ptr + seq) == 0:  # a decode graph's padding row: nothing to write
        return
    rows = tl.arange(0, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    first = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * num_parts
    m = tl.full((GROUP,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((GROUP,), dtype=tl.float32)
    acc = tl.zeros((GROUP, BLOCK_D), dtype=tl.float32)
    for part in range(num_parts):
        slab = first + part
        m_p = tl.load(part_ml_ptr + slab * (2 * GROUP) + rows)
        l_p = tl.load(part_ml_ptr + slab * (2 * GROUP) + GROUP + rows)
        a_p = tl.load(part_acc_ptr + slab * (GROUP * BLOCK_D) + rows[:, None] * BLOCK_D + offs_d)
        m_new = tl.maximum(m, m_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_p - m_safe)
        l_sum = l_sum * alpha + l_p * beta
        acc = acc * alpha[:, None] + a_p * beta[:, None]
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    token = tl.load(q_starts_ptr + seq).to(tl.int64)
    head = kv_head * QUERIES_PER_KV + rows
    o_ptrs = o_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    mask = (rows < QUERIES_PER_KV)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)
