"""NF4 matmul on Llama-3-8B's linears: the Triton kernel vs bitsandbytes vs a bf16 matmul.

    python -m bench.kernels --suite nf4 [--tokens 1 8 32 64 256] [--dtype bf16]

For each (in x out) shape and token count M: the Triton kernel reading the packed NF4 storage;
bitsandbytes' path as serving ran it before (Linear4bit.forward: matmul_4bit); torch.matmul on
a dequantized bf16 copy of the weight (what 16-bit weights would cost); and the bandwidth floor:
the bytes of the packed weight, its scales and the activations over the device's bandwidth,
measured in the same run by a device-to-device copy. Targets (issue 8): M <= 32 within 1.6x of
the floor and >= 3x bitsandbytes at M = 32; M >= 256 within 1.5x of the bf16 matmul.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.gpu_timing import copy_bandwidth, floor_us, time_call
from server.kernels.nf4_matmul import NF4Weight, nf4_matmul
from server.model.quant import import_bitsandbytes, nf4_linear

# (in_features, out_features): q/o, k/v, gate/up (each half of the packed linear), down.
SHAPES = {
    "4096x4096": (4096, 4096),
    "4096x1024": (4096, 1024),
    "4096x14336": (4096, 14336),
    "14336x4096": (14336, 4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Row:
    shape: str
    tokens: int
    triton_us: float
    bnb_us: float
    bf16_us: float
    floor_us: float
    floor_bytes: int

    def targets(self) -> str:
        """Which of issue 8's targets apply to this row, and whether it meets them."""
        checks = []
        if self.tokens <= 32:
            checks.append(("floor<=1.6", self.triton_us <= 1.6 * self.floor_us))
        if self.tokens == 32:
            checks.append(("bnb>=3x", self.bnb_us >= 3 * self.triton_us))
        if self.tokens >= 256:
            checks.append(("bf16<=1.5", self.triton_us <= 1.5 * self.bf16_us))
        return " ".join(f"{name}:{'ok' if met else 'MISS'}" for name, met in checks) or "-"


def packed_bytes(weight: NF4Weight) -> int:
    """Bytes the kernel must read for the weight: codes, absmax codes, nested scales, tables."""
    tensors = [weight.packed, weight.absmax, weight.code]
    tensors += [t for t in (weight.absmax2, weight.code2) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(
    shape: str,
    tokens: list[int],
    dtype: torch.dtype,
    bandwidth: float,
    args: argparse.Namespace,
    device: torch.device,
) -> list[Row]:
    """Time the three paths at each token count on one shape (one quantized weight)."""
    bnb = import_bitsandbytes()
    in_features, out_features = SHAPES[shape]
    torch.manual_seed(args.seed)
    linear = nf4_linear(nn.Linear(in_features, out_features, bias=False), dtype, device)
    weight = NF4Weight.from_bnb(linear.weight.data, linear.weight.quant_state)
    dense = bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    w_bytes = packed_bytes(weight)
    rows = []
    for m in tokens:
        x = torch.randn(m, in_features, device=device).to(dtype)
        if not args.no_check:
            want = F.linear(x.float(), dense.float())
            torch.testing.assert_close(nf4_matmul(x, weight).float(), want, atol=8e-2, rtol=2e-2)
        io_bytes = (m * in_features + m * out_features) * x.element_size()
        rows.append(
            Row(
                shape=shape,
                tokens=m,
                triton_us=time_call(lambda x=x: nf4_matmul(x, weight), args.warmup, args.iters),
                bnb_us=time_call(lambda x=x: linear(x), args.warmup, args.iters),
                bf16_us=time_call(lambda x=x: torch.matmul(x, dense.T), args.warmup, args.iters),
                floor_us=floor_us(w_bytes + io_bytes, bandwidth),
                floor_bytes=w_bytes + io_bytes,
            )
        )
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")


def run(args: argparse.Namespace) -> list[list[str]]:
    """Print one row per (shape, M); returns the rows for --csv."""
    dtype = DTYPES[args.dtype]
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"# {torch.cuda.get_device_name()}  dtype={args.dtype}  times in us per call")
    print(f"# device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    header = ["shape(in x out)", "M", "triton_us", "bnb_us", "bf16_us", "floor_us"]
    header += ["triton_GB/s", "triton/floor", "bnb/triton", "triton/bf16", "targets"]
    print(" | ".join(header))
    table = [header]
    for shape in args.shapes:
        measured = measure(shape, args.tokens, dtype, bandwidth, args, torch.device("cuda"))
        torch.cuda.empty_cache()  # this shape's weights are gone with measure's frame
        for r in measured:
            row = [r.shape, str(r.tokens), f"{r.triton_us:.1f}", f"{r.bnb_us:.1f}"]
            row += [f"{r.bf16_us:.1f}", f"{r.floor_us:.1f}"]
            row += [f"{r.floor_bytes / (r.triton_us * 1e-6) / 1e9:.0f}"]
            row += [f"{r.triton_us / r.floor_us:.2f}", f"{r.bnb_us / r.triton_us:.2f}"]
            row += [f"{r.triton_us / r.bf16_us:.2f}", r.targets()]
            print(" | ".join(row), flush=True)
            table.append(row)
    return table
