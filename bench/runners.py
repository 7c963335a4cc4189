"""Replay a workload in real time against loraplex and against transformers + PEFT baselines."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.common import mean, percentile
from bench.workload import Request


@dataclass
class Result:
    system: str
    num_requests: int
    wall: float  # first arrival to last finish
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.num_requests / self.wall

    def row(self) -> dict:
        return {
            "system": self.system,
            "req/s": round(self.throughput, 3),
            "tok/s": round(self.tokens / self.wall, 1),
            "mean latency s": round(mean(self.latency), 2),
            "p99 latency s": round(percentile(self.latency, 99), 2),
            "mean ttft s": round(mean(self.ttft), 2),
            "p99 ttft s": round(percentile(self.ttft, 99), 2),
            **self.extra,
        }


def run_loraplex(engine, requests: list[Request], names: list[str | None]) -> Result:  # type: ignore[no-untyped-def]
    """Continuous batching: requests join as they arrive, every step mixes adapters."""
    from server.engine.sampling_params import SamplingParams

    pending = deque(requests)
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    result = Result("loraplex", len(requests), 0.0)
    start = time.perf_counter()
    last = 0.0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
            rid = engine.add_request(r.prompt, params, str(r.index), names[r.adapter])
            arrival[rid] = r.arrival
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            first.setdefault(out.request_id, t)
            if out.finished:
                result.latency.append(t - arrival[out.request_id])
                result.ttft.append(first[out.request_id] - arrival[out.request_id])
                result.tokens += out.num_output_tokens
                last = t
    result.wall = last - requests[0].arrival
    if engine.adapter_cache is not None:
        s = engine.adapter_cache.stats
        result.extra = {
            "adapter loads": s.loads,
            "evictions": s.evictions,
            "preemptions": engine.scheduler.num_preemptions,
        }
    return result


class _FirstToken:
    """A transformers streamer that notes when the first new tokens of a batch appear."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _hf_generate(model, pad_id: int, batch: list[Request], adapter_names=None):  # type: ignore[no-untyped-def]
    """Left-padded static batch until the longest output; returns (first token time, end)."""
    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt) :] = 1
    streamer = _FirstToken()
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    new = max(r.output_len for r in batch)
    with torch.no_grad():
        model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=streamer,
            **extra,
        )
    return streamer.first, time.perf_counter()


def run_peft(  # type: ignore[no-untyped-def]
    model,
    requests: list[Request],
    names: list[str],
    max_batch: int,
    mixed: bool,
    pad_id: int = 0,
) -> Result:
    """transformers + PEFT serving loop: static batches of waiting requests.

    mixed=False is S-LoRA's PEFT baseline: a batch holds requests of one adapter (the oldest
    waiting one's), switched with set_adapter. mixed=True batches any adapters together via
    PEFT's `adapter_names`.
    """
    pending = deque(requests)
    waiting: list[Request] = []
    result = Result("peft-mixed" if mixed else "peft-one-adapter", len(requests), 0.0)
    start = time.perf_counter()
    last = 0.0
    sizes = []
    while pending or waiting:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            waiting.append(pending.popleft())
        if not waiting:
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        if mixed:
            batch = waiting[:max_batch]
            first, end = _hf_generate(model, pad_id, batch, [names[r.adapter] for r in batch])
        else:
            head = waiting[0].adapter
            batch = [r for r in waiting if r.adapter == head][:max_batch]
            model.set_adapter(names[head])
            first, end = _hf_generate(model, pad_id, batch)
        chosen = {r.index for r in batch}
        waiting = [r for r in waiting if r.index not in chosen]
        sizes.append(len(batch))
        for r in batch:
            result.latency.append(end - start - r.arrival)
            result.ttft.append((first or end) - start - r.arrival)
            result.tokens += r.output_len
        last = end - start
    result.wall = last - requests[0].arrival
    result.extra = {"mean batch": round(mean(sizes), 2)}
    return result


def load_peft(model_dir, adapter_dirs: list, names: list[str], progress: Callable | None = None):  # type: ignore[no-untyped-def]
    """A PeftModel over the base with every adapter loaded under its name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for path, name in zip(adapter_dirs[1:], names[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
        if progress:
            progress()
    return model.eval()
