"""Where an engine step's time goes on the CPU, beside the step's lower bound on this machine.

    python -m bench.profile_step [--model default] [--batch 1,32] [--adapters 0,32] [--pyspy]

Each case holds `batch` sequences (prompts of --prompt-len tokens, request i on adapter
i mod `adapters`) in decode and times --steps engine steps (median), then runs as many under
torch.profiler (self time per op, per step) and, with --pyspy, under py-spy (each Python
function's inclusive share of the samples). --prefill adds one case of the serving workload's
other step: as many fresh prompts as fill --max-num-batched-tokens, prefilled in one step.

The floor beside each case: the bytes the step must read (every weight it multiplies by, the
step's adapters, the K/V its queries attend) over the read bandwidth measured here, and its
FLOPs over the float32 GEMM throughput measured here; the larger is the bound. Also measured:
the step's matmuls alone, at its shapes, on the model's own weights (what a step with zero
overhead around its GEMMs would take).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import TARGETS, real_model, synthetic_adapter
from server.model.cpu_runtime import tune_allocator

logger = logging.getLogger("bench.profile_step")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2), a dir or a .gguf")
    p.add_argument("--batch", type=_ints, default=[1, 32])
    p.add_argument("--adapters", type=_ints, default=[0], help="adapters in a step; 0: base")
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prefill", action="store_true", help="also profile a full prefill step")
    p.add_argument("--pyspy", action="store_true", help="also sample Python frames with py-spy")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Machine:
    """What this machine sustains: read bandwidth and float32 GEMM throughput."""

    read_gb_s: float
    gemm_gflop_s: float  # the faster of the two below
    mkl_gflop_s: float  # torch's default float32 GEMM (MKL's sgemm)
    onednn_gflop_s: float  # oneDNN over a prepacked weight (server/model/prepacked.py)

    @classmethod
    def measure(cls) -> Machine:
        x = torch.ones(2**27)  # 512 MiB, far past any cache
        read = min(_timed(lambda: x.sum()) for _ in range(5))
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        mkl = min(_timed(lambda: a @ b) for _ in range(5))
        packed = torch.ops.mkldnn._reorder_linear_weight(b, 2048)
        dnn = min(
            _timed(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
            for _ in range(5)
        )
        flops = 2 * 2048**3 / 1e9
        return cls(x.numel() * 4 / read / 1e9, flops / min(mkl, dnn), flops / mkl, flops / dnn)


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Floor:
    """A step's unavoidable reads and arithmetic, and the time each takes here."""

    bytes_read: float
    flops: float
    machine: Machine

    @property
    def memory_ms(self) -> float:
        return self.bytes_read / self.machine.read_gb_s / 1e6

    @property
    def compute_ms(self) -> float:
        return self.flops / self.machine.gemm_gflop_s / 1e6

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)


@dataclass(frozen=True)
class StepShape:
    """What a step computes: new tokens, rows sampled (the LM head's), K/V rows read (each
    once), query-key pairs attended, and distinct adapters."""

    tokens: int
    rows: int
    keys: int
    pairs: int
    adapters: int


def _floor(engine, step: StepShape, rank: int, machine: Machine) -> Floor:  # type: ignore[no-untyped-def]
    cfg = engine.model_config
    h, kv, inter = cfg.hidden_size, cfg.kv_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * kv) + cfg.q_size * h + 3 * h * inter
    layer_weights = cfg.num_layers * per_layer
    head = cfg.vocab_size * h
    kv_bytes = step.keys * cfg.num_layers * 2 * kv * 4
    # Rank-r LoRA on q, k, v, o: A is [r, in] and B [out, r] for each.
    lora_per_layer = rank * (4 * h + (cfg.q_size + 2 * kv + h))
    lora = cfg.num_layers * lora_per_layer
    attn_flops = 4 * step.pairs * cfg.num_layers * cfg.q_size
    lora_flops = 2 * step.tokens * lora * (step.adapters > 0)
    flops = 2 * step.tokens * layer_weights + lora_flops + 2 * step.rows * head + attn_flops
    weight_bytes = 4 * (layer_weights + head + step.adapters * lora)
    return Floor(weight_bytes + kv_bytes, flops, machine)


