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


# ---- the C kernel for short segments (server/kernels/cpu/lora_segments.c) -------------------


@pytest.fixture(scope="module")
def cpu_kernels():  # type: ignore[no-untyped-def]
    import shutil

    from server.kernels import cpu_kernels as module

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    return module.CPUKernels(module.build())


def _tables(segments: list[Segment]):  # type: ignore[no-untyped-def]
    from server.lora.ops import SegmentTensors

    slices = (torch.tensor((0, 48, 64)), torch.tensor(WIDTHS))
    return SegmentTensors.from_segments(segments, len(WIDTHS), torch.device("cpu")), slices


@pytest.mark.parametrize(
    ("ranks", "lengths"),
    [
        ([[4, 4, 4]], [1]),
        ([[8, 2, 2], [1, 0, 3], [16, 16, 0]], [1, 5, 3]),
        ([[2, 2, 2]] * 6, [1] * 6),
        ([[64, 8, 8], [3, 5, 7]], [2, 16]),
    ],
)
def test_c_kernel_matches_reference(cpu_kernels, ranks, lengths):  # type: ignore[no-untyped-def]
    pool, x, out, segments, _ = _batch(ranks, lengths, gap=2)
    want = out.clone()
    lora_ref(x, pool, segments, want, (0, 48, 64), WIDTHS)
    got = out.clone()
    meta, (offsets, widths) = _tables(segments)
    cpu_kernels.lora_short_segments(x, got, pool, meta, offsets, widths, max_len=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_c_kernel_leaves_longer_segments_and_adapterless_tokens_alone(cpu_kernels):  # type: ignore[no-untyped-def]
    """Segments past max_len are the torch path's: together the two give the reference."""
    pool, x, out, segments, runs = _batch([[4, 4, 4], [2, 2, 2], [8, 0, 8]], [3, 20, 1], gap=3)
    want = out.clone()
    lora_ref(x, pool, segments, want, (0, 48, 64), WIDTHS)
    got = out.clone()
    meta, (offsets, widths) = _tables(segments)
    cpu_kernels.lora_short_segments(x, got, pool, meta, offsets, widths, max_len=16)
    long_run = runs[1]
    start, length = long_run[0], long_run[1]
    assert torch.equal(got[start : start + length], out[start : start + length])
    covered = torch.zeros(len(out), dtype=torch.bool)
    for s, n, _ in runs:
        covered[s : s + n] = True
    assert torch.equal(got[~covered], out[~covered])
    lora_apply(x, got, [long_run], (0, 48, 64), WIDTHS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
