"""Triton SGMV kernels for batched LoRA: shrink and expand over segments, weights in the page pool.

The semantics are exactly those of `server.lora.ops` (`shrink_ref`, `expand_ref`, `lora_ref`).
Each program handles one tile of one segment (a run of tokens of one adapter) and one slice of a
packed linear; it reads that adapter's A or Bt at its own offsets in the flat pool, so adapters
need not be contiguous with each other. Work follows each adapter's own rank: shrink programs
whose rank tile lies past the rank exit at once (S-LoRA), and expand loops over the rank in
BLOCK_R steps up to that rank. Nothing is padded to the batch's maximum rank except the rounding
of a rank up to one tile (tl.dot needs tiles of at least 16).

Block sizes are untuned: no GPU was available when these kernels were written.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.lora.ops import SegmentTensors

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2 (segments, slices)
# Shrink splits K until about this many programs run: a decode step with a few adapters
# otherwise leaves most SMs idle while one program walks all of K (untuned guess, ~2x 132 SMs).
# The split partial sums meet in h through fp32 atomics, so h can differ in the last bits from
# run to run; that is the usual price of split-K and harmless for inference.
_TARGET_PROGRAMS = 256


@triton.jit
def _shrink_kernel(
    x_ptr,  # x: [T, in]
    pool_ptr,  # pool: [P]
    h_ptr,  # h: [S, T, max_rank] float32, zeroed
    seg_starts_ptr,  # [G] int64
    seg_lens_ptr,  # [G] int64
    a_offsets_ptr,  # [G, S] int64
    ranks_ptr,  # [G, S] int32
    scalings_ptr,  # [G, S] float32
    in_features,
    max_rank,
    num_slices,
    stride_xt,
    stride_hs,
    stride_ht,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Shrink one row tile and rank tile of one (segment, slice), or a K share of it.

    Semantics: h[s, rows, :rank] = scaling * x[rows] @ pool[a_off:][: rank * K].view(rank, K).T
    Grid: (m tiles * SPLIT_K * rank tiles, segments, slices); the rank tile varies fastest, so
    programs reading the same x rows run together and share them through L2.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    num_r_tiles = tl.cdiv(max_rank, BLOCK_R)
    r_tile = pid % num_r_tiles
    k_split = (pid // num_r_tiles) % SPLIT_K
    m_tile = pid // (num_r_tiles * SPLIT_K)

    gs = g * num_slices + s
    seg_len = tl.load(seg_lens_ptr + g)
    # Clamped so inconsistent metadata can never index past h's last column.
    rank = tl.minimum(tl.load(ranks_ptr + gs), max_rank)
    if m_tile * BLOCK_M >= seg_len:
        return
    if r_tile * BLOCK_R >= rank:
        return
    seg_start = tl.load(seg_starts_ptr + g)
    a_offset = tl.load(a_offsets_ptr + gs)
    scaling = tl.load(scalings_ptr + gs)

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = k_split * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < seg_len
    r_mask = offs_r < rank
    rows = seg_start + offs_m  # int64, like every offset below: the pool can exceed 2**31
    # xt: [BLOCK_M, BLOCK_K] of x; at: [BLOCK_K, BLOCK_R] of A.T (A rows are contiguous in K)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :]
    a_ptrs = pool_ptr + a_offset + offs_r[None, :].to(tl.int64) * in_features + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K * SPLIT_K):
        k_mask = offs_k + k0 < in_features
        xt = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs + k0, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
    acc = acc * scaling

    h_ptrs = h_ptr + s.to(tl.int64) * stride_hs + rows[:, None] * stride_ht + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=mask)


@triton.jit
def _expand_kernel(
    h_ptr,  # h: [S, T, R] float32
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
    stride_hs,
    stride_ht,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Expand one row tile and column tile of one (segment, slice) into out.

    Semantics: out[rows, off:off + W] += h[s, rows, :rank] @ pool[b_off:][: rank * W].view(rank, W)
    Grid: (m tiles * n tiles, segments, slices); each output element belongs to one program,
    so the update is a plain load-add-store.
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
    if rank == 0:
        return
    if m_tile * BLOCK_M >= seg_len:
        return
    if n_tile * BLOCK_N >= width:
        return
    seg_start = tl.load(seg_starts_ptr + g)
    b_offset = tl.load(b_offsets_ptr + gs)
    col_offset = tl.load(slice_offsets_ptr + s)

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
        ht = tl.load(h_ptrs + r0, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs + r0 * width, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # h is rounded to the weights' dtype first, as expand_ref does, so tensor cores apply.
        acc = tl.dot(ht.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + rows[:, None] * stride_ot + (col_offset + offs_n)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    base = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _num_segments(meta: SegmentTensors) -> int:
    return meta.seg_starts.shape[0]


@dataclass(frozen=True)
class ShrinkConfig:
    """Tile sizes of one shrink launch."""

    block_m: int
    block_r: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


@dataclass(frozen=True)
class ExpandConfig:
    """Tile sizes of one expand launch."""

    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4


def shrink_config(meta: SegmentTensors, in_features: int) -> ShrinkConfig:
    """Untuned tiles: decode keeps tl.dot's minimum 16 rows and long K tiles; prefill grows M."""
    if meta.max_seg_len <= 16:
        block_m, block_r, block_k = 16, 16, 256
    else:
        block_m, block_r, block_k = 64, 32 if meta.max_rank > 16 else 16, 64
    programs = (
        _num_segments(meta)
        * meta.a_offsets.shape[1]
        * triton.cdiv(meta.max_seg_len, block_m)
        * triton.cdiv(meta.max_rank, block_r)
    )
    # Each split keeps at least 2 K tiles, so the atomics stay a small share of the work.
    max_split = max(1, in_features // (2 * block_k))
    split_k = min(max_split, max(1, triton.cdiv(_TARGET_PROGRAMS, max(programs, 1))))
    # A power of two, since every distinct SPLIT_K compiles another kernel.
    return ShrinkConfig(block_m, block_r, block_k, 1 << (split_k.bit_length() - 1))


def expand_config(meta: SegmentTensors) -> ExpandConfig:
    """Untuned tiles: decode keeps tl.dot's minimum 16 rows; prefill grows M and the rank step."""
    if meta.max_seg_len <= 16:
        return ExpandConfig(block_m=16, block_n=128, block_r=16)
    return ExpandConfig(block_m=64, block_n=128, block_r=32 if meta.max_rank > 16 else 16)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 weights get exact fp32 products (tl.dot would use TF32 by default); 16-bit ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=64)
