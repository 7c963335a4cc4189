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
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import TARGETS, ModelSize, random_model, synthetic_adapter
from bench.workload import WorkloadSpec, generate

logger = logging.getLogger("bench.prefix_cache")


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
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _engine(model_dir: Path, adapter_dirs: list[Path], caching: bool, args, data: Path):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    config = EngineConfig(
        model=str(model_dir),
        quantize="none",
        dtype="float32",
        max_num_seqs=args.max_batch,
        max_lora_rank=args.rank,
        max_loras=args.adapters,
        enable_prefix_caching=caching,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from server.engine.sampling_params import SamplingParams

    size = ModelSize(layers=args.layers, hidden=args.hidden, max_len=2048)
    root = args.cache_dir
    model_dir = random_model(root / f"model-{size.layers}x{size.hidden}-2k", size)
    adapter_dirs = [
        synthetic_adapter(root / f"ad-{size.layers}x{size.hidden}-r{args.rank}-{i}", size,
                          args.rank, TARGETS["attn"], seed=i)
        for i in range(args.adapters)
    ]  # fmt: skip
    params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    system, turns = _conversations(args, size.vocab)
    names = [f"a{i}" for i in range(args.adapters)]
    data = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    results: dict[str, object] = {"model": size.describe(), "threads": args.threads}

    # TTFT: warm every adapter's prefix with turn 0, then time turns 1.. one at a time.
    warm = [[*system, *turns[0]] for _ in names]
    timed = [[*system, *t] for t in turns[1:] for _ in names]
    timed_names = [n for _ in turns[1:] for n in names]
    ttft = {}
    for caching in (False, True):
        engine = _engine(model_dir, adapter_dirs, caching, args, data)
        _ttft_serial(engine, warm, names, params)
        runs = _ttft_serial(engine, timed, timed_names, params)
        ttft[caching] = runs
        del engine
    off = statistics.mean(t for t, _ in ttft[False])
    on = statistics.mean(t for t, _ in ttft[True])
    hits = [c for _, c in ttft[True]]
    bound = (args.system + args.turn) / args.turn
    results["ttft"] = {
        "off_mean_s": round(off, 4),
        "on_mean_s": round(on, 4),
        "speedup": round(off / on, 2),
        "bound_speedup": round(bound, 1),
        "share_of_bound": round(off / on / bound, 3),
        "mean_cached_tokens": round(statistics.mean(hits), 1),
    }

    # Throughput: every turn of every adapter at once.
    prompts = [[*system, *t] for t in turns for _ in names]
    all_names = [n for _ in turns for n in names]
    tput = {}
    for caching in (False, True):
        engine = _engine(model_dir, adapter_dirs, caching, args, data)
        engine.generate([[1, 5, 6, 7]] * 4, params, names[:4])  # warm-up, nothing shared
        tput[caching] = _throughput(engine, prompts, all_names, params)
        if caching:  # what the eviction policy weighs: measured rebuild costs per page
            clock = engine.eviction_clock
            block = engine.pool.geometry.block_size
            results["rebuild_ms_per_page"] = {
                "adapter": round(1e3 * clock.adapter_cost(), 4),
                f"kv_block_of_{block}": round(1e3 * clock.kv_block_cost(block), 4),
            }
        del engine
    results["throughput_tok_s"] = {
        "off": round(tput[False], 1),
        "on": round(tput[True], 1),
        "ratio": round(tput[True] / tput[False], 2),
    }

    # No sharing: S-LoRA's random prompts, interleaved repeats, one engine per mode.
    spec = WorkloadSpec(
        num_requests=args.no_sharing_requests,
        num_adapters=args.adapters,
        input_range=(64, 256),
        output_range=(16, 32),
        vocab=size.vocab,
    )
    reqs = generate(spec)
    engines = {c: _engine(model_dir, adapter_dirs, c, args, data) for c in (False, True)}
    sp = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    rnames = [names[r.adapter] for r in reqs]
    for engine in engines.values():  # warm-up: adapters resident, allocator warm
        engine.generate([r.prompt for r in reqs[:8]], sp[:8], rnames[:8])
    runs: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        # Distinct prompts each repeat, so a repeat never hits what the last one cached.
        prompts_i = [
            [1, *[(t + 7 * (i + 1)) % size.vocab or 3 for t in r.prompt[1:]]] for r in reqs
        ]
        for caching in (False, True) if i % 2 == 0 else (True, False):
            engine = engines[caching]
            start = time.perf_counter()
            outs = engine.generate(prompts_i, sp, rnames)
            runs[caching].append(
                sum(o.num_output_tokens for o in outs) / (time.perf_counter() - start)
            )
    off_t, on_t = statistics.median(runs[False]), statistics.median(runs[True])
    hit = engines[True].prefix_cache.stats.hit_tokens
    results["no_sharing_tok_s"] = {
        "off": round(off_t, 1),
        "on": round(on_t, 1),
        "cost": round(1 - on_t / off_t, 4),
        "runs_off": [round(x, 1) for x in runs[False]],
        "runs_on": [round(x, 1) for x in runs[True]],
        "hit_tokens": hit,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
