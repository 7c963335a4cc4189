"""Cold adapters under load: do running sequences stall while adapters are read from disk?

    python -m bench.cold_adapters --json docs/results/cold_adapters.json

32 sequences decode (on 4 resident adapters) while requests for 100 other adapters arrive
(Poisson); each such adapter is on disk only, and the host cache is too small to keep them.
The figure is the running sequences' inter-token latency while those requests arrive and are
served, against the same run with all 100 adapters already in host memory ("warm"). The
engine is driven offline, one step after another as the server's step thread does, so a
step that reads an adapter's file holds every running sequence for the read.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import TARGETS, ModelSize, mean, percentile, random_model, synthetic_adapter

logger = logging.getLogger("bench.cold_adapters")
NUM_RUNNING = 32
NUM_WARM = 4  # adapters of the running sequences, resident throughout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cold", type=int, default=100, help="adapters requested once each")
    p.add_argument("--rate", type=float, default=10.0, help="their arrivals per second")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", choices=sorted(TARGETS), default="all-linear")
    p.add_argument("--host-cache-mb", type=int, default=16, help="the cold run's host cache")
    p.add_argument(
        "--disk-mb-per-s",
        type=float,
        default=None,
        help="also wait as a disk of this read bandwidth would (the files are in page cache)",
    )
    p.add_argument("--running-tokens", type=int, default=960, help="at most; stopped at the end")
    p.add_argument("--cold-tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved cold and warm runs")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _engine(model_dir: Path, data_dir: Path, host_cache_mb: int, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    config = EngineConfig(
        model=str(model_dir),
        quantize="none",
        dtype="float32",
        max_num_seqs=NUM_RUNNING * 2,
        max_lora_rank=args.rank,
        max_loras=16,
        host_cache_mb=host_cache_mb,
        max_model_len=args.running_tokens + 32,
    )
    return LLMEngine(config, registry=open_registry(data_dir, config))


def _emulate_disk(registry, mb_per_s: float) -> None:  # type: ignore[no-untyped-def]
    """Each read of an adapter's file also waits size / bandwidth, sleeping (as I/O does, the
    GIL released): this machine reads the files from its page cache."""
    load = registry._load

    def slow_load(reg):  # type: ignore[no-untyped-def]
        path = registry.store.path(reg.name)
        size = sum(f.stat().st_size for f in path.iterdir())
        time.sleep(size / 2**20 / mb_per_s)
        return load(reg)

    registry._load = slow_load


def run(engine, names: list[str], warm: bool, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Running sequences' inter-token latency while the cold requests arrive and are served."""
    from server.engine.sampling_params import SamplingParams

    registry = engine.registry
    if args.disk_mb_per_s:
        _emulate_disk(registry, args.disk_mb_per_s)
    if warm:
        for name in names[NUM_WARM:]:
            registry.warm(registry.get(name).adapter_id)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(3, 1000) for _ in range(16)]
    long = SamplingParams(max_tokens=args.running_tokens, temperature=0, ignore_eos=True)
    running = {
        engine.add_request(prompt, long, f"run-{i}", names[i % NUM_WARM])
        for i in range(NUM_RUNNING)
    }
    started: set[str] = set()
    while started != running:  # every running sequence past its prefill
        started |= {o.request_id for o in engine.step()}
    cold = names[NUM_WARM:]
    arrivals, t = [], 0.0
    for _ in cold:
        t += rng.expovariate(args.rate)
        arrivals.append(t)
    short = SamplingParams(max_tokens=args.cold_tokens, temperature=0, ignore_eos=True)
    last: dict[str, float] = {}
    gaps: list[float] = []
    ttft: list[float] = []
    pending = set()
    added = 0
    start = time.perf_counter()
    while added < len(cold) or pending:
        now = time.perf_counter()
        while added < len(cold) and arrivals[added] <= now - start:
            rid = engine.add_request(prompt, short, f"cold-{added}", cold[added])
            pending.add(rid)
            last[rid] = start + arrivals[added]
            added += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            if rid in running:
                if rid in last:
                    gaps.append(now - last[rid])
                last[rid] = now
            elif rid in pending:
                if out.num_prompt_tokens and len(out.token_ids) == 1:
                    ttft.append(now - last[rid])
                if out.finished:
                    pending.discard(rid)
        if not outputs:
            time.sleep(0.0005)  # nothing ran: let a loader thread have the cores
    wall = time.perf_counter() - start
    for rid in running:
        engine.abort_request(rid)
    cache = engine.adapter_cache
    return {
        "warm": warm,
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 2),
        "itl_p99_ms": round(1000 * percentile(gaps, 99), 2),
        "itl_max_ms": round(1000 * max(gaps), 2),
        "itl_mean_ms": round(1000 * mean(gaps), 2),
        "cold_ttft_p50_s": round(percentile(ttft, 50), 3),
        "cold_ttft_p99_s": round(percentile(ttft, 99), 3),
        "wall_s": round(wall, 2),
        "device_loads": cache.stats.loads,
        "disk_reads": registry.stats.host_loads,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    size = ModelSize(layers=args.layers, hidden=args.hidden)
    model_dir = random_model(args.cache_dir / f"model-{size.layers}x{size.hidden}", size)
    root = args.cache_dir / f"cold-{size.layers}x{size.hidden}-r{args.rank}-{args.targets}"
    count = NUM_WARM + args.cold
    dirs = [
        synthetic_adapter(root / f"a{i:03d}", size, args.rank, TARGETS[args.targets], seed=i)
        for i in range(count)
    ]
    adapter_mb = sum(f.stat().st_size for f in dirs[0].iterdir()) / 2**20
    names = [f"a{i:03d}" for i in range(count)]
    data_dir = root / "store"  # registered once, then indexed from disk by each run
    results = []
    for _ in range(args.repeats):
        for warm in (False, True):
            host_mb = args.host_cache_mb if not warm else int(adapter_mb * count) + 64
            engine = _engine(model_dir, data_dir, host_mb, args)
            for name, d in zip(names, dirs, strict=True):
                if engine.registry.get(name) is None:
                    engine.registry.register_dir(name, d)
            # What start-up built stays: without this a full collection walks it (~350k
            # objects, ~0.35 s here), a pause that would swamp what is measured.
            gc.collect()
            gc.freeze()
            result = run(engine, names, warm, args)
            result["host_cache_mb"] = host_mb
            results.append(result)
            print(json.dumps(result), flush=True)
            engine.adapter_cache.shutdown()
            gc.unfreeze()
    p99 = {
        kind: statistics.median(r["itl_p99_ms"] for r in results if r["warm"] == (kind == "warm"))
        for kind in ("cold", "warm")
    }
    summary = {
        "model": size.describe(),
        "adapter": f"rank {args.rank}, {args.targets}, {adapter_mb:.1f} MiB on disk",
        "cold_adapters": args.cold,
        "rate": args.rate,
        "disk_mb_per_s": args.disk_mb_per_s,
        "threads": args.threads,
        "median_p99_itl_ms": p99,
        "p99_itl_cold_over_warm": round(p99["cold"] / p99["warm"], 2),
        "runs": results,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
