"""The Triton NF4 matmul computes what bitsandbytes' dequantize + F.linear computes.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets it up), over
small Llama-like shapes; bfloat16 is left to tests/gpu (the interpreter's tl.dot misreads it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from server.kernels.nf4_linear import TritonNF4Linear, use_nf4_kernel
from server.kernels.nf4_matmul import (
    NF4MatmulConfig,
    NF4Weight,
    nf4_matmul,
    nf4_matmul_config,
)
from server.model.quant import is_nf4
from tests.kernel_cases import assert_close, kernel_device, nf4_case

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


def test_split_k_and_tiled_paths_agree():
    case = nf4_case(256, 512, torch.float32, DEVICE)
    weight = _weight(case)
    x = torch.randn(20, 512, device=DEVICE)
    split = NF4MatmulConfig(block_m=32, block_n=64, block_k=128, split_k=4)
    tiled = NF4MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=1)
    assert_close(nf4_matmul(x, weight, config=split), case.reference(x), torch.float32)
    assert_close(nf4_matmul(x, weight, config=tiled), case.reference(x), torch.float32)


def test_small_batches_split_k_and_prefill_does_not():
    weight = _weight(nf4_case(256, 512, torch.float32, DEVICE))
    assert nf4_matmul_config(1, 256, weight).split_k > 1
    assert nf4_matmul_config(130, 256, weight).split_k == 1


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
