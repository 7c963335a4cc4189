"""Fine-tuning quality on a real model: QLoRA vs LoRA on the 16-bit (fp32 on CPU) base vs full
fine-tuning, compared on held-out answers. One run, a table on stdout and JSON with --out.

    python -m bench.quality [--model DIR|FILE.gguf] [--steps 60] [--test-examples 64]
        [--threads 2] [--out r.json]

Every run trains on the same data, with the same steps, batches (the same length-grouped
order) and seed; only what is trained or how the base is stored differs.

- Model: SmolLM2-135M-Instruct (the default model) unless --model names another.
- Task: an instruction the model gets wrong out of the box: sort 3-6 common words
  alphabetically (chat format, its own chat template, prompt masked). Exact match of greedy
  answers on held-out prompts is the headline; validation loss (per answer token) and
  teacher-forced per-token accuracy move earlier. "Base" is the model before any training.
- QLoRA: NF4 + double quantization base, LoRA on every linear layer. LoRA: the same LoRA on
  the unquantized base. Full: every base weight trains (the zero-initialised LoRA B keeps the
  LoRA path at exactly zero and is frozen), at a lower learning rate, as usual for full tuning.
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


def write_task(root: Path, test_examples: int = TASK_TEST) -> dict[str, Path]:
    """Disjoint train / validation / test files of the sorting task."""
    rng = random.Random(SEED)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}
    sizes = {"train": TASK_TRAIN, "valid": TASK_VALID, "test": test_examples}
    for split, size in sizes.items():
        while len(splits[split]) < size:
            ex = _sort_example(rng)
            key = ex["messages"][0]["content"]
            if key not in seen:  # no held-out prompt was trained on
                seen.add(key)
                splits[split].append(ex)
    return {s: _write_jsonl(root / f"task-{s}.jsonl", rows) for s, rows in splits.items()}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
    data = write_task(tmp, args.test_examples)
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
    base = _untrained(model_dir, data, hparams_for("qlora", {**common, "quantize": "none"}),
                      tmp / f"{name}-base")  # fmt: skip
    exact, token_acc = task_accuracy(base, data["test"])
    rows = [{
        "model": name,
        "method": "Base (no training)",
        "valid_loss": base.evaluate(),
        "exact_match": exact,
        "token_accuracy": token_acc,
        "trainable_params": 0,
        "seconds": 0.0,
    }]  # fmt: skip
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


def _untrained(model_dir: Path, data: dict[str, Path], hp: HParams, out: Path) -> Trainer:
    trainer = Trainer(
        model_dir, out, data["train"], hp, validation_data=data["valid"], device="cpu"
    )
    trainer.setup()
    return trainer


# ---- report -------------------------------------------------------------------------------


def report(task: list[dict]) -> str:
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--test-examples", type=int, default=TASK_TEST, help="held-out prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from server.model.resolve import resolve_model

    model_dir = resolve_model(args.model, torch.float32)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraplex-quality-") as tmp_name:
        task = task_runs(model_dir.name, model_dir, args, Path(tmp_name))
    table = report(task)
    seconds = time.perf_counter() - start
    print(table)
    print(f"\n{seconds:.0f} s in all, {args.threads} threads")
    if args.out is not None:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds}
        args.out.write_text(json.dumps({**record, "task": task}, indent=2) + "\n")
    _check_finite([r["valid_loss"] for r in task])


def _check_finite(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values):
        raise SystemExit("a run diverged: a validation loss is not finite")


if __name__ == "__main__":
    main()
