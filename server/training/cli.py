"""`loraplex finetune`: the server's trainer on the command line, without the server.

    loraplex finetune --model DIR --data train.jsonl [--validation-data val.jsonl]
        --method qlora|longlora --output DIR [--hparam key=value ...] [--device cpu|cuda]

A --hparam value is read as JSON when it parses (2e-4, true, ["q_proj","v_proj"]), else as a
string (all-linear). Rerunning with the same --output resumes from the newest checkpoint;
Ctrl-C stops after the current step (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from tqdm import tqdm

from server.training.data import DataError
from server.training.events import TrainingEvent
from server.training.hparams import METHODS, HParamsError, hparams_for

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the finetune flags to parser (the `loraplex finetune` subcommand)."""
    parser.add_argument(
        "--model",
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--data", required=True, help="training JSONL file")
    parser.add_argument("--validation-data", help="validation JSONL (default: hold out a part)")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--output", required=True, help="run directory (checkpoints, adapter)")
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyperparameter (repeatable), e.g. --hparam r=16",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="loraplex finetune", description="Fine-tune a LoRA adapter (QLoRA or LongLoRA)."
        )
    )


def parse_hparams(pairs: list[str]) -> dict[str, Any]:
    """["r=16", "target_modules=[\"q_proj\"]"] -> {"r": 16, "target_modules": ["q_proj"]}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise HParamsError(f"--hparam {pair!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


class _Progress:
    """Event callback drawing a tqdm bar; evals and checkpoints are written above it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, event: TrainingEvent) -> None:
        if self.bar is None and self.enabled:
            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step")
        if event.kind == "step" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{event.loss:.4f}",
                lr=f"{event.learning_rate:.2e}",
                tok_s=f"{event.tokens_per_second:.0f}",
            )
        elif event.kind != "step":
            fields = {k: v for k, v in event.to_dict().items() if k not in ("kind", "total_steps")}
            line = f"[{event.kind}] " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            if self.bar is not None:
                tqdm.write(line)
            else:
                print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    """Run a fine-tuning job from parsed arguments; returns the process exit code."""
    import torch

    from server.model.resolve import resolve_model
    from server.training.trainer import Trainer  # torch and bitsandbytes load only when used

    stop = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("stopping after this step (Ctrl-C again to abort)")

    progress = _Progress(enabled=not args.no_progress)
    try:
        hp = hparams_for(args.method, parse_hparams(args.hparam))
        model_dir = resolve_model(args.model, torch.float32)
        trainer = Trainer(
            model_dir,
            args.output,
            args.data,
            hp,
            validation_data=args.validation_data,
            device=None if args.device == "auto" else args.device,
            on_event=progress,
            should_stop=stop.is_set,
        )
        # Signal handlers can only be installed from the main thread.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            result = trainer.train()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
    except (DataError, HParamsError, ValueError) as exc:
        # Bad input (data, hyperparameters, model directory, mismatched checkpoint).
        logger.debug("finetune failed", exc_info=True)
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    if result.status == "cancelled":
        print(f"stopped at step {result.step}/{result.total_steps}; rerun to resume")
        return 130
    before = "-" if result.initial_valid_loss is None else f"{result.initial_valid_loss:.4f}"
    after = "-" if result.valid_loss is None else f"{result.valid_loss:.4f}"
    print(f"adapter: {result.adapter_dir}")
    print(f"validation loss: {before} -> {after}")
    print(
        f"{result.trained_tokens} tokens in {result.train_seconds:.1f}s "
        f"({result.tokens_per_second:.0f} tokens/s), peak memory "
        f"{result.peak_memory_bytes / 2**20:.0f} MiB"
    )
    if result.rope_scaling_factor != 1.0:
        print(f"rope_scaling_factor: {result.rope_scaling_factor:g}")
    return 0


def run_finetune(argv: list[str] | None = None) -> int:
    """Parse argv (sys.argv[1:] when None) and run; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_finetune())
