"""Triton SGMV kernels for batched LoRA: shrink and expand over segments, weights in the page pool.

The launchers are in server.lora.triton_ops; the semantics are those of server.lora.ops
(`shrink_ref`, `expand_ref`). Each program handles one tile of one segment (a run of tokens of
one adapter) and one slice of a packed linear, reading that adapter's A or Bt at its own offset
in the flat pool, so adapters need not be contiguous with each other. Work follows each
adapter's own rank: programs loop over it in BLOCK_R steps, so nothing is padded to the batch's
maximum rank except the rounding of a rank up to one tile (tl.dot needs tiles of 16).

Alignment: the pool layout puts every matrix at a multiple of its `offset_align` elements and
Llama widths are multiples of 16, so the launchers pass those as hints (OFFSET_ALIGN,
WIDTH_ALIGN) and rows load as 16-byte vectors the compiler can pipeline; they pass 1 when
the layout does not promise it (tests' scattered offsets).
"""

import triton
import triton.language as tl

# Metadata is read one scalar per program, so its pointers gain nothing from 16-byte alignment:
# not specialising on it keeps one variant per tile shape whatever a view's offset (odd layers
# of the per-step [layers, G, S] gathers start 8 bytes into a 16-byte line when G * S is odd).
_METADATA = ("seg_starts_ptr", "seg_lens_ptr", "a_offsets_ptr", "b_offsets_ptr", "ranks_ptr")
_METADATA += ("scalings_ptr", "slice_offsets_ptr", "slice_widths_ptr")
# Counts that change per step or module; specialising them (== 1, multiple of 16) would only
# multiply variants. (k_per_split stays specialised: a multiple of BLOCK_K, its divisibility
# keeps the K mask constant over 16-element runs, so the loads of A stay vectorized.)
_COUNTS = ("max_rank", "max_width", "num_slices", "num_splits")


