"""Kernel launches per decode step, counted on the CPU: the kernel path at a real model's shape,
the rest of the model through the engine's own forward.

    python -m bench.launch_count [--model llama3-8b] [--batch 32] [--rank 16]

Kernel path (NF4 linears, LoRA on every linear, paged attention): one decode-graph step of
--batch sequences with --batch distinct adapters, through the launchers with the engine's
layouts at the model's real shape (bench.kernel_variants), every Triton kernel swapped for a
recorder (nothing runs), every torch operator that would launch a kernel on a GPU counted
(all but views and allocations). Shape matters: tile and split choices follow it. Layers 0
and 1 are driven; the LoRA metadata a step gathers once shows as layer 0's surplus.

Rest of the model (embedding, norms, RoPE, activation, residual adds, LM head): an engine on
a small random model of the same family runs a prefill, then a decode step whose forward is
counted the same way; its operators do not depend on the width. Counted at 2 and 4 layers to
split what a layer launches from what the step launches once.

A decode CUDA graph replays the same launches, each still a kernel node of its own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import ModelSize, random_model

# Operators that launch nothing on a GPU: allocations and bookkeeping.
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_NO_LAUNCH |= {"lift_fresh", "_local_scalar_dense", "set_", "resize_", "record_stream"}


class LaunchCounter(TorchDispatchMode):
    """Counts kernel-launching torch operators (and recorded Triton launches) per region."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.labels = ["rest of the model"]

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        self.labels.append(label)
        try:
            yield
        finally:
            self.labels.pop()

    def add(self, *_: object) -> None:
        self.counts[self.labels[-1]] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.add()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernel_path_apart(model: torch.nn.Module, counter: LaunchCounter) -> Iterator[None]:
    """Launches of the kernel-path modules (NF4 linears, LoRA, attention) under their own
    label, so what is left is the rest of the model's."""
    originals = {}
    for module in model.modules():
        if type(module).__name__ in ("TritonNF4Linear", "LoRALinear", "Attention"):
            forward = module.forward

            def wrapped(*args, _forward=forward, **kwargs):  # type: ignore[no-untyped-def]
                with counter.region("kernel path"):
                    return _forward(*args, **kwargs)

            originals[module] = forward
            module.forward = wrapped  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, forward in originals.items():
            module.forward = forward  # type: ignore[method-assign]


def rest_of_model(layers: int, work: Path) -> int:
    """Launches outside the kernel path in one decode step of a small model of `layers`."""
    from bench.kernel_variants import recording_launches
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_runner import ModelRunner
    from server.engine.sampling_params import SamplingParams

    size = ModelSize(layers=layers, hidden=256, intermediate=512, heads=4, kv_heads=2)
    config = EngineConfig(
        model=str(random_model(work / f"model-{layers}", size)), device="cpu", dtype="float16",
        quantize="nf4", pool_mb=32, kernel_backend="triton", max_num_seqs=4,
    )  # fmt: skip
    engine = LLMEngine(config)
    counter = LaunchCounter()
    run = ModelRunner.run

    def counted(self, step):  # type: ignore[no-untyped-def]
        if step.num_decode_only is None or counter.counts:
            return run(self, step)  # the prefill runs for real (in the interpreter on a CPU)
        with recording_launches() as rec, _kernel_path_apart(self.model, counter), counter:
            rec.on_launch = counter.add
            return run(self, step)

    ModelRunner.run = counted  # type: ignore[method-assign]
    try:
        engine.generate([[1, 5, 9, 2]], SamplingParams(max_tokens=2, ignore_eos=True))
    finally:
        ModelRunner.run = run  # type: ignore[method-assign]
    return counter.counts["rest of the model"]


def kernel_path(model: str, batch: int, rank: int) -> dict[str, tuple[int, int]]:
    """(per layer, once per step) launches of NF4 linears, LoRA and attention in a decode-graph
    step at the model's shape."""
    from bench import kernel_variants as kv
    from server.lora.backends import LORA_OPS
    from server.lora.batch import LoRABatch

    cfg, dtype = kv.MODELS[model], torch.bfloat16
    shape = kv.ServingShape(max_num_seqs=batch, max_lora_ranks=(rank,), max_loras=batch)
    engine = kv._engine(cfg, dtype, shape, rank)
    weights = kv._nf4_weights(cfg)
    meta = kv._attention_meta(engine, batch, batch, None)
    graph = (engine.tables, LORA_OPS["triton"], engine.segment_buffers, rank, batch)
    lora = LoRABatch.for_graph(engine.pool.buffer.view(-1), *graph)
    counts: dict[str, list[int]] = {"nf4 linear": [], "lora": [], "attention": []}
    for layer in (0, 1):
        counter = LaunchCounter()
        layers = range(layer, layer + 1)
        with kv.recording_launches() as rec, counter:
            rec.on_launch = counter.add
            with counter.region("nf4 linear"):
                kv.drive_linears(cfg, dtype, batch, weights)
            with counter.region("attention"):
                kv.drive_attention(cfg, dtype, engine.pool, meta, batch, layers)
            with counter.region("lora"):
                kv.drive_lora(cfg, dtype, lora, batch, layers)
        for name in counts:
            counts[name].append(counter.counts[name])
    return {name: (n[1], n[0] - n[1]) for name, n in counts.items()}


def table(model: str, kernel: dict[str, tuple[int, int]], rest: tuple[int, int]) -> list[str]:
    """Per layer and per step (the model's layer count), by part of the step."""
    from bench.kernel_variants import MODELS

    layers = MODELS[model].num_layers
    rows = [(name, per_layer, once) for name, (per_layer, once) in kernel.items()]
    rows.append(("rest of the model", *rest))
    lines = ["| part | per layer | once per step | per step |", "|---|---:|---:|---:|"]
    for name, per_layer, once in rows:
        lines.append(f"| {name} | {per_layer} | {once} | {per_layer * layers + once} |")
    total = sum(per_layer * layers + once for _, per_layer, once in rows)
    lines.append(f"| **total** ({layers} layers) | | | **{total}** |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Count, print the table."""
    from bench.kernel_variants import MODELS

    p = argparse.ArgumentParser(prog="python -m bench.launch_count", description=__doc__)
    p.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    p.add_argument("--batch", type=int, default=32, help="sequences, each its own adapter")
    p.add_argument("--rank", type=int, default=16, help="--max-lora-rank")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # the counted step's outputs are garbage, by design
    kernel = kernel_path(args.model, args.batch, args.rank)
    with tempfile.TemporaryDirectory() as work:
        two, four = (rest_of_model(n, Path(work)) for n in (2, 4))
    per_layer = (four - two) // 2
    print(
        f"# one decode-graph step of {args.model}, batch {args.batch}, {args.batch} adapters "
        f"of rank {args.rank} on every linear"
    )
    for line in table(args.model, kernel, (per_layer, two - 2 * per_layer)):
        print(line)


if __name__ == "__main__":
    if not torch.cuda.is_available():  # the small model's prefill runs in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
