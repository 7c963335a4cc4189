"""The Triton kernels on the real model's shape: SmolLM2-135M's first layer (9 query heads over
3 KV heads, a GQA group of 3, head_dim 64, hidden 576, intermediate 1536), its real weights.

The engine runs the layer with every kernel backend set to Triton (NF4 matmul, paged
attention, batched LoRA: the public launchers the engine calls; Triton's interpreter without
a GPU) and again with the torch paths, a PEFT adapter on some of the requests; logits agree
to fp32 accumulation error, greedy tokens exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import save_peft_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Hello"]


@pytest.fixture(scope="module")
def one_layer(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct cut to its first decoder layer (same shapes, real weights)."""
    out = tmp_path_factory.mktemp("smollm2-1-layer") / "model"
    out.mkdir()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    weights = load_file(str(smollm2_dir / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or ".0." in k}
    save_file(kept, str(out / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


def _run(model_dir: Path, adapter: Path, data_dir: Path, backend: str) -> list:  # type: ignore[type-arg]
    config = EngineConfig(
        model=str(model_dir),
        quantize="nf4",
        dtype="float32",
        device="cpu",
        pool_mb=32,
        max_model_len=256,
        max_lora_rank=8,
        lora_backend=backend,
        kernel_backend=backend,
    )
    registry = open_registry(data_dir, config)
    engine = LLMEngine(config, registry=registry)
    registry.register_dir("a", adapter)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=5)
    return engine.generate(prompts, greedy, ["a", None, "a"])


def test_triton_kernels_on_smollm2s_layer_shape_match_the_torch_path(one_layer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    adapter = save_peft_adapter(
        one_layer, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear"
    )
    torch_outs = _run(one_layer, adapter, tmp_path / "torch", "torch")
    triton_outs = _run(one_layer, adapter, tmp_path / "triton", "triton")
    for want, got in zip(torch_outs, triton_outs, strict=True):
        assert got.token_ids == want.token_ids
        for want_step, got_step in zip(want.logprobs, got.logprobs, strict=True):
            want_top, got_top = dict(want_step.top), dict(got_step.top)
            assert want_top.keys() == got_top.keys()
            for token, value in want_top.items():
                assert abs(got_top[token] - value) < 1e-3, (token, value, got_top[token])