def _matmuls_ms(engine, tokens: int, rows: int) -> float:  # type: ignore[no-untyped-def]
    """The step's base matmuls alone (no LoRA, attention or anything between), through the
    served model's own linears (oneDNN over prepacked weights on a CPU) at the step's shapes:
    median of 5."""
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    head = engine.model.lm_head
    x = {w: torch.randn(tokens, m.in_features) for w, m in enumerate(linears) if m is not head}
    xs = torch.randn(rows, head.in_features)

    def run() -> None:
        for w, m in enumerate(linears):
            m(xs if m is head else x[w])

    with torch.inference_mode():
        run()
        return 1000 * statistics.median(_timed(run) for _ in range(5))


def _engine(args: argparse.Namespace, model_dir: Path, size, data_dir: Path):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    config = EngineConfig(
        model=str(model_dir),
        quantize="none",
        dtype="float32",
        device="cpu",
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_loras=32,
        max_lora_rank=args.rank,
        enable_prefix_caching=False,  # every prefill computes its whole prompt
    )
    registry = open_registry(data_dir, config)
    for i in range(max(args.adapters)):
        path = args.cache_dir / f"profile-adapters-{model_dir.name}-r{args.rank}" / f"a{i}"
        registry.register_dir(f"a{i}", synthetic_adapter(path, size, args.rank, TARGETS["attn"], i))
    return LLMEngine(config, registry=registry)


def _add(engine, count: int, adapters: int, prompt_len: int, max_tokens: int, gen) -> None:  # type: ignore[no-untyped-def]
    from server.engine.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(count):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(prompt, params, adapter_name=f"a{i % adapters}" if adapters else None)


def _op_table(prof, steps: int, step_ms: float, top: int) -> list[str]:  # type: ignore[no-untyped-def]
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op | calls per step | self ms per step | share of step |", "|---|---:|---:|---:|"]
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1000 / steps
        lines.append(f"| `{e.key}` | {e.count / steps:.0f} | {ms:.2f} | {ms / step_ms:.0%} |")
    return lines


