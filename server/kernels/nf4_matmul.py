"""Triton NF4 matmul: y = x @ dequant(W).T (+ bias), reading bitsandbytes' packed storage.

The weight stays as bitsandbytes quantized it: two 4-bit codes per byte (high nibble first) in
row-major [N, K] order, one absmax per block of 64 values, and with double quantization the
absmax itself as uint8 codes into `state2.code`, scaled per block of 256 absmaxes and shifted
by `offset`. Each program dequantizes the tile it is about to multiply, in registers, so the
only weight traffic is the packed bytes and their scales (about 0.52 bytes per parameter).

One entry point serves every token count. Up to SMALL_M rows (decode), one row tile holds all
tokens and K is split across programs whose fp32 partial sums meet through atomics, so a step
with a handful of tokens still spreads the weight read over the whole GPU (GEMV-style). Larger
M (prefill) uses plain output tiles over M and N.

Block sizes are untuned: no GPU was available when this kernel was written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SMALL_M = 32  # up to this many rows, the split-K path
_TARGET_PROGRAMS = 264  # split K until about this many programs run (~2x an H100's 132 SMs)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class NF4Weight:
    """bitsandbytes' NF4 storage of one [N, K] weight, as the kernel reads it."""

    packed: torch.Tensor  # [N * K // 2] uint8, two codes per byte, high nibble first
    absmax: torch.Tensor  # [N * K // blocksize] uint8 codes (nested) or float32
    code: torch.Tensor  # [16] float32, the NF4 values
    absmax2: torch.Tensor | None  # [ceil(num_blocks / blocksize2)] float32 (nested only)
    code2: torch.Tensor | None  # [256] float32 (nested only)
    offset: float  # added to every dequantized absmax (nested only)
    out_features: int  # N
    in_features: int  # K
    blocksize: int
    blocksize2: int

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state) -> NF4Weight:  # type: ignore[no-untyped-def]
        """From a Params4bit's data and its QuantState (reads the offset once, at load)."""
        s = quant_state
        assert s.quant_type == "nf4", f"only NF4 is supported, got {s.quant_type}"
        out_features, in_features = s.shape
        if s.nested:
            absmax2, code2 = s.state2.absmax, s.state2.code
            offset, blocksize2 = float(s.offset), s.state2.blocksize
        else:
            absmax2, code2, offset, blocksize2 = None, None, 0.0, 1
        return cls(
            packed=weight.reshape(-1),
            absmax=s.absmax,
            code=s.code.float(),
            absmax2=absmax2,
            code2=code2,
            offset=offset,
            out_features=out_features,
            in_features=in_features,
            blocksize=s.blocksize,
            blocksize2=blocksize2,
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight, in plain torch (what the kernel computes per tile)."""
        values = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1)
        absmax = self.absmax.float()
        if self.nested:
            assert self.absmax2 is not None and self.code2 is not None
            group = torch.arange(absmax.numel(), device=absmax.device) // self.blocksize2
            absmax = self.code2[self.absmax.long()] * self.absmax2[group] + self.offset
        w = self.code[values.long()].view(-1, self.blocksize) * absmax[:, None]
        return w.view(self.out_features, self.in_features)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # x: [M, K]
    w_ptr,  # packed: [N_all * K // 2] uint8
    absmax_ptr,  # [N_all * K // BLOCKSIZE] uint8 (NESTED) or float32
    absmax2_ptr,  # [*] float32 (NESTED)
    code2_ptr,  # [256] float32 (NESTED)
    code_ptr,  # [16] float32
    bias_ptr,  # [N_all] (HAS_BIAS)
    y_ptr,  # y: [M, N] in x's dtype, or float32 zeroed when SPLIT_K > 1
    M,
    N,
    K,
    row_start,
    offset,
    stride_xm,
    stride_ym,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile, or its share of K when SPLIT_K > 1.

    Semantics: y = x @ W[row_start:row_start + N].T (+ bias[row_start:row_start + N]), where
    W.view(-1, BLOCKSIZE)[b] = code[nibbles of block b] * absmax[b], and with NESTED
    absmax[b] = code2[absmax_u8[b]] * absmax2[b // BLOCKSIZE2] + offset.
    Grid: (M tiles, N tiles, SPLIT_K). K is a multiple of BLOCK_K (the launcher picks it so).
    Even and odd columns of a tile come from the high and low nibbles of the same bytes, so the
    tile is two half-width dots against x's even and odd columns: no interleave needed.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF_K: tl.constexpr = BLOCK_K // 2
    BLOCKS_PER_TILE: tl.constexpr = BLOCK_K // BLOCKSIZE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.max_contiguous(tl.multiple_of(tl.arange(0, HALF_K), HALF_K), HALF_K)
    offs_kb = tl.arange(0, BLOCKS_PER_TILE)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = (row_start + offs_n).to(tl.int64)  # weight rows; N * K can exceed 2**31
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rows[:, None] * (K // 2)
    blocks_per_row = K // BLOCKSIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        # bytes: [BLOCK_N, HALF_K] -> even (high nibble) and odd (low nibble) columns
        packed = tl.load(w_rows + (k0 // 2 + offs_b)[None, :], mask=n_mask[:, None], other=0)
        w_even = tl.load(code_ptr + (packed >> 4).to(tl.int32))
        w_odd = tl.load(code_ptr + (packed & 0xF).to(tl.int32))

        # scales: [BLOCK_N, BLOCKS_PER_TILE] -> one per byte, [BLOCK_N, HALF_K]
        block = rows[:, None] * blocks_per_row + (k0 // BLOCKSIZE + offs_kb)[None, :]
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=n_mask[:, None], other=0).to(tl.int32)
            group = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=n_mask[:, None], other=0.0)
            scale = tl.load(code2_ptr + q) * group + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=n_mask[:, None], other=0.0)
        scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCKS_PER_TILE, BLOCKSIZE // 2))
        scale = tl.reshape(scale, (BLOCK_N, HALF_K))
        # Rounded to x's dtype before the product, as bitsandbytes' dequantize + matmul does.
        w_even = (w_even * scale).to(x_ptr.dtype.element_ty)
        w_odd = (w_odd * scale).to(x_ptr.dtype.element_ty)

        x_cols = x_rows + (k0 + 2 * offs_b)[None, :]
        x_even = tl.load(x_cols, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_cols + 1, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class NF4MatmulConfig:
    """Tile sizes of one launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


def _block_k(in_features: int, blocksize: int, cap: int) -> int:
    """The largest power-of-two multiple of the blocksize up to cap that divides K."""
    block = blocksize
    while block * 2 <= cap and in_features % (block * 2) == 0:
        block *= 2
    return block


def nf4_matmul_config(num_tokens: int, out_features: int, weight: NF4Weight) -> NF4MatmulConfig:
    """Untuned tiles: small M splits K over programs; large M tiles M and N."""
    k = weight.in_features
    if num_tokens <= SMALL_M:
        # tl.dot needs at least 16 rows; one row tile holds every token.
        block_m = max(16, triton.next_power_of_2(num_tokens))
        block_n, block_k = 64, _block_k(k, weight.blocksize, 256)
        n_tiles = triton.cdiv(out_features, block_n)
        split = min(k // block_k, max(1, _TARGET_PROGRAMS // n_tiles))
        # A power of two, since every distinct SPLIT_K compiles another kernel.
        return NF4MatmulConfig(block_m, block_n, block_k, 1 << (split.bit_length() - 1))
    return NF4MatmulConfig(64, 64, _block_k(k, weight.blocksize, 128), 1, num_warps=4)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations get exact fp32 products (tl.dot would use TF32 by default).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, rows: tuple[int, int]) -> None:
    n_all, k = w.out_features, w.in_features
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    assert x.shape[1] == k, f"x has {x.shape[1]} columns, the weight {k}"
    assert x.dtype in _FLOAT_DTYPES, f"unsupported dtype {x.dtype}"
    assert k % w.blocksize == 0, f"K={k} must be a multiple of the blocksize {w.blocksize}"
    assert w.blocksize % 2 == 0 and w.blocksize & (w.blocksize - 1) == 0, "bad blocksize"
    assert w.packed.dtype == torch.uint8 and w.packed.numel() == n_all * k // 2, "bad packed"
    assert w.packed.is_contiguous() and w.absmax.is_contiguous(), "storage must be contiguous"
    assert w.absmax.numel() == n_all * k // w.blocksize, "one absmax per block"
    assert w.code.dtype == torch.float32 and w.code.numel() == 16, "code must be 16 floats"
    if w.nested:
        assert w.absmax.dtype == torch.uint8, "nested absmax must be uint8 codes"
        assert w.absmax2 is not None and w.absmax2.dtype == torch.float32
        assert w.code2 is not None and w.code2.dtype == torch.float32 and w.code2.numel() == 256
        tensors = (w.packed, w.absmax, w.code, w.absmax2, w.code2)
    else:
        assert w.absmax.dtype == torch.float32, "plain absmax must be float32"
        tensors = (w.packed, w.absmax, w.code)
    assert all(t.device == x.device for t in tensors), "weight and x must share a device"
    start, stop = rows
    assert 0 <= start < stop <= n_all, f"rows {rows} outside the weight's {n_all}"
    if bias is not None:
        assert bias.shape == (n_all,) and bias.is_contiguous(), "bias must be [N] contiguous"
        assert bias.device == x.device, "bias and x must share a device"


def nf4_matmul(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    config: NF4MatmulConfig | None = None,
) -> torch.Tensor:
    """x: [M, K] -> y: [M, stop - start] in x's dtype; rows = (start, stop) of the packed W.

    Semantics: F.linear(x, weight.dequantize()[start:stop].to(x.dtype), bias[start:stop]),
    with fp32 accumulation. `rows` selects a slice of a packed linear (q, k or v of qkv_proj;
    gate or up of gate_up_proj); the default is the whole weight.
    """
    start, stop = rows if rows is not None else (0, weight.out_features)
    _check(x, weight, bias, (start, stop))
    num_tokens, num_out = x.shape[0], stop - start
    cfg = config or nf4_matmul_config(num_tokens, num_out, weight)
    assert weight.in_features % cfg.block_k == 0 and cfg.block_k % weight.blocksize == 0
    out_dtype = x.dtype if cfg.split_k == 1 else torch.float32
    make = torch.empty if cfg.split_k == 1 else torch.zeros  # split-K partial sums add up
    y = make(num_tokens, num_out, dtype=out_dtype, device=x.device)
    if num_tokens == 0:
        return y.to(x.dtype)
    grid = (
        triton.cdiv(num_tokens, cfg.block_m),
        triton.cdiv(num_out, cfg.block_n),
        cfg.split_k,
    )
    _nf4_matmul_kernel[grid](
        x,
        weight.packed,
        weight.absmax,
        weight.absmax2 if weight.nested else weight.absmax,
        weight.code2 if weight.nested else weight.code,
        weight.code,
        bias if bias is not None else weight.code,
        y,
        num_tokens,
        num_out,
        weight.in_features,
        start,
        weight.offset,
        x.stride(0),
        y.stride(0),
        BLOCKSIZE=weight.blocksize,
        BLOCKSIZE2=weight.blocksize2,
        NESTED=weight.nested,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps,
    )
    if cfg.split_k == 1:
        return y
    if bias is not None:
        y += bias[start:stop].float()
    return y.to(x.dtype)
