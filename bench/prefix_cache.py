"""Prefix caching, on and off, in one run: a long shared system prompt across many adapters,
and a workload with no sharing at all.

    python -m bench.prefix_cache --adapters 32 --system 1000

Three measurements, each with caching on and off on the same engine settings and trace:
- TTFT on hits: one request at a time (no queueing), each adapter's first turn warming its
  prefix, then later turns timed. The bound is the prefill of the new tokens alone:
  (system + turn) / turn tokens fewer to compute.
- Throughput: every turn of every adapter submitted at once (continuous batching).
- No sharing: random prompts (S-LoRA's workload), all at once; the cost of hashing and
  bookkeeping when nothing is ever reused, as a ratio (interleaved repeats, median).
- Pressure: a pool too small for every adapter's prefix and Zipf-popular adapters; caching
  off, on with plain LRU between idle adapters and cached blocks, and on with the default
  cost-weighted policy (server.memory.reclaim).
- Tenants: the throughput workload with each adapter's turns sent by 1, 2, ... --tenants
  tenants in turn (the prefix cache is partitioned by tenant: server.memory.prefix_cache), the
  hit rate and throughput each gives.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import TARGETS, ModelSize, random_model, synthetic_adapter
from bench.workload import WorkloadSpec, generate
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger("bench.prefix_cache")


PHASES_ORDER = ("ttft", "throughput", "no_sharing", "pressure", "tenants")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--system", type=int, default=1000, help="shared system prompt tokens")
    p.add_argument("--turn", type=int, default=24, help="user turn tokens")
    p.add_argument("--turns", type=int, default=3, help="turns per adapter")
    p.add_argument("--output", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--no-sharing-requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved no-sharing runs")
    p.add_argument("--phases", type=lambda t: t.split(","), default=list(PHASES_ORDER))
    p.add_argument("--pressure-pages", type=int, default=1200)
    p.add_argument("--pressure-requests", type=int, default=160)
    p.add_argument("--pressure-batch", type=int, default=8)
    p.add_argument("--tenants", type=int, default=3, help="most tenants in the tenants phase")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _engine(model_dir: Path, adapter_dirs: list[Path], caching: bool, args, data: Path, **kw):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    settings = dict(max_num_seqs=args.max_batch, max_loras=args.adapters)
    settings.update(kw)
    config = EngineConfig(
        model=str(model_dir),
        quantize="none",
        dtype="float32",
        max_lora_rank=args.rank,
        enable_prefix_caching=caching,
        **settings,
    )
    registry = open_registry(data / f"data-{caching}-{time.monotonic_ns()}", config)
    for i, path in enumerate(adapter_dirs):
        registry.register_dir(f"a{i}", path)
    return LLMEngine(config, registry=registry)


def _conversations(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]]]:
    rng = np.random.default_rng(0)
    system = [1, *rng.integers(3, vocab, size=args.system - 1).tolist()]
    turns = [rng.integers(3, vocab, size=args.turn).tolist() for _ in range(args.turns)]
    return system, turns


def _ttft_serial(engine, prompts, names, params) -> list[tuple[float, int]]:  # type: ignore[no-untyped-def]
    """(TTFT, cached tokens) of each request, run one at a time."""
    out = []
    for prompt, name in zip(prompts, names, strict=True):
        start = time.perf_counter()
        engine.add_request(prompt, params, adapter_name=name)
        first = None
        final = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                first = first or time.perf_counter()
                final = o
        assert first is not None and final is not None
        out.append((first - start, final.num_cached_tokens))
    return out


def _throughput(engine, prompts, names, params) -> float:  # type: ignore[no-untyped-def]
    """Generated tokens per second with every request submitted at once."""
    start = time.perf_counter()
    outs = engine.generate(prompts, params, names)
    return sum(o.num_output_tokens for o in outs) / (time.perf_counter() - start)


def _pressure(s: Setup) -> dict:
    """A pool too small for every adapter's prefix: Zipf-popular adapters, every request at
    once, caching off, on with plain LRU (rebuild costs taken as equal), and on with the
    measured costs (GreedyDual, the default)."""
    args = s.args
    rng = np.random.default_rng(1)
    n = args.pressure_requests
    picks = np.minimum(rng.zipf(1.3, size=n) - 1, args.adapters - 1)
    prompts = [[*s.system, *s.turns[i % len(s.turns)]] for i in range(n)]
    names = [f"a{int(a)}" for a in picks]
    kw = dict(num_pages=args.pressure_pages, max_num_seqs=args.pressure_batch)
    out: dict[str, object] = {
        "pool_pages": args.pressure_pages,
        "requests": n,
        "distinct_adapters": len(set(names)),
    }
    for label, caching, lru in (("off", False, False), ("lru", True, True), ("cost", True, False)):
        engine = s.engine(caching, **kw)
        if lru:  # every page equally dear to rebuild: GreedyDual reduces to LRU
            engine.eviction_clock.adapter_cost = lambda: 0.0  # type: ignore[method-assign]
            engine.eviction_clock.kv_block_cost = lambda block_size: 0.0  # type: ignore[method-assign]
        engine.generate([[1, 5, 6, 7]], s.params, ["a0"])  # warm-up
        start = time.perf_counter()
        outs = engine.generate(prompts, s.params, names)
        wall = time.perf_counter() - start
        row = {
            "tok_s": round(sum(o.num_output_tokens for o in outs) / wall, 1),
            "adapter_loads": engine.adapter_cache.stats.loads,
            "preemptions": engine.scheduler.num_preemptions,
        }
        if caching:
            st = engine.prefix_cache.stats
            row["hit_rate"] = round(st.hit_tokens / max(1, st.queried_tokens), 3)
            row["reclaimed_blocks"] = st.reclaimed_blocks
        out[label] = row
        del engine
    return out


@dataclass
class Setup:
    args: argparse.Namespace
    size: ModelSize
    model_dir: Path
    adapter_dirs: list[Path]
    data: Path
    system: list[int]
    turns: list[list[int]]
    params: SamplingParams
    names: list[str]

    def engine(self, caching: bool, **kw):  # type: ignore[no-untyped-def]
        return _engine(self.model_dir, self.adapter_dirs, caching, self.args, self.data, **kw)


def _ttft(s: Setup) -> dict:
    """Every adapter's first turn warms its prefix; later turns are timed one at a time."""
    warm = [[*s.system, *s.turns[0]] for _ in s.names]
    timed = [[*s.system, *t] for t in s.turns[1:] for _ in s.names]
    timed_names = [n for _ in s.turns[1:] for n in s.names]
    ttft = {}
    for caching in (False, True):
        engine = s.engine(caching)
        _ttft_serial(engine, warm, s.names, s.params)
        ttft[caching] = _ttft_serial(engine, timed, timed_names, s.params)
        del engine
    off = statistics.mean(t for t, _ in ttft[False])
    on = statistics.mean(t for t, _ in ttft[True])
    bound = (s.args.system + s.args.turn) / s.args.turn
    return {
        "off_mean_s": round(off, 4),
        "on_mean_s": round(on, 4),
        "speedup": round(off / on, 2),
        "bound_speedup": round(bound, 1),
        "share_of_bound": round(off / on / bound, 3),
        "mean_cached_tokens": round(statistics.mean(c for _, c in ttft[True]), 1),
    }


