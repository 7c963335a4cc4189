"""Fine-tuning quality: QLoRA vs LoRA on the 16-bit (fp32 on CPU) base vs full fine-tuning,
and LongLoRA's ablation on long inputs. One run, a table on stdout and JSON with --out.

    python -m bench.quality [--steps 100] [--larger-pretrain-seconds 100] [--no-larger]
        [--long-steps 15] [--no-long] [--threads 2] [--out results.json]

Every run of a comparison trains on the same data, with the same steps, batches (the same
length-grouped order) and seed; only what is trained or how the base is stored differs.

- Task: sort 3-6 known words alphabetically (chat format, prompt masked), a task the base
  models have never seen. Validation loss is the per-token loss on held-out answers; accuracy
  is exact match of greedy answers to held-out prompts (and per-token argmax accuracy,
  teacher-forced, which moves before exact match does).
- Models: the demo model (built once into the cache, about 3 minutes) and a larger one,
  random-initialised then pretrained here on the same corpus for --larger-pretrain-seconds.
- QLoRA: NF4 + double quantization base, LoRA on every linear layer. LoRA: the same LoRA on
  the unquantized base. Full: every base weight trains (the zero-initialised LoRA B keeps the
  LoRA path at exactly zero and is frozen), at a lower learning rate, as usual for full tuning.
- LongLoRA ablation (demo model, context 256): continued training on documents of the demo
  corpus cut to 2x and 4x the context, with position interpolation and S2-Attn, comparing LoRA
  on q/k/v/o alone, LoRA plus trainable embeddings and norms (LongLoRA's LoRA+), and full
  fine-tuning; validation loss on held-out long documents with full attention. "base" is the
  untrained model with the same position interpolation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.training import WORD_LIST
from server.training.hparams import HParams, hparams_for
from server.training.trainer import Trainer

logger = logging.getLogger(__name__)

SEED = 1234
TASK_TRAIN, TASK_VALID, TASK_TEST = 512, 64, 64
LONG_TRAIN_DOCS, LONG_VALID_DOCS = 48, 12


class FullTrainer(Trainer):
    """Full fine-tuning on the Trainer's loop: every base weight trains, LoRA stays frozen."""

    def setup(self) -> None:
        assert self.hp.quantize == "none", "full fine-tuning needs the unquantized base"
        super().setup()
        assert self.model is not None
        lora = {id(p) for p in self.adapter.parameters()}
        self.params = [p for p in self.model.parameters() if id(p) not in lora]
        for p in self.adapter.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, **self.adam_settings())
        self.scheduler = self.warmup_schedule(self.optimizer)


# ---- data ---------------------------------------------------------------------------------


def _sort_example(rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORD_LIST.split(), rng.randint(3, 6))
    return {
        "messages": [
            {"role": "user", "content": "Sort these words: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(sorted(words))},
        ]
    }


def write_task(root: Path) -> dict[str, Path]:
    """Disjoint train / validation / test files of the sorting task."""
    rng = random.Random(SEED)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}
    sizes = {"train": TASK_TRAIN, "valid": TASK_VALID, "test": TASK_TEST}
    for split, size in sizes.items():
        while len(splits[split]) < size:
            ex = _sort_example(rng)
            key = ex["messages"][0]["content"]
            if key not in seen:  # no held-out prompt was trained on
                seen.add(key)
                splits[split].append(ex)
    return {s: _write_jsonl(root / f"task-{s}.jsonl", rows) for s, rows in splits.items()}


