"""Triton NF4 matmul: y = x @ dequant(W).T (+ bias), reading bitsandbytes' packed storage.

The weight stays as bitsandbytes quantized it: two 4-bit codes per byte (high nibble first) in
row-major [N, K] order, one absmax per block of 64 values, and with double quantization the
absmax itself as uint8 codes into `state2.code`, scaled per block of 256 absmaxes and shifted
by `offset`. The kernels (server.kernels.nf4_kernels) dequantize each tile in registers, so
the only weight traffic is the packed bytes and their scales (about 0.52 bytes per parameter).

One launch per linear up to DEQUANT_ONCE_M rows, writing y in x's dtype with the bias added:
no zeroing, no conversion, no bias launch. Decode-sized M keeps every token in one row tile
(each dequantized weight serves all of them) and narrow column tiles, so a handful of tokens
still spreads the weight read over the whole GPU. From DEQUANT_ONCE_M rows (prefill chunks) the
weight is dequantized once, a bounded slab of rows at a time, and multiplied by torch's GEMM.

Block sizes are untuned: no GPU was available when this kernel was written.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from server.kernels import nf4_kernels as kernels

SMALL_M = 64  # up to this many rows, one row tile holds every token
DEQUANT_ONCE_M = 512  # from this many rows, dequantize once and multiply with torch's GEMM
# Decode tiles are 32 weight rows wide while that still gives about every SM of an H100 (132)
# a program (a 4096-wide output: 128): by the SASS, 32 rows cost 8-9 instructions per weight
# against 11-14 for 16 (fixed costs per tile: x fragments, addresses, scales).
_MIN_PROGRAMS = 128
_SLAB_ELEMENTS = 1 << 25  # dequantized rows at a time on the GEMM path: 64 MiB at 16 bits
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when triton is, at import


NF4_CODE = torch.tensor(kernels.NF4_VALUES, dtype=torch.float32)


def _table_bits(dtype: torch.dtype) -> tuple[int, ...]:
    return tuple(int(b) & 0xFFFF for b in NF4_CODE.to(dtype).view(torch.int16).tolist())


# The "prmt" lookup's PTX, the NF4 table in the activations' 16-bit dtype as immediates.
_PRMT_ASM = {
    torch.float16: kernels.prmt_lookup_asm(_table_bits(torch.float16), bf16=False),
    torch.bfloat16: kernels.prmt_lookup_asm(_table_bits(torch.bfloat16), bf16=True),
}


@functools.lru_cache(maxsize=16)
def _table_words(device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """The table words the "prmt" PTX takes in registers, on the device ([4] int32; zeros,
    unread, for "select": dtype None). Made on the first launch (a decode graph's warm-up
    run, before capture) and kept, so no launch copies from the host."""
    words = kernels.prmt_lookup_words(_table_bits(dtype)) if dtype is not None else [0] * 4
    return torch.tensor(words, dtype=torch.int32, device=device)


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
        """From a Params4bit's data and its QuantState (reads the offset and checks the code
        table once, at load: the kernels hold the NF4 table in registers, not `code`)."""
        s = quant_state
        assert s.quant_type == "nf4", f"only NF4 is supported, got {s.quant_type}"
        assert torch.equal(s.code.float().cpu(), NF4_CODE), "not bitsandbytes' NF4 code table"
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


@dataclass(frozen=True)
class NF4MatmulConfig:
    """Tiles of one launch; dequantize_once: the GEMM path (block_n x block_k slabs)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    dequantize_once: bool = False
    lookup: str | None = None  # "prmt" | "select"; None: prmt for 16-bit x on CUDA


def _block_k(in_features: int, blocksize: int, cap: int) -> int:
    """The largest power-of-two multiple of the blocksize up to cap that divides K."""
    block = blocksize
    while block * 2 <= cap and in_features % (block * 2) == 0:
        block *= 2
    return block


def nf4_matmul_config(num_tokens: int, out_features: int, weight: NF4Weight) -> NF4MatmulConfig:
    """Untuned tiles: decode holds all tokens in one row tile over narrow column tiles;
    mid-sized M tiles M and N; from DEQUANT_ONCE_M rows, dequantize once then GEMM."""
    k, blocksize = weight.in_features, weight.blocksize
    if num_tokens >= DEQUANT_ONCE_M:
        return NF4MatmulConfig(0, 64, _block_k(k, blocksize, 128), dequantize_once=True)
    if num_tokens <= SMALL_M:
        # tl.dot needs at least 16 rows and columns; narrow columns give the programs.
        block_m = max(16, triton.next_power_of_2(num_tokens))
        block_n = 32 if triton.cdiv(out_features, 32) >= _MIN_PROGRAMS else 16
        # At 64 rows, 128 columns of K keep the tile in registers and the pipeline's x
        # stages in a quarter of the shared memory.
        cap = 128 if block_m == 64 else 256
        return NF4MatmulConfig(block_m, block_n, _block_k(k, blocksize, cap), num_stages=4)
    return NF4MatmulConfig(64, 64, _block_k(k, blocksize, 128))


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


