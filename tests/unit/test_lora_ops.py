"""The CPU LoRA path (views + addmm) computes exactly what the shrink/expand reference says."""

from __future__ import annotations

import pytest
import torch

from server.lora.ops import ModuleWeights, Segment, SliceWeights, lora_apply, lora_ref

WIDTHS = (48, 16, 16)  # q, k, v under GQA
IN = 32


def _batch(ranks: list[list[int]], lengths: list[int], gap: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Segments of the given per-slice ranks, with tokens of no adapter between them."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(200_000, generator=gen)
    segments, runs = [], []
    offset, start = 1000, gap
    for slice_ranks, length in zip(ranks, lengths, strict=True):
        total = sum(slice_ranks)
        a_block = offset
        offset += total * IN + 777  # scattered, unaligned
        weights, views, row = [], [], 0
        for s, rank in enumerate(slice_ranks):
            if rank == 0:
                weights.append(None)
                continue
            b = offset
            offset += rank * WIDTHS[s] + 333
            scaling = 0.5 + s
            weights.append(SliceWeights(a_block + row * IN, b, rank, scaling))
            views.append((s, row, pool[b : b + rank * WIDTHS[s]].view(rank, WIDTHS[s]), scaling))
            row += rank
        a = pool[a_block : a_block + total * IN].view(total, IN)
        segments.append(Segment(start, length, weights))
        runs.append((start, length, ModuleWeights(a, tuple(views))))
        start += length + gap
    x = torch.randn(start, IN, generator=gen)
    out = torch.randn(start, sum(WIDTHS), generator=gen)
    return pool, x, out, segments, runs


@pytest.mark.parametrize(
    ("ranks", "lengths"),
    [
        ([[4, 4, 4]], [1]),
        ([[8, 2, 2], [1, 0, 3], [16, 16, 0]], [1, 5, 3]),
        ([[2, 2, 2]] * 6, [1] * 6),
    ],
)
def test_cpu_path_matches_reference(ranks, lengths):
    pool, x, out, segments, runs = _batch(ranks, lengths, gap=2)
    want = out.clone()
    lora_ref(x, pool, segments, want, (0, 48, 64), WIDTHS)
    got = out.clone()
    lora_apply(x, got, runs, (0, 48, 64), WIDTHS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tokens_without_an_adapter_are_untouched():
    _, x, out, _, runs = _batch([[4, 4, 4], [2, 2, 2]], [2, 2], gap=3)
    got = out.clone()
    lora_apply(x, got, runs, (0, 48, 64), WIDTHS)
    covered = torch.zeros(len(out), dtype=torch.bool)
    for start, length, _ in runs:
        covered[start : start + length] = True
    assert torch.equal(got[~covered], out[~covered])
    assert not torch.equal(got[covered], out[covered])
