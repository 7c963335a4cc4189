"""The engine with the Triton NF4 matmul and paged attention generates what the torch path does.

Without a GPU the kernels run in Triton's interpreter, so this is the real kernel code in the
real engine: packed qkv/gate_up NF4 linears, decode and chunked prefill in one step, GQA,
Mistral's sliding window, Qwen2's biases.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from server.config import ConfigError, EngineConfig
from server.engine.backends import Backends
from server.engine.sampling_params import SamplingParams
from server.kernels.nf4_linear import TritonNF4Linear
from server.kernels.paged_attention import paged_attention_layer
from server.model.quant import is_nf4
from tests.kernel_cases import kernel_device

if kernel_device() is None:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 33, 70], [1, 100, 4], list(range(3, 40))]
# A budget of 16 tokens splits the long prompt into chunks that share steps with decodes.
VARIANTS = {
    "llama-nf4": ("llama", {}, "nf4"),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}, "none"),
    "qwen2-bias-nf4": ("qwen2", {}, "nf4"),
}


def _generate(engine) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_equal_the_torch_path(variant, tiny_model_dir, make_engine):
    arch, overrides, quantize = VARIANTS[variant]
    path = tiny_model_dir(arch, **overrides)
    settings = dict(quantize=quantize, max_num_batched_tokens=16)
    want = _generate(make_engine(path, kernel_backend="torch", **settings))
    engine = make_engine(path, kernel_backend="triton", **settings)
    assert all(a.paged_kernel is paged_attention_layer for a in engine.model.attention_layers())
    if quantize == "nf4":
        linears = [m for m in engine.model.modules() if isinstance(m, TritonNF4Linear)]
        assert len(linears) == 4 * engine.model_config.num_layers
        assert not any(is_nf4(m) for m in engine.model.modules())
    assert _generate(engine) == want


def test_stale_nan_in_the_pool_never_reaches_the_tokens(tiny_model_dir, make_engine):
    """Pages come back from other requests (or from adapters) holding anything."""
    path = tiny_model_dir("llama")
    want = _generate(make_engine(path, kernel_backend="torch", max_num_batched_tokens=16))
    engine = make_engine(path, kernel_backend="triton", max_num_batched_tokens=16)
    engine.pool.buffer.fill_(float("nan"))
    assert _generate(engine) == want


def test_auto_picks_the_torch_path_on_cpu():
    config = EngineConfig(device="cpu")
    assert config.kernel_backend == "auto"
    assert Backends.choose(config).kernels.name == "torch"


def test_an_unknown_backend_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--kernel-backend"):
        EngineConfig(kernel_backend="cuda")


def test_torch_path_keeps_bitsandbytes_linears(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir("llama"), quantize="nf4", kernel_backend="torch")
    assert sum(is_nf4(m) for m in engine.model.modules()) == 4 * engine.model_config.num_layers
    assert all(a.paged_kernel is None for a in engine.model.attention_layers())
    assert torch.device("cpu") == engine.device
