"""Inputs and references for the NF4 matmul and paged attention kernel tests (CPU and GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.model.context import SeqLayout
from server.model.quant import import_bitsandbytes, nf4_linear

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device() -> torch.device | None:
    """CUDA when there is a GPU, else the CPU under Triton's interpreter; None if neither."""
    if torch.cuda.is_available() and not INTERPRET:
        return torch.device("cuda")
    return torch.device("cpu") if INTERPRET else None


TOLERANCES = {  # (atol, rtol): kernels accumulate in fp32, references may round differently
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---- NF4 ------------------------------------------------------------------------------------


@dataclass
class NF4Case:
    """A bitsandbytes NF4 linear and what bitsandbytes says it computes."""

    linear: nn.Module  # bitsandbytes Linear4bit
    dense: torch.Tensor  # [N, K] bitsandbytes' dequantize_4bit, in the compute dtype
    bias: torch.Tensor | None  # [N]

    def reference(self, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """F.linear on bitsandbytes' dequantized weight (float32 math, as the kernel)."""
        start, stop = rows if rows is not None else (0, self.dense.shape[0])
        bias = self.bias[start:stop].float() if self.bias is not None else None
        return F.linear(x.float(), self.dense[start:stop].float(), bias)


def nf4_case(
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    device: torch.device,
    bias: bool = False,
    nested: bool = True,
    seed: int = 0,
) -> NF4Case:
    """Quantize a random [out, in] linear the way the loader does (double quant unless told)."""
    bnb = import_bitsandbytes()
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    if bias:
        nn.init.uniform_(dense.bias, -0.5, 0.5)
    if nested:
        linear = nf4_linear(dense, dtype, device)
    else:
        plain = dict(compress_statistics=False, quant_type="nf4")
        linear = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias, compute_dtype=dtype, **plain
        )
        linear.weight = bnb.nn.Params4bit(
            dense.weight.data.to(dtype), requires_grad=False, blocksize=64, **plain
        )
        if bias:
            linear.bias = nn.Parameter(dense.bias.data.to(dtype), requires_grad=False)
        linear = linear.to(device)
    weight = linear.weight
    deq = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return NF4Case(linear, deq, linear.bias.data if bias else None)


# ---- paged attention ----------------------------------------------------------------------


@dataclass
class PagedBatch:
    """A step's queries over a NaN-filled pool in which only the live slots hold K/V."""

    q: torch.Tensor  # [T, heads, dim]
    k_cache: torch.Tensor  # [pages, block, kv_heads, dim], a strided view of a larger pool
    v_cache: torch.Tensor
    seqs: SeqLayout
    live: torch.Tensor  # [pages, block] bool, slots written with real K/V


def paged_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> PagedBatch:
    """Sequences with shuffled pages, spare pages, and NaN in every slot no sequence owns yet."""
    assert all(1 <= q <= c for q, c in zip(q_lens, ctx_lens, strict=True))
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-c // block_size) for c in ctx_lens]
    num_pages = sum(blocks) + 3
    # As the page pool: [pages, layers, K/V, block, kv_heads, dim]; layer 1 of 2 is the view.
    shape = (num_pages, 2, 2, block_size, num_kv_heads, head_dim)
    pool = torch.full(shape, float("nan"), dtype=dtype)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    live = torch.zeros(num_pages, block_size, dtype=torch.bool)
    order = torch.randperm(num_pages, generator=gen).tolist()
    # Table padding points at a NaN page, as a stale table entry would.
    tables = torch.full((len(q_lens), max(blocks) + 1), order[-1], dtype=torch.int32)
    used = 0
    for b, ctx in enumerate(ctx_lens):
        pages = order[used : used + blocks[b]]
        used += blocks[b]
        tables[b, : blocks[b]] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(ctx):
            page, off = pages[pos // block_size], pos % block_size
            k_cache[page, off] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[page, off] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            live[page, off] = True
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    q_starts = torch.cumsum(torch.tensor([0, *q_lens[:-1]]), 0)
    seqs = SeqLayout(
        q_starts=q_starts.to(device, torch.int32),
        q_lens=torch.tensor(q_lens, dtype=torch.int32, device=device),
        ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_q_len=max(q_lens),
    )
    pool = pool.to(device)
    return PagedBatch(q.to(device), pool[:, 1, 0], pool[:, 1, 1], seqs, live.to(device))
