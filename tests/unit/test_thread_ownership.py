"""Threads own data: only the step thread touches the engine's scheduler, KV tier and adapter
residency, whatever the event loop does at the same time (requests, removals, reloads, adapter
listings, metrics snapshots); and the waiting count the loop reads counts what it should."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

from server.engine.async_engine import AsyncLLMEngine
from server.engine.errors import AdapterBusyError
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import save_peft_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _guard(obj: object, owner: Callable[[], threading.Thread | None], seen: list[str]) -> None:
    """Record every call of obj's methods made off the thread owner() names while it runs
    (once it has ended, shutting down may touch what it owned)."""
    for name in dir(type(obj)):
        if name.startswith("__") or not callable(getattr(type(obj), name, None)):
            continue
        method = getattr(obj, name)

        @functools.wraps(method)
        def guarded(*args: Any, _m: Any = method, _n: str = name, **kwargs: Any) -> Any:
            thread, step = threading.current_thread(), owner()
            if thread is not step and step is not None and step.is_alive():
                seen.append(f"{type(obj).__name__}.{_n} on {thread.name}")
            return _m(*args, **kwargs)

        setattr(obj, name, guarded)


def test_only_the_step_thread_touches_the_scheduler_the_kv_tier_and_the_residency(
    tiny_model_dir, make_engine, tmp_path
) -> None:
    base = tiny_model_dir("llama")
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    dirs = {n: save_peft_adapter(base, tmp_path / n, seed=i, **LORA) for i, n in enumerate("abc")}
    for name, path in dirs.items():
        registry.register_dir(name, path)
    llm = make_engine(base, registry=registry)
    wrong: list[str] = []

    async def drive() -> None:
        engine = AsyncLLMEngine(llm)
        engine.start()
        step_thread = lambda: engine._thread  # noqa: E731
        for part in (llm.scheduler, llm.kv, llm.adapter_cache, llm.prefix_cache):
            _guard(part, step_thread, wrong)

        async def request(name: str | None) -> list[int]:
            seq = engine.prepare([1, 5, 9, 33], GREEDY, adapter_name=name)
            tokens: list[int] = []
            async for out in engine.stream(seq):
                tokens = out.token_ids
            return tokens

        async def administer() -> None:
            for _ in range(5):
                await engine.adapter_usage([r.adapter_id for r in registry.list()])
                await engine.snapshot()
                await engine.adapter_levels()
                assert engine.num_waiting >= 0
                await asyncio.sleep(0.01)
            _new, old = await asyncio.to_thread(registry.reload_dir, "b", dirs["c"])
            await engine.retire_adapter(old.adapter_id)
            with contextlib.suppress(AdapterBusyError):
                await engine.remove_adapter("c")

        results = await asyncio.gather(
            *(request(n) for n in ["a", "b", None, "c", "a", "b"]), administer()
        )
        assert all(len(tokens) == GREEDY.max_tokens for tokens in results[:-1])
        await engine.stop()

    asyncio.run(drive())
    assert not wrong, sorted(set(wrong))


def test_the_waiting_count_covers_requests_still_on_their_way_to_the_engine(
    tiny_model_dir, make_engine
) -> None:
    llm = make_engine(tiny_model_dir("llama"))

    async def drive() -> list[int]:
        engine = AsyncLLMEngine(llm)
        engine.start()
        counts = [engine.num_waiting]
        gate = threading.Event()
        busy = asyncio.ensure_future(engine._call(gate.wait))  # the step thread, held
        await asyncio.sleep(0.05)
        streams = [engine.stream(engine.prepare([1, 5, 9], GREEDY)) for _ in range(3)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0.05)  # in the inbox; the step thread has not seen them
        counts.append(engine.num_waiting)
        gate.set()
        await busy
        await asyncio.gather(*firsts)  # admitted: each has its first token
        counts.append(engine.num_waiting)
        for s in streams:
            await s.aclose()
        await engine.stop()
        return counts

    assert asyncio.run(drive()) == [0, 3, 0]
