"""The cost of prompt logprobs: a mixed batch where some rows score their prompts and the
others do not, against the same batch with no row scoring; and what bypassing the prefix cache
for scoring requests costs.

    python -m bench.prompt_logprobs --batch 8 --prompt-len 256 --new-tokens 16 --vocab 32000

Phase 1 (mixed batch): `batch` prompts of `prompt-len` random tokens run together, greedy, EOS
ignored; in each configuration 0, one, half or every row asks for prompt_logprobs (k=1, what
lm-eval's loglikelihood requests ask). Reported per configuration: wall seconds, the mean time
of steps with prefill and of decode-only steps, and the first token time and decode tokens/s
of the rows that do not ask. Each configuration runs --repeats times, round robin; medians are
reported.

Phase 2 (prefix cache): a shared context of `prompt-len` tokens with 4 short continuations (a
multiple-choice question), run one after another: plainly (the context is cached after the
first), plainly with the prefix cache off (each recomputes the context), and scored (the cache
is bypassed, so each recomputes the context and scores it).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import ModelSize, random_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    return p.parse_args(argv)


@dataclass
class Run:
    seconds: float
    prefill_step_ms: float
    decode_step_ms: float
    plain_ttft_s: float  # rows that do not ask: time to their first token
    plain_decode_tok_s: float  # and their decode tokens per second


def _engine(model_dir: Path, batch: int, prompt_len: int, prefix_caching: bool):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=str(model_dir),
        quantize="none",
        dtype="float32",
        device="cpu",
        max_num_seqs=batch,
        max_num_batched_tokens=batch * prompt_len,
        max_model_len=prompt_len + 64,
        pool_mb=512,
        enable_prefix_caching=prefix_caching,
    )
    return LLMEngine(config)


def _mixed(engine, prompts: list[list[int]], scoring: set[int], new: int) -> Run:  # type: ignore[no-untyped-def]
    from server.engine.sampling_params import SamplingParams

    ids = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            max_tokens=new,
            temperature=0,
            ignore_eos=True,
            prompt_logprobs=1 if i in scoring else None,
        )
        ids.append(engine.add_request(prompt, params))
    prefill, decode = [], []
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        (decode if all(len(o.token_ids) > 1 for o in outs) else prefill).append(now - step_start)
        for o in outs:
            first.setdefault(o.request_id, now - start)
            last[o.request_id] = now - start
    seconds = time.perf_counter() - start
    plain = [rid for i, rid in enumerate(ids) if i not in scoring] or ids
    return Run(
        seconds=seconds,
        prefill_step_ms=1000 * statistics.fmean(prefill),
        decode_step_ms=1000 * statistics.fmean(decode) if decode else float("nan"),
        plain_ttft_s=statistics.fmean(first[r] for r in plain),
        plain_decode_tok_s=statistics.fmean((new - 1) / (last[r] - first[r]) for r in plain),
    )


def _median_run(runs: list[Run]) -> Run:
    fields = Run.__dataclass_fields__
    return Run(**{f: statistics.median(getattr(r, f) for r in runs) for f in fields})


def _multiple_choice(engine, context: list[int], scored: bool) -> float:  # type: ignore[no-untyped-def]
    """Seconds for 4 continuations of one context, one request after another."""
    from server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1 if scored else None)
    start = time.perf_counter()
    for choice in range(4):
        engine.generate([[*context, 100 + choice, 200 + choice]], params)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    size = ModelSize(vocab=args.vocab, max_len=args.prompt_len + 64)
    model_dir = random_model(args.cache_dir / f"prompt-logprobs-v{args.vocab}", size)
    rng = random.Random(0)
    prompts = [
        [1, *(rng.randrange(3, args.vocab) for _ in range(args.prompt_len - 1))]
        for _ in range(args.batch)
    ]
    engine = _engine(model_dir, args.batch, args.prompt_len, prefix_caching=False)
    _mixed(engine, prompts[:2], {0}, 2)  # warm-up
    configs = {
        "none": set(),
        "one": {0},
        "half": set(range(args.batch // 2)),
        "all": set(range(args.batch)),
    }
    print(f"model: {size.describe()}, {args.threads} threads")
    print(
        f"phase 1: batch {args.batch} x {args.prompt_len} prompt tokens, "
        f"{args.new_tokens} new tokens, prompt_logprobs=1 on the rows that ask"
    )
    print(
        "| rows scoring | wall s | prefill step ms | decode step ms | "
        "non-scoring rows: first token s | decode tok/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    # Round robin over the configurations, so load that comes and goes on a shared machine
    # falls on all of them alike.
    runs: dict[str, list[Run]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, scoring in configs.items():
            runs[name].append(_mixed(engine, prompts, scoring, args.new_tokens))
    for name, scoring in configs.items():
        r = _median_run(runs[name])
        print(
            f"| {name} ({len(scoring)}/{args.batch}) | {r.seconds:.2f} | {r.prefill_step_ms:.0f}"
            f" | {r.decode_step_ms:.1f} | {r.plain_ttft_s:.3f} | {r.plain_decode_tok_s:.1f} |"
        )

    cached = _engine(model_dir, args.batch, args.prompt_len, prefix_caching=True)
    context = prompts[0][: args.prompt_len - 2]
    _multiple_choice(cached, context, scored=False)  # caches the context
    # (engine, scored): cached plain, uncached plain, scored (which bypasses the cache).
    cases = {
        "plain, context cached": (cached, False),
        "plain, prefix cache off": (engine, False),
        "scored (cache bypassed)": (cached, True),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (eng, scored) in cases.items():
            timings[name].append(_multiple_choice(eng, context, scored))
    print(f"phase 2: 4 continuations of a {len(context)}-token context, one after another")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.3f} s |")


if __name__ == "__main__":
    main()
