"""The Triton NF4 matmul computes what bitsandbytes' dequantize + F.linear computes.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets it up), over
small Llama-like shapes; bfloat16 is left to tests/gpu (the interpreter's tl.dot misreads it).
The PTX lookup (the GPU's path for 16-bit activations) runs here through tests/ptx_emulator.py,
which gives the interpreter the few PTX instructions it uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import server.kernels.nf4_matmul as nf4_module
from server.kernels.nf4_kernels import NF4_VALUES, prmt_lookup_asm, prmt_lookup_words
from server.kernels.nf4_linear import TritonNF4Linear, use_nf4_kernel
from server.kernels.nf4_matmul import (
    DEQUANT_ONCE_M,
    NF4MatmulConfig,
    NF4Weight,
    nf4_matmul,
    nf4_matmul_config,
)
from server.model.quant import is_nf4
from tests.kernel_cases import INTERPRET, assert_close, kernel_device, nf4_case
from tests.ptx_emulator import emulate_inline_asm, run_ptx

DEVICE = kernel_device()
if DEVICE is None:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# Llama-like (out, in): hidden 256, 4 query heads and 1 KV head of 64, intermediate 512.
SHAPES = {"qkv": (384, 256), "o": (256, 256), "gate_up": (1024, 256), "down": (256, 512)}
TOKENS = (1, 3, 16, 33, 130)
DTYPES = (torch.float32, torch.float16)


def grid() -> list[pytest.param]:
    """Tokens x dtype x bias; the shapes take turns so each appears with both paths."""
    params, shapes = [], list(SHAPES)
    for i, m in enumerate(TOKENS):
        for j, dtype in enumerate(DTYPES):
            for bias in (False, True):
                shape = shapes[(i + 2 * j + int(bias)) % len(shapes)]
                name = f"m{m}-{str(dtype)[6:]}-{shape}{'-bias' if bias else ''}"
                params.append(pytest.param(m, dtype, shape, bias, id=name))
    return params


def _weight(case) -> NF4Weight:  # type: ignore[no-untyped-def]
    return NF4Weight.from_bnb(case.linear.weight.data, case.linear.weight.quant_state)


@pytest.mark.parametrize(("num_tokens", "dtype", "shape", "bias"), grid())
def test_matches_bitsandbytes_dequantize_and_linear(num_tokens, dtype, shape, bias):
    out_features, in_features = SHAPES[shape]
    case = nf4_case(out_features, in_features, dtype, DEVICE, bias=bias, seed=num_tokens)
    x = torch.randn(num_tokens, in_features, device=DEVICE).to(dtype)
    y = nf4_matmul(x, _weight(case), case.bias)
    assert y.dtype == dtype and y.shape == (num_tokens, out_features)
    assert_close(y, case.reference(x), dtype)


@pytest.mark.parametrize("num_tokens", [3, 33])
@pytest.mark.parametrize(
    ("shape", "widths"), [("qkv", (256, 64, 64)), ("gate_up", (512, 512))], ids=["qkv", "gate_up"]
)
def test_packed_slices_equal_the_columns_of_the_whole_output(num_tokens, shape, widths):
    out_features, in_features = SHAPES[shape]
    case = nf4_case(out_features, in_features, torch.float32, DEVICE, bias=True)
    weight = _weight(case)
    x = torch.randn(num_tokens, in_features, device=DEVICE)
    whole = nf4_matmul(x, weight, case.bias)
    start = 0
    for width in widths:
        rows = (start, start + width)
        part = nf4_matmul(x, weight, case.bias, rows=rows)
        assert_close(part, case.reference(x, rows), torch.float32)
        assert_close(part, whole[:, start : start + width], torch.float32)
        start += width


@pytest.mark.parametrize("num_tokens", [2, 40])
def test_widths_that_are_not_a_whole_tile(num_tokens):
    case = nf4_case(130, 1024, torch.float32, DEVICE, bias=True)
    x = torch.randn(num_tokens, 1024, device=DEVICE)
    weight = _weight(case)
    assert_close(nf4_matmul(x, weight, case.bias), case.reference(x), torch.float32)
    part = nf4_matmul(x, weight, case.bias, rows=(3, 70))
    assert_close(part, case.reference(x, (3, 70)), torch.float32)


@pytest.fixture
def ptx_lookup(monkeypatch):  # type: ignore[no-untyped-def]
    """The "prmt" lookup's config; in the interpreter, with the PTX emulator installed."""
    if INTERPRET:
        from triton.runtime.interpreter import InterpreterBuilder

        monkeypatch.setattr(InterpreterBuilder, "create_inline_asm", emulate_inline_asm)
    return "prmt"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ptx_lookup_gives_every_byte_its_two_scaled_nf4_values(dtype):
    """All 256 bytes through the PTX text, each with its own scale: per byte, the high
    nibble's value then the low nibble's, both times the scale, rounded once."""
    bits = lambda t: t.view(torch.int16).numpy().astype(np.uint16)  # noqa: E731
    table = torch.tensor(NF4_VALUES).to(dtype)
    asm = prmt_lookup_asm(tuple(int(b) for b in bits(table)), bf16=dtype == torch.bfloat16)
    words = [
        np.full(64, w & 0xFFFFFFFF, dtype=np.uint32)
        for w in prmt_lookup_words(tuple(int(b) for b in bits(table)))
    ]
    scales = (torch.rand(256) * 4 - 2).to(dtype)
    packed = np.arange(256, dtype=np.uint8).view(np.uint32)  # 4 bytes per instance
    pairs = bits(scales).astype(np.uint32) * 0x10001  # each byte's scale, twice
    operands = [packed, *pairs.reshape(64, 4).T, *(w for w in words for _ in range(4))]
    out = np.stack(run_ptx(asm, operands, 4), axis=1).reshape(-1)
    codes = torch.arange(256)
    want_hi = (table[codes >> 4].float() * scales.float()).to(dtype)
    want_lo = (table[codes & 15].float() * scales.float()).to(dtype)
    assert np.array_equal((out & 0xFFFF).astype(np.uint16), bits(want_hi))
    assert np.array_equal((out >> 16).astype(np.uint16), bits(want_lo))