def write_long_documents(root: Path, tokens: int) -> dict[str, Path]:
    """Demo-corpus documents joined and cut into pieces of about `tokens` tokens."""
    from server.demo.corpus import load_corpus

    corpus = load_corpus()
    text = "\n\n".join(d.text for d in [*corpus.validation, *corpus.train])
    chars = tokens * 4  # the demo tokenizer averages ~3.5 characters a token: pieces fill it
    pieces = [text[i : i + chars] for i in range(0, len(text) - chars, chars)]
    random.Random(SEED).shuffle(pieces)
    valid = pieces[:LONG_VALID_DOCS]
    train = pieces[LONG_VALID_DOCS : LONG_VALID_DOCS + LONG_TRAIN_DOCS]
    return {
        "train": _write_jsonl(root / f"long-{tokens}-train.jsonl", [{"text": t} for t in train]),
        "valid": _write_jsonl(root / f"long-{tokens}-valid.jsonl", [{"text": t} for t in valid]),
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- models -------------------------------------------------------------------------------


def larger_model(pretrain_seconds: float) -> Path:
    """A 4-layer 192-wide Llama (about twice the demo's parameters), pretrained here."""
    from server.demo.build import build_demo_model, default_demo_dir, is_complete
    from server.demo.train import DemoSize

    size = DemoSize(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                    intermediate_size=512, learning_rate=1e-3)  # fmt: skip
    name = f"bench-larger-{size.hidden_size}x{size.num_layers}-{int(pretrain_seconds)}s"
    path = default_demo_dir().parent / name
    if not is_complete(path):
        logger.info("pretraining the larger model for %.0f s", pretrain_seconds)
        build_demo_model(path, train_seconds=pretrain_seconds, size=size, progress=False)
    return path


# ---- runs ---------------------------------------------------------------------------------


def _train(
    model_dir: Path, data: dict[str, Path], hp: HParams, full: bool, out: Path
) -> tuple[Trainer, float]:
    cls = FullTrainer if full else Trainer
    trainer = cls(model_dir, out, data["train"], hp, validation_data=data["valid"], device="cpu")
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def task_accuracy(trainer: Trainer, test_file: Path) -> tuple[float, float]:
    """(exact-match accuracy of greedy answers, teacher-forced per-token accuracy)."""
    tok = trainer.tokenizer
    exact = correct = total = 0
    model = trainer.eval_model()
    for line in test_file.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
        special = not (tok.bos_token and prompt.startswith(tok.bos_token))
        prompt_ids = tok.encode(prompt, add_special_tokens=special)
        answer = messages[-1]["content"]
        answer_ids = [*tok.encode(answer, add_special_tokens=False), min(tok.eos_token_ids)]
        got = trainer.generate(prompt_ids, len(answer_ids) + 2)
        exact += tok.decode(got).strip() == answer
        with torch.no_grad():
            ids = torch.tensor([prompt_ids + answer_ids])
            positions = torch.arange(ids.shape[1])[None]
            logits = model.compute_logits(model(ids, positions, None)[0])
            predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1)
        correct += int((predicted == torch.tensor(answer_ids)).sum())
        total += len(answer_ids)
    n = len(test_file.read_text().splitlines())
    return exact / n, correct / total


def task_runs(name: str, model_dir: Path, args: argparse.Namespace, tmp: Path) -> list[dict]:
    data = write_task(tmp)
    common = {
        "r": 16,
        "lora_alpha": 32.0,
        "lora_dropout": 0.05,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lora_lr,
        "warmup_ratio": 0.05,
        "max_grad_norm": 1.0,
        "checkpoint_steps": 0,
        "gradient_checkpointing": False,
        "seed": SEED,
    }
    runs = [
        ("QLoRA (NF4 + DQ)", {"quantize": "nf4"}, False),
        ("LoRA (fp32 base)", {"quantize": "none"}, False),
        ("Full fine-tuning", {"quantize": "none", "learning_rate": args.full_lr}, True),
    ]
    rows = []
    for i, (label, extra, full) in enumerate(runs):
        hp = hparams_for("qlora", {**common, **extra})
        trainer, seconds = _train(model_dir, data, hp, full, tmp / f"{name}-{i}")
        exact, token_acc = task_accuracy(trainer, data["test"])
        rows.append({
            "model": name,
            "method": label,
            "valid_loss": trainer.evaluate(),
            "exact_match": exact,
            "token_accuracy": token_acc,
            "trainable_params": sum(p.numel() for p in trainer.params),
            "seconds": seconds,
        })  # fmt: skip
        logger.info("%s", rows[-1])
    return rows


