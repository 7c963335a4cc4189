"""Per-step cost of constrained requests: grammar mask fill + apply + advance, per batch size.

    python -m bench.structured_output --vocab 32000,128256 --batch 1,8,32 --steps 40

A synthetic byte-level vocabulary of the given size (random words over the byte alphabet)
stands in for a real tokenizer: the mask work grows with the vocabulary, not with the model.
Each of `batch` rows follows a JSON schema; a step is apply_logits_processors on random logits
[batch, vocab] (all rows constrained), the likeliest allowed token chosen, and accept_token.
Reported: compile time, and milliseconds per step (mean, p90) for the whole batch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def synthetic_tokenizer(path: Path, vocab_size: int, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer.json whose vocabulary is the byte alphabet plus random words."""
    rng = random.Random(seed)
    alphabet = ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", *sorted(alphabet)])}
    letters = 'abcdefghijklmnopqrstuvwxyz0123456789{}[]":,. '
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        vocab.setdefault(word.replace(" ", "Ġ"), len(vocab))
    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for i, t in enumerate(["<s>", "</s>"])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": [],
            "dropout": None,
            "unk_token": None,
            "byte_fallback": False,
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    return path


def run(vocab_size: int, batches: list[int], steps: int, root: Path) -> None:
    from server.engine.grammar import Grammar, GrammarCompiler
    from server.engine.logits_processors import LogitsState, accept_token, apply_logits_processors
    from server.engine.sampling_params import SamplingParams
    from server.engine.sequence import Sequence
    from server.model.tokenizer import Tokenizer

    tok = Tokenizer(synthetic_tokenizer(root / f"vocab-{vocab_size}", vocab_size))
    grammars = GrammarCompiler(tok, vocab_size)
    start = time.perf_counter()
    _ = grammars.compiler
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = grammars.compile(Grammar("json_schema", SCHEMA))
    compile_s = time.perf_counter() - start
    print(
        f"vocab {vocab_size}: tokenizer tables {info_s * 1e3:.0f} ms, schema compile "
        f"{compile_s * 1e3:.1f} ms"
    )
    params = SamplingParams(max_tokens=10_000, temperature=0, grammar=grammar)
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        seqs = [Sequence(str(i), [1], params) for i in range(batch)]

        def fresh(seq: Sequence) -> None:
            seq.logits = LogitsState.build(params, grammars, tok.eos_token_ids, torch.device("cpu"))

        for seq in seqs:
            fresh(seq)
        times: list[float] = []
        for _ in range(steps):
            logits = torch.randn(batch, vocab_size, generator=gen)
            start = time.perf_counter()
            apply_logits_processors(logits, seqs)
            masked = time.perf_counter()
            tokens = logits.argmax(dim=-1).tolist()  # the sampler's own work: not counted
            resumed = time.perf_counter()
            for seq, token in zip(seqs, tokens, strict=True):
                if token in tok.eos_token_ids:
                    fresh(seq)  # the object is done: start the next one
                else:
                    accept_token(seq, token)
            times.append(masked - start + time.perf_counter() - resumed)
        times.sort()
        mean = statistics.mean(times)
        print(
            f"  batch {batch:3d}: {mean * 1e3:7.2f} ms/step mean, "
            f"{statistics.median(times) * 1e3:7.2f} median, "
            f"{times[int(0.9 * len(times))] * 1e3:7.2f} p90 "
            f"({mean / batch * 1e3:.3f} ms per constrained row)"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=_ints, default=[32000, 128256])
    p.add_argument("--batch", type=_ints, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (xgrammar: its own)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            run(vocab, args.batch, args.steps, Path(tmp))


if __name__ == "__main__":
    main()
