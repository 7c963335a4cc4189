"""Launchers of the batched LoRA kernels (server.kernels.lora_sgmv): tiles, checks, two launches.

`lora_triton` is the engine's entry point (LoRABatch.add_lora): a shrink writing each K split's
partial sums into a scratch and an expand adding them up into `out`, with no zeroing launch.
`lora_shrink` and `lora_expand` run one half each, with the semantics of `server.lora.ops`
(`shrink_ref`, `expand_ref`), for tests and benchmarks.

Block sizes are untuned: no GPU was available when these kernels were written.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from server.kernels import lora_sgmv
from server.lora.ops import SegmentTensors

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2 (segments, slices)
# Shrink splits K until about this many programs run: a decode step with a few adapters
# otherwise leaves most SMs idle while one program walks all of K (untuned guess, ~2x 132 SMs).
# Each split writes its own partial sums and the expand adds them up, so nothing needs zeroing
# and the result does not depend on the order programs finish in.
_TARGET_PROGRAMS = 256
_ACTIVE_RUNS = 8  # runs a decode step is assumed to hold when sizing its split (a guess)


def _num_segments(meta: SegmentTensors) -> int:
    return meta.seg_starts.shape[0]


@dataclass(frozen=True)
class ShrinkConfig:
    """Tile sizes of one shrink launch; split_k contiguous shares of K, each its own partial."""

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


def _block_m(max_seg_len: int) -> int:
    # tl.dot wants at least 16 rows; a decode graph's bucket can hold up to 64 tokens per run.
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


def _block_r(max_rank: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(max_rank, 1))))


def shrink_config(meta: SegmentTensors, in_features: int) -> ShrinkConfig:
    """Untuned tiles: one rank tile up to 64 (each program loops over its own adapter's rank),
    long K tiles for decode; K split until about _TARGET_PROGRAMS programs would run."""
    block_m, block_r = _block_m(meta.max_seg_len), _block_r(meta.max_rank)
    block_k = 256 if block_m == 16 and block_r <= 16 else 128 if block_r <= 32 else 64
    # A decode graph's grid covers every run buffer, most of them empty in a given step: count
    # at most _ACTIVE_RUNS runs, or the split would shrink to nothing.
    runs = min(_num_segments(meta), _ACTIVE_RUNS)
    programs = max(1, runs * meta.a_offsets.shape[1] * triton.cdiv(meta.max_seg_len, block_m))
    # Each split keeps at least 2 K tiles.
    max_split = max(1, in_features // (2 * block_k))
    return ShrinkConfig(
        block_m, block_r, block_k, min(max_split, triton.cdiv(_TARGET_PROGRAMS, programs))
    )


def expand_config(meta: SegmentTensors) -> ExpandConfig:
    """Untuned tiles: rows as the shrink's, 128 columns (64 at 64 rows, to stay in registers)."""
    block_m = _block_m(meta.max_seg_len)
    return ExpandConfig(block_m, 64 if block_m == 64 else 128, min(32, _block_r(meta.max_rank)))


def _rank_columns(meta: SegmentTensors) -> int:
    # h's rank columns, padded to 16 so each row of h starts 64-byte aligned (vector loads)
    # and its strides are multiples of 16 whatever the rank (one kernel variant).
    return triton.cdiv(meta.max_rank, 16) * 16


def _pow2_divisor(values: Sequence[int], cap: int = 16) -> int:
    """The largest power of two up to cap dividing every value (an alignment hint)."""
    align = cap
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


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


def _shrink_into(
    x: torch.Tensor, pool: torch.Tensor, meta: SegmentTensors, h: torch.Tensor, cfg: ShrinkConfig
) -> None:
    """Launch the shrink: h [split_k, S, T, R] receives each K share's partial sums."""
    in_features = x.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(in_features, cfg.split_k), cfg.block_k) * cfg.block_k
    grid = (
        triton.cdiv(meta.max_seg_len, cfg.block_m) * cfg.split_k,
        _num_segments(meta),
        meta.a_offsets.shape[1],
    )
    lora_sgmv.shrink_kernel[grid](
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
        meta.a_offsets.shape[1],
        cfg.split_k,
        k_per_split,
        x.stride(0),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        BLOCK_M=cfg.block_m,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        OFFSET_ALIGN=_pow2_divisor([meta.offset_align]),
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps,
    )