def _pyspy(out: Path) -> subprocess.Popen:
    spy = Path(sys.executable).parent / "py-spy"  # installed beside this python (dev extra)
    cmd = [
        str(spy) if spy.is_file() else "py-spy",
        "record",
        "--pid",
        str(os.getpid()),
        "--rate",
        "250",
        "--nonblocking",
    ]
    cmd += ["--format", "raw", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def _frame_table(raw: Path, step_ms: float, top: int) -> list[str]:
    """Inclusive share of each Python function (ours, torch's nn) in py-spy's samples."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "step (" not in stack:  # only samples inside an engine step
            continue
        total += int(count)
        functions = {frame.rsplit(":", 1)[0] + ")" for frame in stack.split(";")}
        for f in functions:
            if "server/" in f or "torch/nn/" in f:
                inclusive[f] += int(count)
    lines = ["| Python function | share of step | ms per step |", "|---|---:|---:|"]
    for f, n in inclusive.most_common(top):
        share = n / max(total, 1)
        lines.append(
            f"| `{f.split(' (')[0]}` ({_short(f)}) | {share:.0%} | {share * step_ms:.2f} |"
        )
    return lines


def _short(frame: str) -> str:
    path = frame.split(" (", 1)[1].rstrip(")")
    for root in ("server/", "torch/"):
        if root in path:
            return root + path.split(root, 1)[1]
    return path


def _profile(
    engine, args: argparse.Namespace, steps, title: str, shape: StepShape, machine: Machine
) -> None:  # type: ignore[no-untyped-def]
    """Time `steps()` (a list of step callables), then profile fresh ones; print the tables."""
    times = [_timed(s) for s in steps()]
    step_ms = 1000 * statistics.median(times)
    floor = _floor(engine, shape, args.rank, machine)
    matmul_ms = _matmuls_ms(engine, shape.tokens, shape.rows)
    print(f"\n### {title}\n")
    print(
        f"step {step_ms:.1f} ms (median of {len(times)}); floor {floor.ms:.1f} ms "
        f"(reads {floor.bytes_read / 1e6:.0f} MB: {floor.memory_ms:.1f} ms; "
        f"{floor.flops / 1e9:.2f} GFLOP: {floor.compute_ms:.1f} ms); "
        f"its base matmuls alone {matmul_ms:.1f} ms\n"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        batch = steps()
        for s in batch:
            s()
    print("\n".join(_op_table(prof, len(batch), step_ms, args.top)))
    if args.pyspy:
        raw = Path(tempfile.mkstemp(suffix=".txt")[1])
        spy = _pyspy(raw)
        for s in steps():
            s()
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        print()
        print("\n".join(_frame_table(raw, step_ms, args.top)))


def _name_c_kernels() -> None:
    """The C kernels are ctypes calls, which torch.profiler does not see: time them as named
    ranges (their self time is the kernel's)."""
    from server.kernels import cpu_kernels

    for name in ("decode_attention", "lora_short_segments"):
        fn = getattr(cpu_kernels.CPUKernels, name)

        def named(self, *args, _fn=fn, _label=f"C {name}", **kwargs):  # type: ignore[no-untyped-def]
            with torch.profiler.record_function(_label):
                return _fn(self, *args, **kwargs)

        setattr(cpu_kernels.CPUKernels, name, named)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `loraplex serve` does
    _name_c_kernels()
    model_dir, size = real_model(args.model)
    machine = Machine.measure()
    print(
        f"model {model_dir.name}, {args.threads} threads, torch {torch.__version__}; measured "
        f"here: read {machine.read_gb_s:.1f} GB/s, float32 GEMM {machine.mkl_gflop_s:.0f} "
        f"GFLOP/s (MKL), {machine.onednn_gflop_s:.0f} GFLOP/s (oneDNN, prepacked)"
    )
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as data:
        engine = _engine(args, model_dir, size, Path(data))
        for adapters in args.adapters:
            for batch in args.batch:
                _decode_case(engine, args, batch, adapters, machine, gen)
            if args.prefill:
                _prefill_case(engine, args, adapters, machine, gen)
    return 0


def _decode_case(engine, args, batch: int, adapters: int, machine: Machine, gen) -> None:  # type: ignore[no-untyped-def]
    _add(engine, batch, adapters, args.prompt_len, 1000, gen)
    sched = engine.scheduler
    while sched.waiting or any(len(s.token_ids) <= args.prompt_len for s in sched.running):
        engine.step()
    for _ in range(3):
        engine.step()  # warm
    keys = sum(len(s.token_ids) for s in sched.running) + batch * args.steps // 2
    shape = StepShape(batch, batch, keys, keys, min(adapters, batch))
    title = f"decode, batch {batch}, " + (f"{adapters} adapters" if adapters else "base")
    _profile(engine, args, lambda: [engine.step] * args.steps, title, shape, machine)
    engine.abort_all()


def _prefill_case(engine, args, adapters: int, machine: Machine, gen) -> None:  # type: ignore[no-untyped-def]
    count = engine.config.max_num_batched_tokens // args.prompt_len
    tokens = count * args.prompt_len

    def one() -> None:
        _add(engine, count, adapters, args.prompt_len, 1, gen)
        engine.step()
        engine.abort_all()

    pairs = count * args.prompt_len * (args.prompt_len + 1) // 2
    shape = StepShape(tokens, count, tokens, pairs, min(adapters, count))
    title = f"prefill, {count} prompts of {args.prompt_len} tokens, " + (
        f"{adapters} adapters" if adapters else "base"
    )
    _profile(engine, args, lambda: [one] * 3, title, shape, machine)


if __name__ == "__main__":
    raise SystemExit(main())
