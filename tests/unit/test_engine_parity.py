"""Greedy generations match transformers token for token (float32, unquantized)."""

from __future__ import annotations

import pytest

from server.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy, load_hf

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [
    [1, 5, 9, 33, 70],
    [1, 100, 4],
    list(range(3, 40)),
    [1, 250, 17, 17, 17, 8, 99, 140, 2, 64, 31],
]

VARIANTS = {
    "llama": ("llama", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
    "qwen2-bias": ("qwen2", {}),
    "llama-tied-embeddings": ("llama", {"tie_word_embeddings": True}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama3-rope": (
        "llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_prompt_matches_transformers(variant, tiny_model_dir, make_engine):
    arch, overrides = VARIANTS[variant]
    path = tiny_model_dir(arch, **overrides)
    engine, hf = make_engine(path), load_hf(path)
    prompt = PROMPTS[2]
    [out] = engine.generate([prompt], GREEDY)
    assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_concurrent_batch_of_different_lengths_matches_transformers(
    arch, tiny_model_dir, make_engine
):
    overrides = {"sliding_window": 8} if arch == "mistral" else {}
    path = tiny_model_dir(arch, **overrides)
    engine, hf = make_engine(path), load_hf(path)
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), prompt


def test_chunked_prefill_under_small_token_budget_matches_transformers(tiny_model_dir, make_engine):
    path = tiny_model_dir("llama")
    engine = make_engine(path, max_num_batched_tokens=7)
    hf = load_hf(path)
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), prompt


def test_requests_joining_a_running_batch_match_transformers(tiny_model_dir, make_engine):
    path = tiny_model_dir("qwen2")
    engine, hf = make_engine(path), load_hf(path)
    first = engine.add_request(PROMPTS[0], GREEDY)
    results: dict[str, list[int]] = {}
    steps = 0
    later: list[str] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        steps += 1
        if steps in (3, 6):  # join mid-decode of the first request
            later.append(engine.add_request(PROMPTS[len(later) + 1], GREEDY))
    assert results[first] == hf_greedy(hf, PROMPTS[0], 16)
    for i, rid in enumerate(later, start=1):
        assert results[rid] == hf_greedy(hf, PROMPTS[i], 16)
