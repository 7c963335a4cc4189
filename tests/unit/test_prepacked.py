"""oneDNN-prepacked linears: which modules the torch backend swaps, and what they compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.backends import KERNELS
from server.model.prepacked import PrepackedLinear, prepack_linears

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN"
)


@pytest.mark.parametrize("rows", [1, 3, 64, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    packed = PrepackedLinear(linear)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        got, want = packed(x), linear(x)
    assert got.shape == want.shape == (2, rows, 160)
    # Another GEMM's summation order: float32 rounding apart, never more.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prepacked_linear_keeps_the_dense_weight_it_was_built_from():
    linear = nn.Linear(8, 4)
    packed = PrepackedLinear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    assert set(packed.state_dict()) == {"weight", "bias"}


def test_only_float32_cpu_linears_are_swapped():
    model = nn.Sequential(
        nn.Linear(8, 8),
        nn.Linear(8, 8).to(torch.bfloat16),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Embedding(10, 8),
    )
    assert prepack_linears(model) == 2
    kinds = [type(m) for m in (model[0], model[1], model[2][0])]
    assert kinds == [PrepackedLinear, nn.Linear, PrepackedLinear]
    assert prepack_linears(model) == 0  # already swapped: nothing left to pack


def test_tied_head_still_reads_the_embedding():
    embed = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    prepack_linears(model)
    assert isinstance(model["head"], PrepackedLinear)
    assert model["head"].weight is embed.weight


def test_torch_backend_prepacks_the_serving_model(tiny_model_dir):
    from server.model.loader import load_model

    model = load_model(tiny_model_dir(), torch.float32)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    KERNELS["torch"].adapt(model)
    assert linears > 0
    assert sum(isinstance(m, PrepackedLinear) for m in model.modules()) == linears