@triton.jit(do_not_specialize=_COUNTS, do_not_specialize_on_alignment=_METADATA)
def shrink_kernel(
    x_ptr,  # x: [T, in]
    pool_ptr,  # pool: [P]
    h_ptr,  # h: [num_splits, S, T, >= max_rank] float32 partial sums, one slab per K split
    seg_starts_ptr,  # [G] int64
    seg_lens_ptr,  # [G] int64
    a_offsets_ptr,  # [G, S] int64
    ranks_ptr,  # [G, S] int32
    scalings_ptr,  # [G, S] float32
    in_features,
    max_rank,
    num_slices,
    num_splits,
    k_per_split,  # a multiple of BLOCK_K
    stride_xt,
    stride_hp,
    stride_hs,
    stride_ht,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OFFSET_ALIGN: tl.constexpr,  # every a_offset is a multiple of this (the pool layout's)
    DOT_PRECISION: tl.constexpr,
):
    """Shrink one row tile of one (segment, slice) over one contiguous share of K.

    Semantics: h[p, s, rows, :rank] = scaling * x[rows, K_p] @ A[:rank, K_p].T, where
    A = pool[a_off:][: rank * K].view(rank, K) and K_p is split p's share of K; the shares add
    up to h of shrink_ref. Grid: (m tiles * num_splits, segments, slices). Each program walks
    its adapter's own rank in BLOCK_R steps, so no program is spent on rank the adapter lacks;
    it writes every row of its segment and every column below the rank, and nothing else.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    k_split = pid % num_splits
    m_tile = pid // num_splits

    gs = g * num_slices + s
    seg_len = tl.load(seg_lens_ptr + g)
    # Clamped so inconsistent metadata can never index past h's last column.
    rank = tl.minimum(tl.load(ranks_ptr + gs), max_rank)
    if m_tile * BLOCK_M >= seg_len:
        return
    seg_start = tl.load(seg_starts_ptr + g)
    a_offset = tl.load(a_offsets_ptr + gs)
    if OFFSET_ALIGN > 1:
        a_offset = tl.multiple_of(a_offset, OFFSET_ALIGN)
    scaling = tl.load(scalings_ptr + gs)
    k_start = k_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < seg_len
    rows = seg_start + offs_m  # int64, like every offset below: the pool can exceed 2**31
    # xt: [BLOCK_M, BLOCK_K] of x; at: [BLOCK_K, BLOCK_R] of A.T (A rows are contiguous in K)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :]
    h_rows = h_ptr + k_split.to(tl.int64) * stride_hp + s.to(tl.int64) * stride_hs
    h_rows += rows[:, None] * stride_ht
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        a_ptrs = pool_ptr + a_offset + offs_r[None, :].to(tl.int64) * in_features + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_mask = offs_k + k0 < k_end
            xt = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs + k0, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        tl.store(h_rows + offs_r[None, :], acc * scaling, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=_COUNTS, do_not_specialize_on_alignment=_METADATA)
def expand_kernel(
    h_ptr,  # h: [num_splits, S, T, >= max_rank] float32 partial sums
    pool_ptr,  # pool: [P]
    out_ptr,  # out: [T, N]
    seg_starts_ptr,  # [G] int64
    seg_lens_ptr,  # [G] int64
    b_offsets_ptr,  # [G, S] int64
    ranks_ptr,  # [G, S] int32
    slice_offsets_ptr,  # [S] int64
    slice_widths_ptr,  # [S] int64
    max_rank,
    max_width,
    num_slices,
    num_splits,
    stride_hp,
    stride_hs,
    stride_ht,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    OFFSET_ALIGN: tl.constexpr,  # every b_offset is a multiple of this
    WIDTH_ALIGN: tl.constexpr,  # every slice width and column offset is a multiple of this
    DOT_PRECISION: tl.constexpr,
):
    """Expand one row tile and column tile of one (segment, slice) into out.

    Semantics: out[rows, off:off + W] += (sum_p h[p, s, rows, :rank]) @ Bt, where
    Bt = pool[b_off:][: rank * W].view(rank, W). Grid: (m tiles * n tiles, segments, slices);
    each output element belongs to one program, so the update is a plain load-add-store. It
    reads h only where the shrink wrote it (its segment's rows, columns below its rank).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    num_n_tiles = tl.cdiv(max_width, BLOCK_N)
    n_tile = pid % num_n_tiles
    m_tile = pid // num_n_tiles

    gs = g * num_slices + s
    seg_len = tl.load(seg_lens_ptr + g)
    rank = tl.minimum(tl.load(ranks_ptr + gs), max_rank)
    width = tl.load(slice_widths_ptr + s)
    if WIDTH_ALIGN > 1:
        width = tl.multiple_of(width, WIDTH_ALIGN)
    if rank == 0:
        return
    if m_tile * BLOCK_M >= seg_len:
        return
    if n_tile * BLOCK_N >= width:
        return
    seg_start = tl.load(seg_starts_ptr + g)
    b_offset = tl.load(b_offsets_ptr + gs)
    if OFFSET_ALIGN > 1:
        b_offset = tl.multiple_of(b_offset, OFFSET_ALIGN)
    col_offset = tl.load(slice_offsets_ptr + s)
    if WIDTH_ALIGN > 1:
        col_offset = tl.multiple_of(col_offset, WIDTH_ALIGN)

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < seg_len
    n_mask = offs_n < width
    rows = seg_start + offs_m  # int64
    # ht: [BLOCK_M, BLOCK_R] of h; bt: [BLOCK_R, BLOCK_N] of Bt
    h_ptrs = h_ptr + s.to(tl.int64) * stride_hs + rows[:, None] * stride_ht + offs_r[None, :]
    b_ptrs = pool_ptr + b_offset + offs_r[:, None].to(tl.int64) * width + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = offs_r + r0 < rank
        h_mask = m_mask[:, None] & r_mask[None, :]
        ht = tl.load(h_ptrs + r0, mask=h_mask, other=0.0)
        for p in range(1, num_splits):
            ht += tl.load(h_ptrs + p * stride_hp + r0, mask=h_mask, other=0.0)
        bt = tl.load(b_ptrs + r0 * width, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # h is rounded to the weights' dtype first, as expand_ref does, so tensor cores apply.
        acc = tl.dot(ht.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + rows[:, None] * stride_ot + (col_offset + offs_n)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    base = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)