@pytest.mark.parametrize("num_tokens", [1, 16, 33, 130])
@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_ptx_lookup_matches_bitsandbytes(num_tokens, shape, ptx_lookup):
    """The GPU's fp16 path: the NF4 table as PTX immediates (fp16, so within fp16 rounding)."""
    out_features, in_features = SHAPES[shape]
    case = nf4_case(out_features, in_features, torch.float16, DEVICE, bias=True, seed=3)
    x = torch.randn(num_tokens, in_features, device=DEVICE).half()
    base = nf4_matmul_config(num_tokens, out_features, _weight(case))
    config = NF4MatmulConfig(**{**base.__dict__, "lookup": ptx_lookup})
    assert_close(
        nf4_matmul(x, _weight(case), case.bias, config=config), case.reference(x), torch.float16
    )


@pytest.mark.parametrize(
    "config",
    [
        NF4MatmulConfig(block_m=16, block_n=16, block_k=256),
        NF4MatmulConfig(block_m=32, block_n=64, block_k=64, num_stages=2),
        NF4MatmulConfig(block_m=64, block_n=32, block_k=128),
    ],
    ids=["narrow", "wide", "tall"],
)
def test_tile_shapes_agree(config):
    case = nf4_case(256, 512, torch.float32, DEVICE, bias=True)
    x = torch.randn(20, 512, device=DEVICE)
    assert_close(
        nf4_matmul(x, _weight(case), case.bias, config=config), case.reference(x), torch.float32
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_large_batches_dequantize_once_in_slabs_then_gemm(dtype, monkeypatch):
    """From DEQUANT_ONCE_M rows: slabs of dequantized rows (three here, the last short),
    each multiplied straight into its columns of y, bias added; a packed slice too."""
    monkeypatch.setattr(nf4_module, "_SLAB_ELEMENTS", 100 * 512)  # slabs of 64 rows
    case = nf4_case(160, 512, dtype, DEVICE, bias=True)
    weight = _weight(case)
    assert nf4_matmul_config(DEQUANT_ONCE_M, 160, weight).dequantize_once
    x = torch.randn(DEQUANT_ONCE_M + 3, 512, device=DEVICE).to(dtype)
    assert_close(nf4_matmul(x, weight, case.bias), case.reference(x), dtype)
    assert_close(
        nf4_matmul(x, weight, case.bias, rows=(32, 150)), case.reference(x, (32, 150)), dtype
    )


def test_decode_holds_all_tokens_in_one_row_tile_and_prefill_dequantizes_once():
    weight = _weight(nf4_case(256, 512, torch.float32, DEVICE))
    for num_tokens in (1, 7, 33, 64):
        config = nf4_matmul_config(num_tokens, 256, weight)
        assert config.block_m >= num_tokens and not config.dequantize_once
    assert not nf4_matmul_config(DEQUANT_ONCE_M - 1, 256, weight).dequantize_once
    assert nf4_matmul_config(2048, 256, weight).dequantize_once


def test_plain_absmax_without_double_quantization():
    case = nf4_case(128, 256, torch.float32, DEVICE, bias=True, nested=False)
    weight = _weight(case)
    assert not weight.nested
    x = torch.randn(5, 256, device=DEVICE)
    assert_close(nf4_matmul(x, weight, case.bias), case.reference(x), torch.float32)


def test_torch_dequantize_is_bitsandbytes_bit_for_bit():
    case = nf4_case(384, 256, torch.float32, DEVICE)
    assert torch.equal(_weight(case).dequantize(), case.dense)


def test_no_tokens_gives_an_empty_output():
    case = nf4_case(128, 256, torch.float32, DEVICE)
    y = nf4_matmul(torch.empty(0, 256, device=DEVICE), _weight(case))
    assert y.shape == (0, 128)


def test_module_swap_computes_what_linear4bit_computes():
    case = nf4_case(384, 256, torch.float32, DEVICE, bias=True)
    x = torch.randn(2, 3, 256, device=DEVICE)  # [B, S, in]
    swapped = TritonNF4Linear(case.linear)
    assert_close(swapped(x), case.linear(x), torch.float32)


def test_swap_replaces_every_supported_nf4_linear_and_keeps_the_rest():
    model = nn.Sequential(
        nf4_case(128, 256, torch.float32, DEVICE).linear,
        nf4_case(256, 96, torch.float32, DEVICE).linear,  # rows of 96 are not whole blocks
        nn.Linear(8, 8),
    )
    assert use_nf4_kernel(model) == 1
    assert isinstance(model[0], TritonNF4Linear)
    assert is_nf4(model[1])
    assert type(model[2]) is nn.Linear
