"""Training throughput and memory: loraplex's QLoRA trainer vs PEFT + bitsandbytes, one run.

    python -m bench.training [--model DIR] [--data train.jsonl] [--steps 10] [--warmup 2]
        [--batch-size 4] [--max-seq-len 256] [--r 64] [--device auto|cpu|cuda] [--repeats 3]

Both systems train the same LoRA (all linear layers but lm_head, r/alpha/dropout as given) on
the same NF4 double-quantized base, with gradient checkpointing and bitsandbytes PagedAdamW, over
the same batches (loraplex's tokenization and length-grouped order, fed to both). The baseline
is the usual recipe: transformers + BitsAndBytesConfig, prepare_model_for_kbit_training,
get_peft_model. Each system runs in its own subprocess so its peak memory is its own: on CUDA
the allocator's peak, on CPU peak RSS minus the RSS after imports. Without --model the default
model (SmolLM2-135M-Instruct) is used; without --data a sorting task is generated
(make_sort_dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Common English words, each one token or two in any byte-level BPE vocabulary.
WORD_LIST = (
    "list dict set tuple str int float bytes object type range slice file path module class "
    "function method value key index item error number string buffer stream socket thread"
)


def make_sort_dataset(path: Path, num_examples: int, seed: int = 0) -> Path:
    """A chat task: sort the given words alphabetically (small models get it wrong)."""
    rng = random.Random(seed)
    words_known = WORD_LIST.split()
    with path.open("w") as f:
        for _ in range(num_examples):
            words = rng.sample(words_known, rng.randint(3, 8))
            messages = [
                {"role": "user", "content": "Sort these words: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(sorted(words))},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hparams(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from server.training.hparams import hparams_for

    return hparams_for(
        "qlora",
        {
            "r": args.r,
            "lora_alpha": 16.0,
            "lora_dropout": 0.1,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": 1,
            "max_steps": args.warmup + args.steps,
            "max_seq_len": args.max_seq_len,
            "validation_fraction": 0.0,
            "checkpoint_steps": 0,
            "learning_rate": 2e-4,
        },
    )


def _device(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    if args.device != "auto":
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_ours(args: argparse.Namespace, baseline_rss: int) -> dict[str, Any]:
    import torch

    from server.training.trainer import Trainer

    device = _device(args)
    # (tokens, wall seconds, CPU seconds) per step, timed between consecutive step events.
    steps: list[tuple[int, float, float]] = []
    last = [0.0, 0.0]

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind == "step":
            now = [time.perf_counter(), time.process_time()]
            # The first step's start is not observed; --warmup >= 1 leaves it out.
            steps.append((event.tokens, now[0] - last[0], now[1] - last[1]))
            last[:] = now

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            args.model, out, args.data, _hparams(args), device=device, on_event=on_event
        )
        trainer.setup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    return _summary(steps[args.warmup :], device, baseline_rss, trainer.adapter.num_parameters)


def _run_peft(args: argparse.Namespace, baseline_rss: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from server.model.quant import import_bitsandbytes
    from server.model.tokenizer import Tokenizer
    from server.training.data import batch_order, collate, prepare_datasets

    device = _device(args)
    hp = _hparams(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = Tokenizer(args.model)
    train_set, _ = prepare_datasets(args.data, None, tok, args.max_seq_len, hp)
    lengths = [len(e.input_ids) for e in train_set]
    order = batch_order(lengths, hp.batch_size, hp.seed, 0, hp.group_by_length)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quant, dtype=dtype, device_map=str(device)
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=hp.r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bnb = import_bitsandbytes()
    optimizer = bnb.optim.PagedAdamW(params, lr=hp.learning_rate, weight_decay=0.0)
    pad_id = min(tok.eos_token_ids, default=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps: list[tuple[int, float, float]] = []
    for index in range(hp.max_steps or 0):
        if device.type == "cuda":
            torch.cuda.synchronize()
        # Batch assembly counts, as it does in the trainer's steps.
        start, start_cpu = time.perf_counter(), time.process_time()
        rows = order[index % len(order)]
        batch = collate([train_set[i] for i in rows], pad_id).to(device)
        real = torch.tensor([len(train_set[i].input_ids) for i in rows], device=device)
        attention = torch.arange(batch.input_ids.shape[1], device=device)[None] < real[:, None]
        loss = model(input_ids=batch.input_ids, attention_mask=attention, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the step, as the trainer's loss readout does
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        steps.append((batch.num_tokens, wall, cpu))
    return _summary(steps[args.warmup :], device, baseline_rss, sum(p.numel() for p in params))


def _summary(
    steps: list[tuple[int, float, float]], device: Any, baseline_rss: int, trainable: int
) -> dict[str, Any]:
    import torch

    tokens = sum(t for t, _, _ in steps)
    seconds = sum(s for _, s, _ in steps)
    cpu_seconds = sum(c for _, _, c in steps)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    return {
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / len(steps),
        "tokens_per_cpu_second": tokens / cpu_seconds,
        "tokens": tokens,
        "peak_memory_mib": peak / 2**20,
        "trainable_parameters": trainable,
        "device": str(device),
    }


def _worker(args: argparse.Namespace) -> None:
    import torch  # noqa: F401 - imported before the baseline RSS is taken
    import transformers  # noqa: F401

    import server.training.trainer  # noqa: F401

    baseline = _rss_bytes()
    run = _run_ours if args.worker == "ours" else _run_peft
    print(json.dumps(run(args, baseline)))


def _spawn(system: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.training", "--worker", system]
    for key in ("model", "data", "steps", "warmup", "batch_size", "max_seq_len", "r", "device"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{system} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (its memory reported with it)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_second"])
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--data", help="training JSONL (default: a generated sorting task)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system (median kept)")
    parser.add_argument("--worker", choices=("ours", "peft"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.worker:
        _worker(args)
        return
    import torch

    from server.model.resolve import resolve_model

    args.model = str(resolve_model(args.model, torch.float32))
    if args.data is None:
        path = Path(tempfile.mkdtemp(prefix="loraplex-bench-")) / "sort.jsonl"
        args.data = str(make_sort_dataset(path, num_examples=400))
    # Alternate the systems and keep each one's median run, so load from other processes
    # (this matters on shared CPUs) hits both alike.
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peft": []}
    for _ in range(args.repeats):
        for system in runs:
            runs[system].append(_spawn(system, args))
    ours, peft = (_median(runs[s]) for s in ("ours", "peft"))
    print(
        f"QLoRA training, {args.steps} timed steps of batch {args.batch_size} "
        f"(r {args.r}, all linear, NF4 + double quant, gradient checkpointing, paged AdamW) "
        f"on {ours['device']}, median of {args.repeats} alternating runs, model {args.model}"
    )
    print(
        f"{'system':<24}{'tokens/s':>10}{'s/step':>9}{'tok/CPU-s':>11}{'peak MiB':>10}"
        f"{'trainable':>11}"
    )
    for name, r in (("loraplex trainer", ours), ("PEFT + bitsandbytes", peft)):
        print(
            f"{name:<24}{r['tokens_per_second']:>10.0f}{r['seconds_per_step']:>9.3f}"
            f"{r['tokens_per_cpu_second']:>11.0f}{r['peak_memory_mib']:>10.0f}"
            f"{r['trainable_parameters']:>11}"
        )
    print(
        f"speedup {ours['tokens_per_second'] / peft['tokens_per_second']:.2f}x, "
        f"memory {ours['peak_memory_mib'] / max(peft['peak_memory_mib'], 1e-9):.2f}x of PEFT's"
    )


if __name__ == "__main__":
    main()
