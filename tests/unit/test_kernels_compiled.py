"""Every kernel variant the engine launches compiles for an H100, without a GPU: no spills, and
shared memory, registers and warps within what an SM offers.

bench.kernels_compiled drives the project's launchers with the kernels swapped for recorders,
over Llama-3-8B, Mistral-7B, Qwen2-7B and SmolLM2-135M shapes, fp16 and bf16, decode-graph
buckets up to 256 sequences, eager decode and a 2048-token prefill, LoRA ranks 8/16/64, and
compiles each distinct specialisation with the ptxas of the triton wheel. CI compiles for sm_90
only (about 100 variants, 2-3 minutes on 2 cores); `python -m bench.kernels_compiled` adds
sm_80 (the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from bench.kernels_compiled import TARGETS, blocks_per_sm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_engine_kernel_variant_compiles_for_h100_without_spills(tmp_path):
    # The bench compiles (so it needs JITFunctions, not the interpreter this process runs).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    report = tmp_path / "variants.json"
    jobs = str(max(1, min(os.cpu_count() or 1, 4)))
    command = ["-m", "bench.kernels_compiled", "--targets", "sm_90", "--jobs", jobs]
    done = subprocess.run(
        [sys.executable, *command, "--json", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert report.is_file(), done.stderr[-3000:]
    variants = json.loads(report.read_text())["variants"]
    problems = [f"{v['kernel']} {v['constexprs']}: {p}" for v in variants for p in v["problems"]]
    assert not problems, "\n".join(problems)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = {v["kernel"] for v in variants}
    assert kernels == {
        "nf4_matmul_kernel",
        "nf4_dequantize_kernel",
        "paged_attention_kernel",
        "reduce_parts_kernel",
        "store_kv_kernel",
        "shrink_kernel",
        "expand_kernel",
    }
    for v in variants:
        assert v["spill_stores"] == v["spill_loads"] == v["stack_bytes"] == 0
        assert v["blocks_per_sm"] >= 1 and v["smem"] <= TARGETS["sm_90"].smem_per_block


def test_blocks_per_sm_follow_registers_shared_memory_and_warps():
    h100 = TARGETS["sm_90"]
    assert blocks_per_sm(h100, regs=32, num_warps=4, smem=0) == 16  # 64 warps per SM
    assert blocks_per_sm(h100, regs=128, num_warps=4, smem=0) == 4  # 64K registers
    assert blocks_per_sm(h100, regs=129, num_warps=4, smem=0) == 3  # 136 after rounding
    assert blocks_per_sm(h100, regs=64, num_warps=4, smem=100 * 1024) == 2  # 228 KiB per SM
    assert blocks_per_sm(h100, regs=255, num_warps=8, smem=0) == 1
    assert blocks_per_sm(TARGETS["sm_80"], regs=64, num_warps=4, smem=100 * 1024) == 1