def _slice_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached: slice geometry is fixed per layer, so this copies to the device once per shape.
    return torch.tensor(values, dtype=torch.int64, device=device)


def _check_meta(meta: SegmentTensors, device: torch.device) -> None:
    num_segments = meta.seg_starts.shape[0]
    num_slices = meta.a_offsets.shape[1]
    for name, dtype, shape in (
        ("seg_starts", torch.int64, (num_segments,)),
        ("seg_lens", torch.int64, (num_segments,)),
        ("a_offsets", torch.int64, (num_segments, num_slices)),
        ("b_offsets", torch.int64, (num_segments, num_slices)),
        ("ranks", torch.int32, (num_segments, num_slices)),
        ("scalings", torch.float32, (num_segments, num_slices)),
    ):
        t = getattr(meta, name)
        assert t.dtype == dtype, f"meta.{name} must be {dtype}, got {t.dtype}"
        assert tuple(t.shape) == shape, f"meta.{name} must be {shape}, got {tuple(t.shape)}"
        assert t.is_contiguous(), f"meta.{name} must be contiguous"
        assert t.device == device, f"meta.{name} is on {t.device}, expected {device}"
    assert num_segments <= _MAX_GRID_YZ, f"{num_segments} segments exceed the grid limit"
    assert 1 <= num_slices <= _MAX_GRID_YZ, f"bad slice count {num_slices}"
    assert meta.max_rank >= 0 and meta.max_seg_len >= 0


def _check_inputs(x: torch.Tensor, pool: torch.Tensor, meta: SegmentTensors) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, in] with contiguous rows"
    assert x.dtype in _FLOAT_DTYPES, f"unsupported dtype {x.dtype}"
    assert pool.dim() == 1 and pool.is_contiguous(), "pool must be a flat contiguous tensor"
    assert pool.dtype == x.dtype, f"pool is {pool.dtype} but x is {x.dtype}"
    assert pool.device == x.device, f"pool is on {pool.device} but x is on {x.device}"
    _check_meta(meta, x.device)


