"""The GPU serving benchmark: loraplex on a random checkpoint of Llama-3-8B's shape, NF4.

    python -m bench.serving_gpu [--json out.json]

1. Decode steps at batch 1, 8, 32, 64: base only, with 32 distinct rank-16 adapters on
   q/k/v/o, and on all linears; tokens/s, the step time, the achieved GB/s and the ratio to
   the bandwidth floor (packed weights + the KV read + the distinct adapters' bytes, over the
   device-to-device copy bandwidth measured in the same run).
2. S-LoRA's workload at 5, 100 and 1,000 adapters, and transformers + PEFT + bitsandbytes
   (NF4) on the same GPU at 100 adapters: one adapter per batch, and PEFT's mixed batch.

Needs a CUDA GPU (about 40 GB free for the PEFT baseline) and about 20 GB of disk for the
checkpoint (built once under --cache-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import TARGETS, ModelSize, random_model, synthetic_adapter
from bench.gpu_timing import NO_GPU, copy_bandwidth, floor_us
from bench.runners import Result, run_loraplex, run_peft
from bench.workload import WorkloadSpec, generate

LLAMA3_8B = ModelSize(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, max_len=4096
)
RANK = 16


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]  # "" is none (e.g. --peft-at "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, default=512, help="prompt tokens per decode sequence")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per point")
    p.add_argument("--adapters", type=_ints, default=[5, 100, 1000], help="S-LoRA counts")
    p.add_argument("--peft-at", type=_ints, default=[100])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--layers", type=int, default=LLAMA3_8B.layers, help="fewer for a smoke run")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-gpu")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _engine(model_dir: Path, data_dir: Path, args: argparse.Namespace, max_seqs: int):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.setup import open_registry

    config = EngineConfig(
        model=str(model_dir),
        quantize="nf4",
        dtype="bfloat16",
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max(4096, max_seqs),
        max_lora_rank=RANK,
        max_loras=max(32, max_seqs),
        max_model_len=args.context + args.steps + 64,
        enforce_eager=args.enforce_eager,
    )
    registry = open_registry(data_dir, config)
    return LLMEngine(config, registry=registry), registry


def _adapter_bytes(size: ModelSize, targets: tuple[str, ...], dtype_bytes: int) -> int:
    """Bytes of one adapter's A and B over every layer."""
    dims = size.linear_shapes
    per_layer = sum(RANK * (dims[m][0] + dims[m][1]) for m in targets)
    return size.layers * per_layer * dtype_bytes


def decode_points(args: argparse.Namespace, size: ModelSize, model_dir: Path) -> list[dict]:
    """Decode-step timings at each batch, base only and with 32 distinct adapters."""
    from server.engine.sampling_params import SamplingParams
    from server.model.loader import module_bytes

    rows = []
    bandwidth = copy_bandwidth(torch.device("cuda"))
    for targets_name in (None, "attn", "all-linear"):
        with tempfile.TemporaryDirectory() as data:
            engine, registry = _engine(model_dir, Path(data), args, max(args.batches))
            names: list[str | None] = [None]
            if targets_name is not None:
                targets = TARGETS[targets_name]
                cache = args.cache_dir / f"adapters-{size.layers}-{targets_name}-r{RANK}"
                names = [f"a{i}" for i in range(32)]
                for i, name in enumerate(names):
                    path = synthetic_adapter(cache / name, size, RANK, targets, seed=i)
                    registry.register_dir(name, path)
            weights = module_bytes(engine.model)
            for batch in args.batches:
                prompts = [
                    [1 + (i * 7 + j) % (size.vocab - 2) for j in range(args.context)]
                    for i in range(batch)
                ]
                params = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
                for i, prompt in enumerate(prompts):
                    engine.add_request(prompt, params, adapter_name=names[i % len(names)])
                while any(s.num_computed_tokens < s.num_prompt_tokens for s in _running(engine)):
                    engine.step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()  # ends with the sampled tokens' copy to the host
                step_us = (time.perf_counter() - start) / args.steps * 1e6
                engine.abort_all()
                distinct = min(batch, len(names)) if targets_name else 0
                kv = batch * (args.context + args.steps // 2) * size.layers * 2
                kv *= size.hidden // size.heads * size.kv_heads * 2
                adapters = distinct * _adapter_bytes(size, TARGETS.get(targets_name or "", ()), 2)
                total = weights + kv + adapters
                rows.append(
                    {
                        "adapters": targets_name or "base",
                        "batch": batch,
                        "step ms": round(step_us / 1e3, 3),
                        "tok/s": round(batch / (step_us * 1e-6), 1),
                        "GB/s": round(total / (step_us * 1e-6) / 1e9, 1),
                        "x floor": round(step_us / floor_us(total, bandwidth), 2),
                    }
                )
                print(rows[-1], flush=True)
            if engine.adapter_cache is not None:
                engine.adapter_cache.shutdown()
            registry.store.close()
            del engine
            torch.cuda.empty_cache()
    return rows


def _running(engine) -> list:  # type: ignore[no-untyped-def]
    return list(engine.scheduler.running) + list(engine.scheduler.waiting)


def slora_points(args: argparse.Namespace, size: ModelSize, model_dir: Path) -> list[dict]:
    """S-LoRA's workload on loraplex at each adapter count, then PEFT baselines."""
    targets = TARGETS["attn"]
    cache = args.cache_dir / f"adapters-{size.layers}-attn-r{RANK}"
    total = max(args.adapters + args.peft_at)
    dirs = [synthetic_adapter(cache / f"a{i}", size, RANK, targets, seed=i) for i in range(total)]
    names = [f"a{i}" for i in range(total)]
    rows: list[dict] = []

    def spec(n: int) -> WorkloadSpec:
        return WorkloadSpec(
            num_requests=args.requests, num_adapters=n, rate=args.rate, vocab=size.vocab
        )

    for n in args.adapters:
        with tempfile.TemporaryDirectory() as data:
            engine, registry = _engine(model_dir, Path(data), args, 32)
            for i in range(n):
                registry.register_dir(names[i], dirs[i])
            result = run_loraplex(engine, generate(spec(n)), names)
            rows.append({"adapters": n, **result.row()})
            print(rows[-1], flush=True)
            engine.adapter_cache.shutdown()
            registry.store.close()
            del engine
            torch.cuda.empty_cache()
    for n in args.peft_at:
        model = _load_peft_nf4(model_dir, dirs[:n], names[:n])
        for mixed in (False, True):
            result: Result = run_peft(model, generate(spec(n)), names, 32, mixed)
            rows.append({"adapters": n, **result.row()})
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def _load_peft_nf4(model_dir: Path, adapter_dirs: list[Path], names: list[str]):  # type: ignore[no-untyped-def]
    """transformers + bitsandbytes NF4 base on the GPU, every adapter loaded in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda"
    ).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for path, name in zip(adapter_dirs[1:], names[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench.serving_gpu {NO_GPU}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    size = ModelSize(**{**LLAMA3_8B.__dict__, "layers": args.layers})
    model_dir = random_model(
        args.cache_dir / f"llama3-8b-shape-{size.layers}", size, dtype=torch.bfloat16
    )
    device = torch.cuda.get_device_name()
    print(f"device: {device}; model: {size.describe()}, NF4; adapters rank {RANK}", flush=True)
    results = {
        "device": device,
        "decode": decode_points(args, size, model_dir),
        "slora": slora_points(args, size, model_dir),
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
