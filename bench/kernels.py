"""Kernel microbenchmarks on Llama-3-8B shapes; --suite picks which (default lora).

- lora: batched LoRA, Triton SGMV vs a torch loop vs a padded bmm. The padded bmm is S-LoRA's
  ablation: every token gathers its adapter's A and B, zero-padded to the batch's maximum rank,
  into a batch for torch.bmm.
- nf4: the Triton NF4 matmul vs bitsandbytes vs bf16, against the bandwidth floor
  (bench/kernels_nf4.py).
- attention: paged decode attention vs gather + SDPA, against the bandwidth floor
  (bench/kernels_attention.py).

Times are CUDA-event means per call, including each launcher's host-side work. Needs a CUDA GPU:
`python -m bench.kernels --suite SUITE --help`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.gpu_timing import NO_GPU, time_call
from server.lora.ops import Segment, SegmentTensors, SliceWeights, expand_ref, lora_ref, shrink_ref

MIXED_RANKS = (8, 16, 32, 64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class OpShape:
    """One benchmarked operation: shrink, expand or both, on one packed linear."""

    name: str
    kind: str  # "shrink" | "expand" | "lora"
    in_features: int
    widths: tuple[int, ...]


SHAPES = {
    s.name: s
    for s in (
        OpShape("shrink_q", "shrink", 4096, (4096,)),
        OpShape("shrink_qkv", "shrink", 4096, (4096, 1024, 1024)),
        OpShape("shrink_down", "shrink", 14336, (4096,)),
        OpShape("expand_o", "expand", 4096, (4096,)),
        OpShape("expand_qkv", "expand", 4096, (4096, 1024, 1024)),
        OpShape("expand_gate_up", "expand", 4096, (14336, 14336)),
        OpShape("lora_qkv", "lora", 4096, (4096, 1024, 1024)),
    )
}


@dataclass
class Workload:
    """One batch: tokens sorted by adapter, weights scattered in a pool, padded copies for bmm."""

    x: torch.Tensor  # [T, in]
    pool: torch.Tensor  # [P]
    segments: list[Segment]
    meta: SegmentTensors
    out: torch.Tensor  # [T, sum(widths)]
    slice_offsets: list[int]
    slice_widths: list[int]
    token_adapter: torch.Tensor  # [T] int64, sorted
    scalings: torch.Tensor  # [num_adapters] float32
    a_padded: list[torch.Tensor]  # per slice: [num_adapters, R, in]
    b_padded: list[torch.Tensor]  # per slice: [num_adapters, R, width]

    @property
    def max_rank(self) -> int:
        return self.a_padded[0].shape[1]


def make_workload(
    shape: OpShape,
    num_tokens: int,
    ranks: list[int],
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Workload:
    """Tokens drawn uniformly over len(ranks) adapters; adapter i has rank ranks[i] everywhere."""
    gen = torch.Generator().manual_seed(seed)
    num_adapters, in_features, widths = len(ranks), shape.in_features, shape.widths
    token_adapter = torch.randint(num_adapters, (num_tokens,), generator=gen).sort().values
    scalings = torch.rand(num_adapters, generator=gen) + 0.5

    # Each A and Bt lands at a shuffled offset with a gap, as pages of different adapters would.
    mats = [(i, s, kind) for i in range(num_adapters) for s in range(len(widths)) for kind in "ab"]
    offsets: dict[tuple[int, int, str], int] = {}
    cursor = 0
    for j in torch.randperm(len(mats), generator=gen).tolist():
        i, s, kind = mats[j]
        offsets[mats[j]] = cursor
        cursor += ranks[i] * (in_features if kind == "a" else widths[s]) + 64
    torch.manual_seed(seed)
    pool = torch.randn(cursor, dtype=torch.float32, device=device)  # gaps stay random
    for (i, s, kind), off in offsets.items():
        cols = in_features if kind == "a" else widths[s]
        pool[off : off + ranks[i] * cols] /= cols**0.5
    pool = pool.to(dtype)

    segments = []
    adapters, counts = torch.unique_consecutive(token_adapter, return_counts=True)
    start = 0
    for i, n in zip(adapters.tolist(), counts.tolist(), strict=True):
        slices = [
            SliceWeights(offsets[(i, s, "a")], offsets[(i, s, "b")], ranks[i], float(scalings[i]))
            for s in range(len(widths))
        ]
        segments.append(Segment(start, n, slices))
        start += n
    meta = SegmentTensors.from_segments(segments, len(widths), device)

    # Padded to the largest rank among the adapters in this batch; unused adapters stay zero.
    a_padded, b_padded = [], []
    for s, width in enumerate(widths):
        a_pad = torch.zeros(num_adapters, meta.max_rank, in_features, dtype=dtype, device=device)
        b_pad = torch.zeros(num_adapters, meta.max_rank, width, dtype=dtype, device=device)
        for i in adapters.tolist():
            r, a_off, b_off = ranks[i], offsets[(i, s, "a")], offsets[(i, s, "b")]
            a_pad[i, :r] = pool[a_off : a_off + r * in_features].view(r, in_features)
            b_pad[i, :r] = pool[b_off : b_off + r * width].view(r, width)
        a_padded.append(a_pad)
        b_padded.append(b_pad)

    x = torch.randn(num_tokens, in_features, device=device).to(dtype)
    return Workload(
        x=x,
        pool=pool,
        segments=segments,
        meta=meta,
        out=torch.randn(num_tokens, sum(widths), device=device).to(dtype),
        slice_offsets=[sum(widths[:s]) for s in range(len(widths))],
        slice_widths=list(widths),
        token_adapter=token_adapter.to(device),
        scalings=scalings.to(device),
        a_padded=a_padded,
        b_padded=b_padded,
    )


def bmm_shrink(w: Workload) -> torch.Tensor:
    """Padded bmm: gather every token's A (padded to max rank) -> h: [S, T, R] float32."""
    scaling = w.scalings[w.token_adapter][:, None, None]  # [T, 1, 1]
    hs = []
    for a_pad in w.a_padded:
        a_tok = a_pad[w.token_adapter]  # [T, R, in]
        h = torch.bmm(w.x[:, None, :], a_tok.transpose(1, 2))  # [T, 1, R]
        hs.append((h.float() * scaling)[:, 0])
    return torch.stack(hs)


