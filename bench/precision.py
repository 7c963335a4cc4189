"""Serving precision of a base model: perplexity of float32, bfloat16 and NF4 on held-out text,
and how often greedy text stays the float32 model's. One run, a table on stdout.

    python -m bench.precision [--model DIR|FILE.gguf] [--windows 16] [--window-tokens 512]
        [--prompts 20] [--new-tokens 32] [--threads 2]

Each precision is the serving path itself (server.engine.setup.build_model: the same loader,
the same NF4 module swap). Held-out text: Python's own reference documentation
(pydoc_data.topics, shipped with CPython), cut into windows of --window-tokens tokens;
perplexity is exp(mean next-token loss) over every window. Greedy agreement: --prompts
prompts of 24 words from the same text, --new-tokens greedy tokens each, compared with the
float32 model's: the share of identical texts and the mean share of tokens before the first
difference.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine.setup import build_model
from server.model.llama import LlamaForCausalLM
from server.model.tokenizer import Tokenizer
from server.training.model import greedy_generate

SEED = 1234
PRECISIONS = (("float32", "none"), ("bfloat16", "none"), ("float32", "nf4"))


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(tok: Tokenizer, text: str, count: int, size: int) -> list[list[int]]:
    """`count` windows of `size` tokens, spread evenly over the text."""
    ids = tok.encode(text, add_special_tokens=False)
    stride = max(size, (len(ids) - size) // count)
    return [ids[i : i + size] for i in range(0, stride * count, stride)][:count]


def perplexity(model: LlamaForCausalLM, batches: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            t = torch.tensor([ids])
            positions = torch.arange(t.shape[1])[None]
            logits = model.compute_logits(model(t, positions, None)[0]).float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], t[0, 1:], reduction="sum")
            total += loss.item()
            count += len(ids) - 1
    return math.exp(total / count)


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of identical sequences, mean share of tokens before the first difference)."""
    same = sum(a == b for a, b in zip(ours, reference, strict=True))
    prefix = []
    for a, b in zip(ours, reference, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))
        prefix.append(n / max(1, len(b)))
    return same / len(reference), sum(prefix) / len(prefix)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from server.model.resolve import resolve_model

    model_dir = resolve_model(args.model, torch.float32)
    tok = Tokenizer(model_dir)
    text = held_out_text()
    batches = windows(tok, text, args.windows, args.window_tokens)
    words = text.split()
    rng = random.Random(SEED)
    starts = [rng.randrange(0, len(words) - 24) for _ in range(args.prompts)]
    prompts = [tok.encode(" ".join(words[s : s + 24]), add_special_tokens=False) for s in starts]
    rows = []
    reference: list[list[int]] | None = None
    for dtype, quantize in PRECISIONS:
        config = EngineConfig(model=str(model_dir), dtype=dtype, quantize=quantize, device="cpu")
        model = build_model(config, Path(model_dir)).eval()
        start = time.perf_counter()
        ppl = perplexity(model, batches)
        ppl_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            texts = [greedy_generate(model, p, args.new_tokens) for p in prompts]
        gen_seconds = time.perf_counter() - start
        reference = reference or texts
        same, prefix = agreement(texts, reference)
        label = f"{dtype}{' + NF4' if quantize == 'nf4' else ''}"
        rows.append((label, ppl, same, prefix, ppl_seconds, gen_seconds))
        print(f"{label}: perplexity {ppl:.3f} ({ppl_seconds:.0f} s)", flush=True)
    tokens = sum(len(b) for b in batches)
    print(f"{model_dir.name}: {len(batches)} windows, {tokens} tokens of held-out text; ")
    print(f"{len(prompts)} prompts x {args.new_tokens} greedy tokens; {args.threads} threads\n")
    print("| weights | perplexity | vs float32 | identical greedy texts | tokens before first "
          "difference | perplexity s | greedy s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows[0][1]
    for label, ppl, same, prefix, ppl_s, gen_s in rows:
        print(
            f"| {label} | {ppl:.3f} | {(ppl / base - 1) * 100:+.2f}% | {same:.0%} | {prefix:.0%} "
            f"| {ppl_s:.1f} | {gen_s:.1f} |"
        )


if __name__ == "__main__":
    main()