def _throughput_phase(s: Setup) -> dict:
    """Every turn of every adapter at once; also the rebuild costs the policy measured."""
    prompts = [[*s.system, *t] for t in s.turns for _ in s.names]
    names = [n for _ in s.turns for n in s.names]
    tput, out = {}, {}
    for caching in (False, True):
        engine = s.engine(caching)
        engine.generate([[1, 5, 6, 7]] * 4, s.params, s.names[:4])  # warm-up, nothing shared
        tput[caching] = _throughput(engine, prompts, names, s.params)
        if caching:
            clock, block = engine.eviction_clock, engine.pool.geometry.block_size
            out["rebuild_ms_per_page"] = {
                "adapter": round(1e3 * clock.adapter_cost(), 4),
                f"kv_block_of_{block}": round(1e3 * clock.kv_block_cost(block), 4),
            }
        del engine
    out.update(off=round(tput[False], 1), on=round(tput[True], 1))
    out["ratio"] = round(tput[True] / tput[False], 2)
    return out


def _no_sharing(s: Setup) -> dict:
    """S-LoRA's random prompts, interleaved repeats, one engine per mode; medians."""
    spec = WorkloadSpec(
        num_requests=s.args.no_sharing_requests,
        num_adapters=s.args.adapters,
        input_range=(64, 256),
        output_range=(16, 32),
        vocab=s.size.vocab,
    )
    reqs = generate(spec)
    engines = {c: s.engine(c) for c in (False, True)}
    sp = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    names = [s.names[r.adapter] for r in reqs]
    for engine in engines.values():  # warm-up: adapters resident, allocator warm
        engine.generate([r.prompt for r in reqs[:8]], sp[:8], names[:8])
    runs: dict[bool, list[float]] = {False: [], True: []}
    for i in range(s.args.repeats):
        # Distinct prompts each repeat, so a repeat never hits what the last one cached.
        prompts = [
            [1, *[(t + 7 * (i + 1)) % s.size.vocab or 3 for t in r.prompt[1:]]] for r in reqs
        ]
        for caching in (False, True) if i % 2 == 0 else (True, False):
            runs[caching].append(_throughput(engines[caching], prompts, names, sp))
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    return {
        "off": round(off, 1),
        "on": round(on, 1),
        "cost": round(1 - on / off, 4),
        "runs_off": [round(x, 1) for x in runs[False]],
        "runs_on": [round(x, 1) for x in runs[True]],
        "hit_tokens": engines[True].prefix_cache.stats.hit_tokens,
    }