def lora_shrink(
    x: torch.Tensor, pool: torch.Tensor, meta: SegmentTensors, config: ShrinkConfig | None = None
) -> torch.Tensor:
    """x: [T, in], pool: [P] -> h: [S, T, max_rank] float32, zero where no LoRA applies."""
    _check_inputs(x, pool, meta)
    num_tokens, in_features = x.shape
    num_slices = meta.a_offsets.shape[1]
    if _num_segments(meta) == 0 or meta.max_rank == 0 or num_tokens == 0:
        return torch.zeros(num_slices, num_tokens, meta.max_rank, device=x.device)
    assert meta.max_seg_len <= num_tokens, "a segment is longer than the batch"
    cfg = config or shrink_config(meta, in_features)
    # Zeroed: the kernel writes only segment rows and columns below each rank, and this
    # function's contract (as shrink_ref's) is zeros elsewhere. lora_triton needs no zeros.
    h = torch.zeros(cfg.split_k, num_slices, num_tokens, _rank_columns(meta), device=x.device)
    _shrink_into(x, pool, meta, h, cfg)
    return (h[0] if cfg.split_k == 1 else h.sum(0))[..., : meta.max_rank]


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


def _expand_from(
    h: torch.Tensor,
    pool: torch.Tensor,
    meta: SegmentTensors,
    out: torch.Tensor,
    slices: tuple[Sequence[int], Sequence[int]],
    cfg: ExpandConfig,
) -> None:
    """Launch the expand: out += (sum over h's first dimension) @ Bt, per segment and slice."""
    slice_offsets, slice_widths = slices
    max_width = max(slice_widths)
    grid = (
        triton.cdiv(meta.max_seg_len, cfg.block_m) * triton.cdiv(max_width, cfg.block_n),
        _num_segments(meta),
        meta.a_offsets.shape[1],
    )
    lora_sgmv.expand_kernel[grid](
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
        meta.a_offsets.shape[1],
        h.shape[0],
        h.stride(0),
        h.stride(1),
        h.stride(2),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        OFFSET_ALIGN=_pow2_divisor([meta.offset_align]),
        WIDTH_ALIGN=_pow2_divisor([*slice_offsets, *slice_widths]),
        DOT_PRECISION=_dot_precision(pool.dtype),
        num_warps=cfg.num_warps,
    )


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
    _expand_from(h[None], pool, meta, out, (slice_offsets, slice_widths), cfg)


def lora_triton(
    x: torch.Tensor,
    pool: torch.Tensor,
    meta: SegmentTensors,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
    workspace: torch.Tensor | None = None,
) -> None:
    """Shrink then expand: out += the LoRA delta of each token's adapter (as ops.lora_ref).

    Two launches: the shrink writes each K split's partial sums into a scratch the expand
    adds up, so nothing is zeroed first. workspace: an optional flat float32 scratch of at
    least lora_workspace_numel(...) elements; allocated (not cleared) per call when None.
    """
    _check_inputs(x, pool, meta)
    assert out.dim() == 2 and out.stride(1) == 1, "out must be [T, N] with contiguous rows"
    assert out.shape[0] == x.shape[0], f"out has {out.shape[0]} rows, x has {x.shape[0]}"
    assert out.dtype == pool.dtype, f"out is {out.dtype} but pool is {pool.dtype}"
    num_slices = meta.a_offsets.shape[1]
    _check_slices(slice_offsets, slice_widths, num_slices, out.shape[1])
    if _num_segments(meta) == 0 or meta.max_rank == 0 or x.shape[0] == 0:
        return
    assert meta.max_seg_len <= x.shape[0], "a segment is longer than the batch"
    shrink = shrink_config(meta, x.shape[1])
    shape = (shrink.split_k, num_slices, x.shape[0], _rank_columns(meta))
    if workspace is None:
        h = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        assert workspace.dtype == torch.float32 and workspace.device == x.device
        h = workspace[: math.prod(shape)].view(shape)
    _shrink_into(x, pool, meta, h, shrink)
    _expand_from(h, pool, meta, out, (slice_offsets, slice_widths), expand_config(meta))


def lora_workspace_numel(meta: SegmentTensors, num_tokens: int, in_features: int) -> int:
    """Float32 elements of lora_triton's scratch for this batch."""
    shrink = shrink_config(meta, in_features)
    return shrink.split_k * meta.a_offsets.shape[1] * num_tokens * _rank_columns(meta)