def long_runs(model_dir: Path, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from server.model.config import ModelConfig

    original = ModelConfig.from_dir(model_dir).max_position_embeddings
    rows = []
    for factor in (2, 4):
        context = factor * original
        data = write_long_documents(tmp, context)
        common = {
            "context_length": context,
            "max_seq_len": context,
            "batch_size": 1,
            "gradient_accumulation_steps": 2,
            "max_steps": args.long_steps,
            "learning_rate": args.lora_lr,
            "warmup_steps": 2,
            "checkpoint_steps": 0,
            "gradient_checkpointing": False,
            "quantize": "none",
            "seed": SEED,
        }
        variants = [
            ("LoRA (q,k,v,o)", {"modules_to_save": []}, False),
            ("LoRA + embed + norms", {"modules_to_save": ["embed_tokens", "norm"]}, False),
            ("Full fine-tuning", {"modules_to_save": [], "learning_rate": args.full_lr}, True),
        ]
        base_loss = None
        for i, (label, extra, full) in enumerate(variants):
            hp = hparams_for("longlora", {**common, **extra})
            out = tmp / f"long-{context}-{i}"
            trainer, seconds = _train(model_dir, data, hp, full, out)
            if base_loss is None:
                base_loss = _untrained_loss(model_dir, data, hp, tmp / f"long-{context}-base")
            rows.append({
                "context": context,
                "factor": factor,
                "method": label,
                "valid_loss": trainer.evaluate(),
                "base_valid_loss": base_loss,
                "trainable_params": sum(p.numel() for p in trainer.params),
                "seconds": seconds,
            })  # fmt: skip
            logger.info("%s", rows[-1])
    return rows


def _untrained_loss(model_dir: Path, data: dict[str, Path], hp: HParams, out: Path) -> float:
    trainer = Trainer(
        model_dir, out, data["train"], hp, validation_data=data["valid"], device="cpu"
    )
    trainer.setup()
    return trainer.evaluate()


# ---- report -------------------------------------------------------------------------------


def report(task: list[dict], long: list[dict]) -> str:
    lines = [
        "| model | method | trainable params | validation loss | vs LoRA | exact match "
        "| token accuracy | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in task:
        ref = next(r for r in task if r["model"] == row["model"] and r["method"].startswith("LoRA"))
        delta = (row["valid_loss"] / ref["valid_loss"] - 1) * 100
        lines.append(
            f"| {row['model']} | {row['method']} | {row['trainable_params']:,} "
            f"| {row['valid_loss']:.4f} | {delta:+.2f}% | {row['exact_match']:.1%} "
            f"| {row['token_accuracy']:.1%} | {row['seconds']:.0f} |"
        )
    if long:
        lines += [
            "",
            "| context | method | trainable params | validation loss | untrained | seconds |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for row in long:
            lines.append(
                f"| {row['context']} ({row['factor']}x) | {row['method']} "
                f"| {row['trainable_params']:,} | {row['valid_loss']:.4f} "
                f"| {row['base_valid_loss']:.4f} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per task run")
    parser.add_argument("--long-steps", type=int, default=15, help="steps per LongLoRA run")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--larger-pretrain-seconds", type=float, default=100.0)
    parser.add_argument("--no-larger", action="store_true", help="skip the larger model")
    parser.add_argument("--no-long", action="store_true", help="skip the LongLoRA ablation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from server.demo import ensure_demo_model

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraplex-quality-") as tmp_name:
        tmp = Path(tmp_name)
        models = [("demo", ensure_demo_model(progress=False))]
        if not args.no_larger:
            models.append(("larger", larger_model(args.larger_pretrain_seconds)))
        task = [row for name, path in models for row in task_runs(name, path, args, tmp)]
        long = [] if args.no_long else long_runs(models[0][1], args, tmp)
    table = report(task, long)
    seconds = time.perf_counter() - start
    print(table)
    print(f"\n{seconds:.0f} s in all, {args.threads} threads")
    if args.out is not None:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds}
        args.out.write_text(json.dumps({**record, "task": task, "long": long}, indent=2) + "\n")
    _check_finite([r["valid_loss"] for r in [*task, *long]])


def _check_finite(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        raise SystemExit("a run diverged: a validation loss is not finite")


if __name__ == "__main__":
    main()
