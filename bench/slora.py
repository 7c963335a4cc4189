"""S-LoRA-style serving benchmark: loraplex vs transformers + PEFT on the same model and trace.

    python -m bench.slora --adapters 5,100,1000 --peft-at 100 [--model default|DIR|FILE.gguf]

Replays a Poisson trace with power-law adapter popularity and mixed ranks in real time against
loraplex (continuous batching, batched heterogeneous LoRA), PEFT serving one adapter per batch
(S-LoRA's baseline) and PEFT's mixed-adapter batch (`adapter_names`). Prints one table and
writes JSON (and a plot with --plot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import TARGETS, ModelSize, random_model, real_model, synthetic_adapter
from bench.runners import Result, load_peft, run_loraplex, run_peft
from bench.workload import WorkloadSpec, generate

logger = logging.getLogger("bench.slora")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=_ints, default=[5, 100, 1000], help="adapter counts")
    p.add_argument("--peft-at", type=_ints, default=[100], help="counts to run PEFT at")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="arrivals per second")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0, help="popularity power (1: uniform)")
    p.add_argument("--ranks", type=_ints, default=[8, 16, 32, 64])
    p.add_argument("--targets", choices=sorted(TARGETS), default="attn")
    p.add_argument("--input-range", type=_ints, default=[8, 64])
    p.add_argument("--output-range", type=_ints, default=[8, 64])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--quantize", choices=["none", "nf4"], default="none")
    p.add_argument(
        "--model",
        default=None,
        help="a pretrained model: 'default' (SmolLM2-135M-Instruct), a directory or a .gguf; "
        "without it, a random model of --layers x --hidden",
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of loraplex per count")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a throughput plot here")
    return p.parse_args(argv)


def _engine(model_dir: Path, data_dir: Path, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.setup import open_registry

    config = EngineConfig(
        model=str(model_dir),
        quantize=args.quantize,
        dtype="float32",
        max_num_seqs=args.max_batch,
        max_lora_rank=max(args.ranks),
        max_loras=args.max_batch,
    )
    registry = open_registry(data_dir, config)
    return config, registry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.model:
        model_dir, size = real_model(args.model)
        shape = model_dir.name
    else:
        size = ModelSize(layers=args.layers, hidden=args.hidden)
        model_dir = random_model(args.cache_dir / f"model-{size.layers}x{size.hidden}", size)
        shape = f"{size.layers}x{size.hidden}"
    targets = TARGETS[args.targets]
    total = max(args.adapters + args.peft_at)
    ranks = "-".join(map(str, args.ranks))
    cache = args.cache_dir / f"adapters-{shape}-{args.targets}-r{ranks}"
    adapter_dirs = [
        synthetic_adapter(
            cache / f"a{i}",
            size,
            args.ranks[i % len(args.ranks)],
            targets,
            seed=i,
        )
        for i in tqdm(range(total), desc="adapters", leave=False)
    ]
    names = [f"a{i}" for i in range(total)]
    print(
        f"model: {args.model or 'random'}, {size.describe()}, {args.quantize}, "
        f"{args.threads} threads; adapters: ranks "
        f"{args.ranks} on {args.targets}; trace: {args.requests} requests at {args.rate}/s, "
        f"alpha {args.alpha}, inputs {args.input_range}, outputs {args.output_range}"
    )

    stack = contextlib.ExitStack()
    data_dirs = {}
    for n in args.adapters:
        data_dirs[n] = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        _, registry = _engine(model_dir, data_dirs[n], args)
        for i in tqdm(range(n), desc=f"register {n}", leave=False):
            registry.register_dir(names[i], adapter_dirs[i])
        registry.store.close()

    results: list[tuple[int, Result]] = []
    with stack:
        for rep in range(args.repeats):
            # Interleaved, alternating order, so drift in the machine's speed hits all counts.
            for n in args.adapters if rep % 2 == 0 else reversed(args.adapters):
                results.append((n, _run_ours(model_dir, data_dirs[n], args, names, size, n)))
                _print(n, results[-1][1])
    for n in args.peft_at:
        requests = generate(_spec(args, n, size))
        bar = tqdm(total=n - 1, desc=f"peft load {n}", leave=False)
        model = load_peft(model_dir, adapter_dirs[:n], names[:n], progress=bar.update)
        bar.close()
        for mixed in (False, True):
            results.append((n, run_peft(model, requests, names, args.max_batch, mixed)))
            _print(n, results[-1][1])
    _summary(results)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": [{"adapters": n, **r.row()} for n, r in results],
                },
                indent=2,
            )
        )
    if args.plot:
        _plot(results, args.plot)
    return 0


def _run_ours(model_dir, data_dir, args, names, size, n) -> Result:  # type: ignore[no-untyped-def]
    """One replay against a fresh engine (cold host and device caches) over the store."""
    from server.engine.llm_engine import LLMEngine

    config, registry = _engine(model_dir, data_dir, args)
    engine = LLMEngine(config, registry=registry)
    _warm_up(engine)
    result = run_loraplex(engine, generate(_spec(args, n, size)), names)
    engine.adapter_cache.shutdown()
    registry.store.close()
    return result


def _spec(args: argparse.Namespace, n: int, size: ModelSize) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=args.requests,
        num_adapters=n,
        rate=args.rate,
        cv=args.cv,
        alpha=args.alpha,
        input_range=tuple(args.input_range),
        output_range=tuple(args.output_range),
        vocab=size.vocab,
    )


def _warm_up(engine) -> None:  # type: ignore[no-untyped-def]
    from server.engine.sampling_params import SamplingParams

    engine.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))


def _print(n: int, r: Result) -> None:
    row = r.row()
    print(f"  {n:>5} adapters  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def _medians(results: list[tuple[int, Result]], system: str) -> dict[int, list[float]]:
    runs: dict[int, list[float]] = {}
    for n, r in results:
        if r.system == system:
            runs.setdefault(n, []).append(r.throughput)
    return runs


def _summary(results: list[tuple[int, Result]]) -> None:
    ours = {n: statistics.median(v) for n, v in _medians(results, "loraplex").items()}
    for n, runs in sorted(_medians(results, "loraplex").items()):
        print(
            f"loraplex at {n} adapters: median {ours[n]:.2f} req/s "
            f"(runs {', '.join(f'{v:.2f}' for v in runs)})"
        )
    for n, r in results:
        if r.system != "loraplex" and n in ours:
            print(
                f"loraplex (median) / {r.system} at {n} adapters: "
                f"{ours[n] / r.throughput:.1f}x throughput"
            )
    counts = sorted(ours)
    for n in counts[1:]:
        print(f"loraplex at {n} adapters: {ours[n] / ours[counts[0]]:.0%} of {counts[0]}")


def _plot(results: list[tuple[int, Result]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system in dict.fromkeys(r.system for _, r in results):
        runs = sorted(_medians(results, system).items())
        xs = [n for n, _ in runs]
        mid = [statistics.median(v) for _, v in runs]
        low = [m - min(v) for m, (_, v) in zip(mid, runs, strict=True)]
        high = [max(v) - m for m, (_, v) in zip(mid, runs, strict=True)]
        style = "o-" if len(xs) > 1 else "s"
        ax.errorbar(xs, mid, yerr=[low, high], fmt=style, capsize=3, label=system)
    ax.set_xscale("log")
    ax.set_xlabel("adapters")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title("Serving throughput vs number of adapters (CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
