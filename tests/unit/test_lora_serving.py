"""Many adapters in one batch: every request gets exactly what PEFT gives with its adapter alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.hf_reference import hf_greedy, load_hf
from tests.peft_reference import peft_greedy, save_peft_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

# name -> LoraConfig arguments (plus our rope_scaling_factor extension)
ADAPTERS: dict[str, dict] = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-linear-r2": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 8},
        alpha_pattern={"down_proj": 32},
    ),
    "rslora-r16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"]),
    "layer1-only": dict(
        r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1]
    ),
    "norms-embed": dict(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm", "embed_tokens"],
    ),
    "rope-x2": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rope_scaling_factor=2.0
    ),
}
PROMPTS = [[1, 5, 9, 33, 70], [1, 100, 4, 8], list(range(3, 30))]


def _adapters(base: Path, root: Path, names: list[str]) -> dict[str, Path]:
    return {
        name: save_peft_adapter(base, root / name, seed=i, **ADAPTERS[name])
        for i, name in enumerate(names)
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_mixed_batch_of_adapters_matches_peft_one_adapter_at_a_time(
    arch, tiny_model_dir, make_engine, tmp_path
):
    base = tiny_model_dir(arch)
    dirs = _adapters(base, tmp_path / "peft", list(ADAPTERS))
    engine = make_engine(base, max_lora_rank=16)
    registry = open_registry(tmp_path / "data", engine.config)
    engine = make_engine(base, registry=registry, max_lora_rank=16)
    for name, path in dirs.items():
        registry.register_dir(name, path)

    requests = [(None, p) for p in PROMPTS[:2]]
    requests += [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(dirs)]
    outs = engine.generate([p for _, p in requests], GREEDY, [a for a, _ in requests])

    hf = load_hf(base)
    for (adapter, prompt), out in zip(requests, outs, strict=True):
        if adapter is None:
            want = hf_greedy(hf, prompt, GREEDY.max_tokens)
        else:
            want = peft_greedy(base, dirs[adapter], prompt, GREEDY.max_tokens)
        assert out.token_ids == want, adapter
    assert engine.adapter_cache.num_resident == len(dirs)


def test_triton_backend_gives_the_same_tokens_as_the_torch_path(
    tiny_model_dir, make_engine, tmp_path
):
    """The whole engine with the Triton kernels (the Triton interpreter when there is no GPU)."""
    base = tiny_model_dir("llama")
    names = ["attn-r4", "patterns", "rslora-r16", "layer1-only"]
    dirs = _adapters(base, tmp_path / "peft", names)
    outs = {}
    for backend in ("torch", "triton"):
        engine = make_engine(base, max_lora_rank=16)
        registry = open_registry(tmp_path / f"data-{backend}", engine.config)
        for name, path in dirs.items():
            registry.register_dir(name, path)
        engine = make_engine(base, registry=registry, max_lora_rank=16, lora_backend=backend)
        assert engine.adapter_cache.lora_ops.name == backend
        requests = [(n, PROMPTS[i % len(PROMPTS)]) for i, n in enumerate([None, *names])]
        small = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        result = engine.generate([p for _, p in requests], small, [a for a, _ in requests])
        outs[backend] = [o.token_ids for o in result]
        base_only = engine.generate([p for _, p in requests], small)
    assert outs["triton"] == outs["torch"]
    # The adapters must matter, or equal outputs would prove nothing.
    assert [o.token_ids for o in base_only][1:] != outs["torch"][1:]