def bmm_expand(w: Workload, h: torch.Tensor) -> None:
    """Padded bmm: gather every token's Bt (padded to max rank) and add h @ Bt into out."""
    for s, b_pad in enumerate(w.b_padded):
        b_tok = b_pad[w.token_adapter]  # [T, R, width]
        delta = torch.bmm(h[s, :, None, : w.max_rank].to(b_tok.dtype), b_tok)  # [T, 1, width]
        col = w.slice_offsets[s]
        w.out[:, col : col + w.slice_widths[s]] += delta[:, 0]


def bmm_gather_bytes(shape: OpShape, w: Workload) -> int:
    """Bytes of the largest per-token gather the padded bmm makes (long prefills run out)."""
    cols = {
        "shrink": [shape.in_features],
        "expand": list(shape.widths),
        "lora": [shape.in_features, *shape.widths],
    }[shape.kind]
    return w.x.shape[0] * w.max_rank * max(cols) * w.x.element_size()


def implementations(shape: OpShape, w: Workload) -> dict[str, Callable[[], object]]:
    """The three contenders for one operation, each a no-argument call."""
    from server.lora.triton_ops import lora_expand, lora_shrink, lora_triton

    args = (w.out, w.slice_offsets, w.slice_widths)
    if shape.kind == "shrink":
        return {
            "triton": lambda: lora_shrink(w.x, w.pool, w.meta),
            "torch_loop": lambda: shrink_ref(w.x, w.pool, w.segments, w.meta.max_rank),
            "padded_bmm": lambda: bmm_shrink(w),
        }
    if shape.kind == "expand":
        h = shrink_ref(w.x, w.pool, w.segments, w.meta.max_rank)  # h: [S, T, R]
        return {
            "triton": lambda: lora_expand(h, w.pool, w.meta, *args),
            "torch_loop": lambda: expand_ref(h, w.pool, w.segments, *args),
            "padded_bmm": lambda: bmm_expand(w, h),
        }
    return {
        "triton": lambda: lora_triton(w.x, w.pool, w.meta, *args),
        "torch_loop": lambda: lora_ref(w.x, w.pool, w.segments, *args),
        "padded_bmm": lambda: bmm_expand(w, bmm_shrink(w)),
    }


def check(shape: OpShape, w: Workload, names: list[str]) -> None:
    """Each contender must compute what the torch loop computes (out is restored afterwards)."""
    impls = implementations(shape, w)
    base = w.out.clone()
    results = {}
    for name in ["torch_loop", *names]:
        w.out.copy_(base)
        h = impls[name]()
        results[name] = (h if isinstance(h, torch.Tensor) else w.out).float().clone()
    w.out.copy_(base)
    tol = 1e-3 if w.x.dtype == torch.float32 else 6e-2
    for name in names:
        torch.testing.assert_close(results[name], results["torch_loop"], atol=tol, rtol=tol)


