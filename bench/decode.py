"""Decode throughput: loraplex's engine vs transformers `generate`, same model and batch.

    python -m bench.decode --batch 1,8,32 --new-tokens 64 [--model default|DIR|FILE.gguf]

Each batch of equal-length prompts generates --new-tokens tokens greedily (EOS ignored). Decode
tokens/s excludes the prefill: it is measured from the first generated token to the last.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ModelSize, random_model, real_model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="'default' (SmolLM2-135M-Instruct), a directory or a .gguf; default: random 8x512",
    )
    p.add_argument("--batch", type=_ints, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quantize", choices=["none", "nf4"], default="none")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    return p.parse_args(argv)


def _ours(engine, prompts: list[list[int]], new: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds to the first token, seconds of decode after it)."""
    from server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter()
    assert first is not None
    return first - start, time.perf_counter() - first


class _FirstToken:
    def __init__(self) -> None:
        self.calls, self.first = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _hf(model, prompts: list[list[int]], new: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    ids = torch.tensor(prompts)
    streamer = _FirstToken()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            streamer=streamer,
        )
    return streamer.first - start, time.perf_counter() - streamer.first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.model:
        model_dir, _ = real_model(args.model)
    else:
        model_dir = random_model(args.cache_dir / "model-8x512", ModelSize())

    from transformers import AutoModelForCausalLM

    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            quantize=args.quantize,
            dtype="float32",
            max_num_seqs=max(args.batch),
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = engine.model_config.vocab_size
    print(
        f"model: {model_dir.name} ({engine.model_config.num_params / 1e6:.1f}M params), "
        f"loraplex {args.quantize} vs transformers float32, {args.threads} threads, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens"
    )
    print(
        f"{'batch':>5} {'loraplex tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}"
        f" {'loraplex ttft s':>16} {'transformers ttft s':>20}"
    )
    gen = torch.Generator().manual_seed(0)
    _ours(engine, [[1, 5, 6]], 4)  # warm-up
    _hf(hf, [[1, 5, 6]], 4)
    for b in args.batch:
        prompts = torch.randint(3, vocab, (b, args.prompt_len), generator=gen).tolist()
        decoded = b * (args.new_tokens - 1)
        o_ttft, o_dec = _ours(engine, prompts, args.new_tokens)
        h_ttft, h_dec = _hf(hf, prompts, args.new_tokens)
        ours, theirs = decoded / o_dec, decoded / h_dec
        print(
            f"{b:>5} {ours:>15.1f} {theirs:>19.1f} {ours / theirs:>5.2f}x"
            f" {o_ttft:>16.3f} {h_ttft:>20.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