def lora_shrink(
    x: torch.Tensor, pool: torch.Tensor, meta: SegmentTensors, config: ShrinkConfig | None = None
) -> torch.Tensor:
    """x: [T, in], pool: [P] -> h: [S, T, max_rank] float32, zero where no LoRA applies."""
    _check_inputs(x, pool, meta)
    num_tokens, in_features = x.shape
    num_slices = meta.a_offsets.shape[1]
    # h: [S, T, R]; zeroed because the kernel writes only segment rows and columns below rank
    h = torch.zeros(num_slices, num_tokens, meta.max_rank, dtype=torch.float32, device=x.device)
    if _num_segments(meta) == 0 or meta.max_rank == 0 or num_tokens == 0:
        return h
    assert meta.max_seg_len <= num_tokens, "a segment is longer than the batch"
    cfg = config or shrink_config(meta, in_features)
    grid = (
        triton.cdiv(meta.max_seg_len, cfg.block_m)
        * cfg.split_k
        * triton.cdiv(meta.max_rank, cfg.block_r),
        _num_segments(meta),
        num_slices,
    )
    _shrink_kernel[grid](
        x,
        pool,
        h,
        meta.seg_starts,
        meta.seg_lens,
        meta.a_offsets,
        meta.ranks,
        meta.scalings,
        in_features,
        meta.max_rank,
        num_slices,
        x.stride(0),
        h.stride(0),
        h.stride(1),
        BLOCK_M=cfg.block_m,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps,
    )
    return h


def _check_slices(
    slice_offsets: Sequence[int], slice_widths: Sequence[int], num_slices: int, out_width: int
) -> None:
    assert len(slice_offsets) == len(slice_widths) == num_slices, "one offset and width per slice"
    spans = sorted(zip(slice_offsets, slice_widths, strict=True))
    end = 0
    for offset, width in spans:
        assert width > 0 and offset >= end, f"slices overlap or are empty: {spans}"
        end = offset + width
    assert end <= out_width, f"slices end at column {end}, past out's {out_width} columns"


def lora_expand(
    h: torch.Tensor,
    pool: torch.Tensor,
    meta: SegmentTensors,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
    config: ExpandConfig | None = None,
) -> None:
    """h: [S, T, R>=max_rank] float32; out: [T, N] (rows may be strided) updated in place."""
    num_slices = meta.a_offsets.shape[1]
    assert out.dim() == 2 and out.stride(1) == 1, "out must be [T, N] with contiguous rows"
    assert out.dtype == pool.dtype, f"out is {out.dtype} but pool is {pool.dtype}"
    assert pool.dim() == 1 and pool.is_contiguous(), "pool must be a flat contiguous tensor"
    assert pool.dtype in _FLOAT_DTYPES, f"unsupported dtype {pool.dtype}"
    assert h.dtype == torch.float32, f"h must be float32, got {h.dtype}"
    assert h.dim() == 3 and h.stride(2) == 1, "h must be [S, T, R] with contiguous rank"
    assert h.shape[0] == num_slices and h.shape[1] == out.shape[0], (
        f"h is {tuple(h.shape)} but meta has {num_slices} slices and out {out.shape[0]} tokens"
    )
    assert h.shape[2] >= meta.max_rank, f"h has {h.shape[2]} rank columns < {meta.max_rank}"
    assert h.device == out.device == pool.device, "h, out and pool must share a device"
    _check_meta(meta, out.device)
    _check_slices(slice_offsets, slice_widths, num_slices, out.shape[1])
    if _num_segments(meta) == 0 or meta.max_rank == 0 or out.shape[0] == 0:
        return
    assert meta.max_seg_len <= out.shape[0], "a segment is longer than the batch"
    cfg = config or expand_config(meta)
    max_width = max(slice_widths)
    grid = (
        triton.cdiv(meta.max_seg_len, cfg.block_m) * triton.cdiv(max_width, cfg.block_n),
        _num_segments(meta),
        num_slices,
    )
    _expand_kernel[grid](
        h,
        pool,
        out,
        meta.seg_starts,
        meta.seg_lens,
        meta.b_offsets,
        meta.ranks,
        _slice_tensor(tuple(slice_offsets), out.device),
        _slice_tensor(tuple(slice_widths), out.device),
        meta.max_rank,
        max_width,
        num_slices,
        h.stride(0),
        h.stride(1),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        DOT_PRECISION=_dot_precision(pool.dtype),
        num_warps=cfg.num_warps,
    )


def lora_triton(
    x: torch.Tensor,
    pool: torch.Tensor,
    meta: SegmentTensors,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> None:
    """Shrink then expand: out += the LoRA delta of each token's adapter (as ops.lora_ref)."""
    _check_inputs(x, pool, meta)
    assert out.shape[0] == x.shape[0], f"out has {out.shape[0]} rows, x has {x.shape[0]}"
    if _num_segments(meta) == 0 or meta.max_rank == 0 or x.shape[0] == 0:
        return
    h = lora_shrink(x, pool, meta)  # h: [S, T, max_rank] float32
    lora_expand(h, pool, meta, out, slice_offsets, slice_widths)