def adapter_ranks(rank: str, num_adapters: int) -> list[int]:
    """'mixed' cycles through MIXED_RANKS; a number gives every adapter that rank."""
    if rank == "mixed":
        return [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(num_adapters)]
    return [int(rank)] * num_adapters


SUITES = ("lora", "nf4", "attention")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--suite, the arguments every suite shares, and the chosen suite's own."""
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--suite", choices=SUITES, default="lora")
    suite = pick.parse_known_args(argv)[0].suite
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=SUITES, default="lora", help="which kernels (default lora)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--seed", type=int, default=0)
    if suite == "nf4":
        from bench import kernels_nf4

        kernels_nf4.add_args(p)
        return p.parse_args(argv)
    if suite == "attention":
        from bench import kernels_attention

        kernels_attention.add_args(p)
        return p.parse_args(argv)
    return _lora_args(p, argv)


def _lora_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The LoRA sweep: operations x tokens x ranks x adapters."""
    p.add_argument("--ops", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 512, 2048, 8192]
    )  # decode up to 256, prefill from 512
    p.add_argument("--ranks", nargs="+", default=["8", "16", "64", "128", "mixed"])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--bmm-max-gib", type=float, default=4.0, help="skip larger bmm gathers")
    p.add_argument("--quick", action="store_true", help="a small sweep for a smoke run")
    args = p.parse_args(argv)
    for r in args.ranks:
        if r != "mixed" and not (r.isdigit() and int(r) > 0):
            p.error(f"--ranks takes positive integers or 'mixed', got {r!r}")
    if args.quick:
        args.tokens, args.ranks, args.adapters = [1, 64, 2048], ["16", "mixed"], [1, 8]
        args.warmup, args.iters = 3, 10
    return args


def fmt_ratio(num: float | None, den: float) -> str:
    return "-" if num is None else f"{num / den:.2f}"


def main(argv: list[str] | None = None) -> None:
    """Run the chosen suite and print one table row per configuration."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"bench.kernels {NO_GPU}")
    if args.suite == "lora":
        rows = run_lora(args)
    elif args.suite == "nf4":
        from bench import kernels_nf4

        rows = kernels_nf4.run(args)
    else:
        from bench import kernels_attention

        rows = kernels_attention.run(args)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows(rows)


def run_lora(args: argparse.Namespace) -> list[list[str]]:
    """The LoRA sweep; returns the header and rows."""
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    print(f"# {torch.cuda.get_device_name()}  dtype={args.dtype}  times in us per call")
    header = ["op", "tokens", "adapters", "rank", "triton_us", "torch_loop_us", "padded_bmm_us"]
    header += ["loop/triton", "bmm/triton"]
    print(" | ".join(header))
    rows = []
    for op in args.ops:
        shape = SHAPES[op]
        for num_tokens in args.tokens:
            for num_adapters in args.adapters:
                if num_adapters > num_tokens:
                    continue  # at most one adapter per token; the smaller count covers it
                for rank in args.ranks:
                    w = make_workload(
                        shape,
                        num_tokens,
                        adapter_ranks(rank, num_adapters),
                        dtype,
                        device,
                        args.seed,
                    )
                    impls = implementations(shape, w)
                    gib = bmm_gather_bytes(shape, w) / 2**30
                    names = ["triton"] + (["padded_bmm"] if gib <= args.bmm_max_gib else [])
                    if not args.no_check:
                        check(shape, w, names)
                    times: dict[str, float | None] = {"padded_bmm": None}
                    for name in ["torch_loop", *names]:
                        times[name] = time_call(impls[name], args.warmup, args.iters)
                    tri = times["triton"]
                    assert tri is not None
                    row = [op, num_tokens, num_adapters, rank, f"{tri:.1f}"]
                    row += [f"{times['torch_loop']:.1f}"]
                    row += ["-" if times["padded_bmm"] is None else f"{times['padded_bmm']:.1f}"]
                    row += [
                        fmt_ratio(times["torch_loop"], tri),
                        fmt_ratio(times["padded_bmm"], tri),
                    ]
                    print(" | ".join(str(c) for c in row), flush=True)
                    rows.append([str(c) for c in row])
                    del w, impls
                    torch.cuda.empty_cache()
    return [header, *rows]


if __name__ == "__main__":
    main()