def _tenants(s: Setup) -> dict:
    """The cost of the tenant partition: each adapter's turns sent by k tenants in turn (turn
    j by tenant j % k), all at once, caching on; k = 1 is the throughput phase's workload."""
    prompts = [[*s.system, *t] for t in s.turns for _ in s.names]
    names = [n for _ in s.turns for n in s.names]
    owners = [j for j in range(len(s.turns)) for _ in s.names]
    out = {}
    for k in range(1, s.args.tenants + 1):
        engine = s.engine(True)
        engine.generate([[1, 5, 6, 7]] * 4, s.params, s.names[:4])  # warm-up, nothing shared
        before = engine.prefix_cache.stats.hit_tokens, engine.prefix_cache.stats.queried_tokens
        start = time.perf_counter()
        for prompt, name, owner in zip(prompts, names, owners, strict=True):
            partition = f"tenant-{owner % k}".encode()
            engine.add_sequence(engine.requests.make(prompt, s.params, None, name, None, partition))
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        elapsed = time.perf_counter() - start
        st = engine.prefix_cache.stats
        hits, queried = st.hit_tokens - before[0], st.queried_tokens - before[1]
        out[f"{k}_tenants"] = {
            "hit_rate": round(hits / max(1, queried), 3),
            "tok_per_s": round(tokens / elapsed, 1),
        }
        del engine
    return out


PHASES = {
    "ttft": _ttft,
    "throughput": _throughput_phase,
    "no_sharing": _no_sharing,
    "pressure": _pressure,
    "tenants": _tenants,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    size = ModelSize(layers=args.layers, hidden=args.hidden, max_len=2048)
    root = args.cache_dir
    system, turns = _conversations(args, size.vocab)
    tag = f"{size.layers}x{size.hidden}-r{args.rank}"
    setup = Setup(
        args=args,
        size=size,
        model_dir=random_model(root / f"model-{size.layers}x{size.hidden}-2k", size),
        adapter_dirs=[
            synthetic_adapter(root / f"ad-{tag}-{i}", size, args.rank, TARGETS["attn"], seed=i)
            for i in range(args.adapters)
        ],
        data=Path(tempfile.mkdtemp(prefix="bench-prefix-")),
        system=system,
        turns=turns,
        params=SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True),
        names=[f"a{i}" for i in range(args.adapters)],
    )
    results: dict[str, object] = {"model": size.describe(), "threads": args.threads}
    for phase in args.phases:
        results[phase] = PHASES[phase](setup)
        logger.warning("%s: %s", phase, results[phase])
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
