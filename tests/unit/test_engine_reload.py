"""In-place reload in the engine: a running request finishes on the old weights, a new one gets
the new weights (both token for token against PEFT), and the old device copy is freed when the
last request using it ends."""

from __future__ import annotations

from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import peft_greedy, save_peft_adapter

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPT = [1, 5, 9, 33, 70]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def test_running_request_keeps_old_weights_new_request_gets_new_and_old_copy_is_freed(
    tiny_model_dir, make_engine, tmp_path
):
    base = tiny_model_dir("llama")
    old_dir = save_peft_adapter(base, tmp_path / "v1", seed=1, **LORA)
    new_dir = save_peft_adapter(base, tmp_path / "v2", seed=2, **LORA)
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    engine = make_engine(base, registry=registry)
    old = registry.register_dir("a", old_dir)

    first = engine.add_request(PROMPT, GREEDY, adapter_name="a")
    tokens: dict[str, list[int]] = {first: []}
    while len(tokens[first]) < 3:  # running: its adapter read, admitted, three tokens made
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
    new, retired = registry.reload_dir("a", new_dir)
    assert retired == old
    engine.retire_adapter(old.adapter_id)
    assert engine.adapter_cache.get(old.adapter_id) is not None  # still used by `first`
    second = engine.add_request(PROMPT, GREEDY, adapter_name="a")
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.token_ids

    assert tokens[first] == peft_greedy(base, old_dir, PROMPT, GREEDY.max_tokens)
    assert tokens[second] == peft_greedy(base, new_dir, PROMPT, GREEDY.max_tokens)
    assert tokens[first] != tokens[second]
    assert engine.adapter_cache.get(old.adapter_id) is None
    assert registry.by_id(old.adapter_id) is None
    assert engine.adapter_cache.get(new.adapter_id) is not None


def test_a_request_queued_before_the_reload_runs_after_it_on_the_old_weights(
    tiny_model_dir, make_engine, tmp_path
):
    base = tiny_model_dir("llama")
    old_dir = save_peft_adapter(base, tmp_path / "v1", seed=1, **LORA)
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    engine = make_engine(base, registry=registry)
    old = registry.register_dir("a", old_dir)
    queued = engine.add_request(PROMPT, GREEDY, adapter_name="a")  # not yet on the device
    registry.reload_dir("a", save_peft_adapter(base, tmp_path / "v2", seed=2, **LORA))
    engine.retire_adapter(old.adapter_id)
    assert registry.by_id(old.adapter_id) is not None  # kept for the queued request
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == queued
            tokens = out.token_ids
    assert tokens == peft_greedy(base, old_dir, PROMPT, GREEDY.max_tokens)
    assert registry.by_id(old.adapter_id) is None


def test_an_unused_old_version_is_freed_at_once(tiny_model_dir, make_engine, tmp_path):
    base = tiny_model_dir("llama")
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    engine = make_engine(base, registry=registry)
    old = registry.register_dir("a", save_peft_adapter(base, tmp_path / "v1", seed=1, **LORA))
    engine.generate([PROMPT], GREEDY, ["a"])
    assert engine.adapter_cache.get(old.adapter_id) is not None
    registry.reload_dir("a", save_peft_adapter(base, tmp_path / "v2", seed=2, **LORA))
    engine.retire_adapter(old.adapter_id)
    assert engine.adapter_cache.get(old.adapter_id) is None
    assert registry.by_id(old.adapter_id) is None