def _lookup(x: torch.Tensor, cfg: NF4MatmulConfig) -> tuple[str, str, torch.Tensor]:
    """(LOOKUP, its PTX, its table words) for x: the register table in PTX for 16-bit x, else
    selects (fp32 keeps the exact table; Triton's interpreter runs no inline assembly)."""
    lookup = cfg.lookup
    if lookup is None:
        lookup = "select" if x.dtype == torch.float32 or _INTERPRETED else "prmt"
    assert lookup in ("prmt", "select"), f"unknown lookup {lookup}"
    assert lookup == "select" or x.dtype != torch.float32, "fp32 needs the exact table"
    if lookup == "select":
        return lookup, "", _table_words(x.device, None)
    return lookup, _PRMT_ASM[x.dtype], _table_words(x.device, x.dtype)


def _weight_args(weight: NF4Weight) -> tuple[torch.Tensor, ...]:
    """packed, absmax, absmax2, code2 as the kernels take them (unused slots get `code`)."""
    nested = weight.nested
    absmax2 = weight.absmax2 if nested else weight.code
    code2 = weight.code2 if nested else weight.code
    assert absmax2 is not None and code2 is not None
    return weight.packed, weight.absmax, absmax2, code2


def _weight_constexprs(weight: NF4Weight) -> dict[str, object]:
    return dict(BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, NESTED=weight.nested)


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
    y = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y
    cfg = config or nf4_matmul_config(num_tokens, num_out, weight)
    assert weight.in_features % cfg.block_k == 0 and cfg.block_k % weight.blocksize == 0
    lookup, asm, words = _lookup(x, cfg)
    if cfg.dequantize_once:
        _dequantize_then_gemm(x, weight, bias, (start, stop), y, cfg)
        return y
    grid = (triton.cdiv(num_out, cfg.block_n), triton.cdiv(num_tokens, cfg.block_m))
    kernels.nf4_matmul_kernel[grid](
        x,
        *_weight_args(weight),
        words,
        bias if bias is not None else weight.code,
        y,
        num_tokens,
        num_out,
        weight.in_features // 2,
        start,
        weight.offset,
        x.stride(0),
        y.stride(0),
        **_weight_constexprs(weight),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        LOOKUP=lookup,
        LOOKUP_ASM=asm,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def nf4_dequantize(
    weight: NF4Weight, rows: tuple[int, int], out: torch.Tensor, config: NF4MatmulConfig
) -> None:
    """out: [stop - start, K] = the rows' dequantized weight in out's dtype, by the kernel."""
    start, stop = rows
    num_rows, k = out.shape
    assert k == weight.in_features and num_rows == stop - start and out.stride(1) == 1
    lookup, asm, words = _lookup(out, config)
    grid = (triton.cdiv(num_rows, config.block_n), k // config.block_k)
    kernels.nf4_dequantize_kernel[grid](
        *_weight_args(weight),
        words,
        out,
        num_rows,
        k // 2,
        start,
        weight.offset,
        out.stride(0),
        **_weight_constexprs(weight),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        LOOKUP=lookup,
        LOOKUP_ASM=asm,
        num_warps=config.num_warps,
    )


def _dequantize_then_gemm(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    rows: tuple[int, int],
    y: torch.Tensor,
    cfg: NF4MatmulConfig,
) -> None:
    """y = x @ W[rows].T (+ bias): a slab of at most _SLAB_ELEMENTS weights dequantized at a
    time, multiplied by torch's GEMM straight into y's columns (no copy of y)."""
    start, stop = rows
    k = weight.in_features
    slab_rows = max(cfg.block_n, _SLAB_ELEMENTS // k // cfg.block_n * cfg.block_n)
    slab = torch.empty(min(slab_rows, stop - start), k, dtype=x.dtype, device=x.device)
    for first in range(start, stop, slab_rows):
        last = min(first + slab_rows, stop)
        w = slab[: last - first]
        nf4_dequantize(weight, (first, last), w, cfg)
        out = y[:, first - start : last - start]
        if bias is None:
            torch.mm(x, w.T, out=out)
        else:
            torch.addmm(bias[first:last], x, w.T, out=out)
