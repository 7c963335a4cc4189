"""The step thread never reads an adapter from disk: a request whose adapter is cold waits while
the loader's thread reads it and the others keep stepping; an adapter the host cache cannot keep
still serves; one whose file cannot be read fails its own requests, alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from adapters import AdapterRegistry
from adapters.format import WEIGHTS_FILE
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import peft_greedy, save_peft_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
PROMPT = [1, 5, 9, 33, 70]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
READ_SECONDS = 0.5  # a slow disk


@pytest.fixture
def adapters(tiny_model_dir, tmp_path: Path) -> tuple[Path, dict[str, Path]]:  # type: ignore[no-untyped-def]
    base = tiny_model_dir("llama")
    dirs = {n: save_peft_adapter(base, tmp_path / n, seed=i, **LORA) for i, n in enumerate("abc")}
    return base, dirs


def _engine(make_engine, base: Path, dirs: dict[str, Path], data: Path, **kw) -> LLMEngine:  # type: ignore[no-untyped-def]
    registry = open_registry(data, make_engine(base).config)
    for name, path in dirs.items():
        registry.register_dir(name, path)
    return make_engine(base, registry=registry, **kw)


def _slow_reads(registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read of an adapter's file takes READ_SECONDS; the threads that read, in order."""
    readers: list[str] = []
    load = registry._load

    def slow_load(reg):  # type: ignore[no-untyped-def]
        readers.append(threading.current_thread().name)
        time.sleep(READ_SECONDS)
        return load(reg)

    monkeypatch.setattr(registry, "_load", slow_load)
    return readers


def test_a_cold_adapter_is_read_off_the_step_thread_while_the_others_keep_stepping(
    adapters, make_engine, tmp_path, monkeypatch
) -> None:
    base, dirs = adapters
    engine = _engine(make_engine, base, dirs, tmp_path / "data")
    readers = _slow_reads(engine.registry, monkeypatch)
    running = engine.add_request(PROMPT, LONG, adapter_name="a")
    while not any(o.request_id == running for o in engine.step()):  # "a" read, then running
        time.sleep(0.01)
    cold = engine.add_request(PROMPT, GREEDY, adapter_name="b")
    steps, slowest, running_tokens = 0, 0.0, 0
    cold_tokens: list[int] = []
    while not cold_tokens:
        start = time.perf_counter()
        outputs = engine.step()
        slowest = max(slowest, time.perf_counter() - start)
        steps += 1
        running_tokens += sum(o.request_id == running for o in outputs)
        cold_tokens = next((o.token_ids for o in outputs if o.request_id == cold), [])
    while engine.has_unfinished_requests():
        cold_tokens = next(
            (o.token_ids for o in engine.step() if o.request_id == cold), cold_tokens
        )
        if len(cold_tokens) == GREEDY.max_tokens:
            engine.abort_request(running)
    assert slowest < READ_SECONDS / 2, f"a step took {slowest:.3f} s: it waited for the read"
    assert running_tokens >= 3, "the running request stopped while the adapter was read"
    assert all(name.startswith("loraplex-loader") for name in readers), readers
    assert len(readers) == 2  # a, then b: each read once
    assert cold_tokens == peft_greedy(base, dirs["b"], PROMPT, GREEDY.max_tokens)


def test_a_request_for_a_cold_adapter_does_not_hold_back_those_behind_it(
    adapters, make_engine, tmp_path, monkeypatch
) -> None:
    base, dirs = adapters
    engine = _engine(make_engine, base, dirs, tmp_path / "data")
    engine.registry.warm(engine.registry.get("c").adapter_id)  # in host memory already
    _slow_reads(engine.registry, monkeypatch)
    cold = engine.add_request(PROMPT, GREEDY, adapter_name="b")
    warm = engine.add_request(PROMPT, GREEDY, adapter_name="c")
    base_model = engine.add_request(PROMPT, GREEDY)
    first = {o.request_id for o in engine.step()}
    assert first == {warm, base_model}  # admitted at once, past the request still loading
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outputs[cold].token_ids == peft_greedy(base, dirs["b"], PROMPT, GREEDY.max_tokens)


def test_adapters_the_host_cache_cannot_keep_still_serve_exactly(
    adapters, make_engine, tmp_path
) -> None:
    base, dirs = adapters
    engine = _engine(make_engine, base, dirs, tmp_path / "data")
    engine.registry._cache.capacity_bytes = 0  # nothing fits: every read is held, not cached
    names = ["a", "b", "c", "a"]
    got = engine.generate([PROMPT] * len(names), GREEDY, names)
    for name, out in zip(names, got, strict=True):
        assert out.token_ids == peft_greedy(base, dirs[name], PROMPT, GREEDY.max_tokens)
    assert engine.registry.stats.num_host_resident == 0


def test_an_adapter_whose_file_cannot_be_read_fails_its_requests_alone(
    adapters, make_engine, tmp_path
) -> None:
    base, dirs = adapters
    engine = _engine(make_engine, base, dirs, tmp_path / "data")
    (engine.registry.store.path("b") / WEIGHTS_FILE).unlink()  # the disk lost it
    names = ["a", "b", None, "b"]
    got = engine.generate([PROMPT] * len(names), GREEDY, names)
    for name, out in zip(names, got, strict=True):
        if name == "b":
            assert out.finish_reason == "error" and out.token_ids == []
            assert out.error == "adapter 'b' could not be read from the adapter store"
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    assert engine.generate([PROMPT], GREEDY, ["a"])[0].token_ids == got[0].token_ids
