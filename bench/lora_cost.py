"""The cost of batched LoRA: one decode batch, base only vs every sequence with its own adapter.

    python -m bench.lora_cost --batch 32 --adapters 32 --rank 16

The same prompts decode greedily twice on one engine: without adapters, then each sequence
with one of --adapters distinct adapters (rank --rank on --targets). Reported: the mean
decode-step time of each and the added cost in percent.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.common import TARGETS, ModelSize, random_model, synthetic_adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", choices=sorted(TARGETS), default="attn")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--quantize", choices=["none", "nf4"], default="none")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    return p.parse_args(argv)


def decode_step_seconds(engine, prompts: list[list[int]], names: list[str | None], steps: int):  # type: ignore[no-untyped-def]
    """Mean seconds of a decode step once every prompt is prefilled."""
    from server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for prompt, name in zip(prompts, names, strict=True):
        engine.add_request(prompt, params, adapter_name=name)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    engine.abort_all()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    size = ModelSize(layers=args.layers, hidden=args.hidden)
    model_dir = random_model(args.cache_dir / f"model-{size.layers}x{size.hidden}", size)
    targets = TARGETS[args.targets]
    cache = args.cache_dir / f"adapters-{size.layers}x{size.hidden}-{args.targets}-r{args.rank}"

    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    with tempfile.TemporaryDirectory() as data:
        config = EngineConfig(
            model=str(model_dir),
            quantize=args.quantize,
            dtype="float32",
            max_num_seqs=args.batch,
            max_lora_rank=args.rank,
            max_loras=max(args.adapters, 1),
        )
        registry = open_registry(Path(data), config)
        names = [f"a{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            registry.register_dir(
                name, synthetic_adapter(cache / name, size, args.rank, targets, i)
            )
        engine = LLMEngine(config, registry=registry)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, size.vocab, (args.batch, args.prompt_len), generator=gen)
        prompts_list = prompts.tolist()
        with_adapters: list[str | None] = [names[i % len(names)] for i in range(args.batch)]
        base_only: list[str | None] = [None] * args.batch
        decode_step_seconds(engine, prompts_list, with_adapters, 2)  # loads the adapters
        base, lora = [], []
        for _ in range(args.repeats):
            base.append(decode_step_seconds(engine, prompts_list, base_only, args.steps))
            lora.append(decode_step_seconds(engine, prompts_list, with_adapters, args.steps))
        engine.adapter_cache.shutdown()
        registry.store.close()
    b, lo = min(base), min(lora)
    print(
        f"model {size.describe()}, {args.quantize}, {args.threads} threads; batch {args.batch}, "
        f"{args.adapters} adapters rank {args.rank} on {args.targets}"
    )
    print(
        f"decode step: base {b * 1e3:.2f} ms, with adapters {lo * 1e3:.2f} ms, "
        f"LoRA cost {100 * (lo / b - 1):+.1f}%"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
