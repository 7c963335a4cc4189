"""Paged decode attention at Llama-3-8B's shape: the Triton kernel vs gather + SDPA.

    python -m bench.kernels --suite attention [--batch 32] [--contexts 512 4096]

One layer's decode step for --batch sequences of one context length each (32 query heads, 8 KV
heads, head_dim 128, blocks of 16 tokens on shuffled pages): writing the new K/V into the pool
and attending. The Triton path is store_kv + paged_attention; the torch path is serving's SDPA
path before the kernel (Attention._paged: a gathered copy of every sequence's blocks, a dense
mask, SDPA). The bandwidth floor is the bytes of K and V read (plus q, the new K/V and the
output) over the device's bandwidth, measured in the same run by a device-to-device copy.
Target (issue 8): within 1.6x of the floor.
"""

from __future__ import annotations

import argparse

import torch

from bench.gpu_timing import copy_bandwidth, floor_us, time_call
from server.kernels.paged_attention import paged_attention_layer
from server.model.attention import Attention
from server.model.context import AttentionGroup, AttentionMetadata, SeqLayout

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def decode_step(
    batch: int,
    context: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: torch.device,
) -> tuple[Attention, tuple[torch.Tensor, ...], AttentionMetadata]:
    """A layer bound to a pool holding `context - 1` cached tokens per sequence, and the
    step's q, k, v and metadata for both paths (each sequence's last token is the new one)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    blocks = -(-context // block_size)
    num_pages = batch * blocks + 1
    # As the page pool lays a layer out: K and V of a block side by side in one page.
    pool = torch.randn(num_pages, 2, block_size, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    attn = Attention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, None)
    attn.k_cache, attn.v_cache = pool[:, 0], pool[:, 1]
    tables = torch.randperm(num_pages - 1, generator=gen)[: batch * blocks].view(batch, blocks)
    pos = torch.full((batch,), context - 1)
    slot_pages = tables[torch.arange(batch), pos // block_size]

    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device).to(dtype)
    k = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    v = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    # The torch path's decode group, as ModelRunner._group builds it.
    k_range = torch.arange(blocks * block_size)
    group = AttentionGroup(
        q_index=torch.arange(batch, device=device)[:, None],
        valid_rows=torch.arange(batch, device=device),
        out_index=torch.arange(batch, device=device),
        block_tables=tables.to(device),
        mask=(k_range[None, :] <= pos[:, None]).view(batch, 1, 1, -1).to(device),
        ctx_lens=(pos + 1).to(device),
    )
    seqs = SeqLayout(
        q_starts=torch.arange(batch, dtype=torch.int32, device=device),
        q_lens=torch.ones(batch, dtype=torch.int32, device=device),
        ctx_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_tables=tables.to(device, torch.int32),
        max_q_len=1,
    )
    meta = AttentionMetadata(slot_pages.to(device), (pos % block_size).to(device), [group], seqs)
    return attn, (q, k, v), meta


def kv_read_bytes(batch: int, context: int, dtype: torch.dtype) -> int:
    """K and V of every cached token, plus q, the new K/V and the output (the floor's bytes)."""
    size = torch.finfo(dtype).bits // 8
    kv = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * size
    io = 2 * batch * (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM * size
    return kv + io


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")


def run(args: argparse.Namespace) -> list[list[str]]:
    """Print one row per context length; returns the rows for --csv."""
    dtype = DTYPES[args.dtype]
    bandwidth = copy_bandwidth(torch.device("cuda"))
    print(f"# {torch.cuda.get_device_name()}  dtype={args.dtype}  times in us per layer")
    print(f"# device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    header = ["batch", "context", "triton_us", "gather_sdpa_us", "floor_us", "triton_GB/s"]
    header += ["triton/floor", "sdpa/triton", "target"]
    print(" | ".join(header))
    table = [header]
    for context in args.contexts:
        attn, (q, k, v), meta = decode_step(
            args.batch, context, args.block_size, dtype, args.seed, torch.device("cuda")
        )
        kv = (attn.k_cache, attn.v_cache)

        def triton_step(q=q, k=k, v=v, meta=meta, kv=kv) -> torch.Tensor:
            return paged_attention_layer(q, k, v, *kv, meta, None)

        def torch_step(attn=attn, q=q, k=k, v=v, meta=meta) -> torch.Tensor:
            return attn._paged(q, k, v, meta)

        if not args.no_check:
            torch.testing.assert_close(
                triton_step().float(), torch_step().float(), atol=8e-2, rtol=2e-2
            )
        tri = time_call(triton_step, args.warmup, args.iters)
        ref = time_call(torch_step, args.warmup, args.iters)
        num_bytes = kv_read_bytes(args.batch, context, dtype)
        floor = floor_us(num_bytes, bandwidth)
        row = [str(args.batch), str(context), f"{tri:.1f}", f"{ref:.1f}", f"{floor:.1f}"]
        row += [f"{num_bytes / (tri * 1e-6) / 1e9:.0f}", f"{tri / floor:.2f}", f"{ref / tri:.2f}"]
        row += ["floor<=1.6:" + ("ok" if tri <= 1.6 * floor else "MISS")]
        print(" | ".join(row), flush=True)
        table.append(row)
        del attn, q, k, v, meta, kv
        torch.cuda.empty_cache()
    return table
