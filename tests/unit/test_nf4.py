"""NF4 with double quantization: size per parameter, and outputs equal the dequantized model."""

from __future__ import annotations

import pytest
from torch import nn

from server.engine.sampling_params import SamplingParams
from server.model.loader import module_bytes
from server.model.quant import dequantized_linear, is_nf4

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def wide_model(tiny_model_dir):  # type: ignore[no-untyped-def]
    # Linears large enough that per-tensor constants (the NF4 code tables) are negligible.
    return tiny_model_dir("llama", hidden_size=256, intermediate_size=704)


def _quantized_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_nf4(m)]


def test_quantized_linears_take_about_half_a_byte_per_parameter(wide_model, make_engine):
    engine = make_engine(wide_model, quantize="nf4")
    linears = _quantized_linears(engine.model)
    assert len(linears) == 2 * engine.model_config.num_layers * 2  # qkv, o, gate_up, down

    def bytes_per_param(modules: list[nn.Module]) -> float:
        params = sum(m.in_features * m.out_features for m in modules)
        return sum(module_bytes(m) for m in modules) / params

    packed = [
        m for n, m in engine.model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj"))
    ]
    single = [m for m in linears if all(m is not p for p in packed)]
    # 4 bits a weight, plus per block of 64: one nested byte, or (packed linears, quantized
    # slice by slice: see server.model.quant.nf4_packed_linear) one float32 absmax.
    assert 0.50 < bytes_per_param(single) < 0.54  # small matrices: the 1 KiB nested code counts
    assert 0.5625 <= bytes_per_param(packed) < 0.58


def test_lm_head_and_embeddings_stay_unquantized(wide_model, make_engine):
    engine = make_engine(wide_model, quantize="nf4")
    head = engine.model.lm_head
    # A float linear (on a CPU the torch backend's oneDNN-prepacked subclass), never NF4.
    assert isinstance(head, nn.Linear) and not is_nf4(head)
    assert head.weight.dtype == engine.config.torch_dtype
    assert type(engine.model.model.embed_tokens) is nn.Embedding


def test_nf4_greedy_output_matches_the_dequantized_float_model(wide_model, make_engine):
    nf4 = make_engine(wide_model, quantize="nf4")
    dense = make_engine(wide_model, quantize="nf4")
    for parent in list(dense.model.modules()):
        for name, child in list(parent.named_children()):
            if is_nf4(child):
                setattr(parent, name, dequantized_linear(child))
    assert not _quantized_linears(dense.model)
    prompts = [[1, 5, 9, 33, 70], list(range(3, 30))]
    got = [o.token_ids for o in nf4.generate(prompts, GREEDY)]
    want = [o.token_ids for o in dense.generate(prompts, GREEDY)]
    assert got == want
