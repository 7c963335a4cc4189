"""On a GPU, in fp16 and bf16: the NF4 matmul on Llama-3-8B's shapes equals bitsandbytes'
dequantize + F.linear. Skipped without CUDA (tests/unit covers the interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from server.kernels.nf4_matmul import NF4Weight, nf4_matmul
from tests.kernel_cases import assert_close, nf4_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = torch.device("cuda")
# (out, in) of Llama-3-8B's packed linears: qkv, o, gate_up, down.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SLICES = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}
DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 32, 33, 130, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_bitsandbytes_on_llama3_shapes(shape, num_tokens, dtype):
    out_features, in_features = SHAPES[shape]
    case = nf4_case(out_features, in_features, dtype, DEVICE, bias=shape == "qkv")
    weight = NF4Weight.from_bnb(case.linear.weight.data, case.linear.weight.quant_state)
    x = torch.randn(num_tokens, in_features, device=DEVICE).to(dtype)
    y = nf4_matmul(x, weight, case.bias)
    assert y.dtype == dtype
    assert_close(y, case.reference(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("num_tokens", [1, 64])
@pytest.mark.parametrize("shape", list(SLICES))
def test_packed_slices(shape, num_tokens, dtype):
    out_features, in_features = SHAPES[shape]
    case = nf4_case(out_features, in_features, dtype, DEVICE, bias=True)
    weight = NF4Weight.from_bnb(case.linear.weight.data, case.linear.weight.quant_state)
    x = torch.randn(num_tokens, in_features, device=DEVICE).to(dtype)
    start = 0
    for width in SLICES[shape]:
        rows = (start, start + width)
        assert_close(nf4_matmul(x, weight, case.bias, rows=rows), case.reference(x, rows), dtype)
        start += width


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_module_swap_matches_linear4bit(dtype):
    from server.kernels.nf4_linear import TritonNF4Linear

    case = nf4_case(4096, 4096, dtype, DEVICE, bias=True)
    x = torch.randn(4, 7, 4096, device=DEVICE).to(dtype)
    assert_close(TritonNF4Linear(case.linear)(x), case.linear(x), dtype)
