"""The Triton LoRA kernels compute what the torch reference in server.lora.ops computes.

On CUDA the kernels run natively over the full grid. Without CUDA, with TRITON_INTERPRET=1
(set before triton is imported), they run on the CPU under Triton's interpreter over a reduced
grid; bfloat16 is skipped there because the interpreter's tl.dot multiplies bfloat16 bit
patterns as integers (triton-lang/triton#11584).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from server.lora.ops import (
    Segment,
    SegmentTensors,
    SliceWeights,
    expand_ref,
    lora_ref,
    shrink_ref,
)
from server.lora.triton_ops import (
    ExpandConfig,
    ShrinkConfig,
    lora_expand,
    lora_shrink,
    lora_triton,
    lora_workspace_numel,
    shrink_config,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif INTERPRET:
    DEVICE = torch.device("cpu")
else:
    pytestmark = pytest.mark.skip(
        reason="needs CUDA, or TRITON_INTERPRET=1 to run the kernels on CPU in Triton's interpreter"
    )
    DEVICE = torch.device("cpu")
FULL_GRID = DEVICE.type == "cuda" and not INTERPRET

TOLERANCES = {  # (atol, rtol): the reference rounds to the dtype where the kernels keep fp32
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 2e-2),
}
MIXED_RANKS = (8, 128, 1, 64, 16)


@dataclass(frozen=True)
class Case:
    """A batch layout: segment lengths, per-segment per-slice ranks, slice widths, adapters."""

    seg_lens: tuple[int, ...]
    ranks: tuple[tuple[int, ...], ...]  # [segment][slice]; 0: the adapter skips the slice
    widths: tuple[int, ...]
    in_features: int
    adapters: tuple[int, ...]  # adapter id per segment; a repeated id shares its weights


@dataclass
class Batch:
    """Inputs for one Case: tokens with gaps between segments, weights scattered in a pool."""

    x: torch.Tensor  # [T, in]
    pool: torch.Tensor  # [P], NaN everywhere outside the adapters' matrices
    segments: list[Segment]
    meta: SegmentTensors
    out: torch.Tensor  # [T, N]
    slice_offsets: list[int]
    widths: list[int]
    gap_rows: torch.Tensor  # [T] bool: tokens without an adapter


def make_case(rank_mode: str, num_slices: int, lengths: str) -> Case:
    """One point of the grid; num_slices 2 and 3 have unequal widths (3 is GQA-like q/k/v)."""
    big = FULL_GRID
    in_features = 1000 if big else 96
    widths = {
        1: (520,) if big else (72,),
        2: (700, 300) if big else (80, 40),
        3: (512, 128, 128) if big else (64, 16, 32),
    }[num_slices]
    if lengths == "decode":
        seg_lens = (1,) * (12 if big else 5)
    else:
        seg_lens = (300, 1, 129, 17, 64) if big else (37, 1, 70, 5)
    ranks = []
    for g in range(len(seg_lens)):
        if rank_mode == "mixed":
            row = [MIXED_RANKS[(g + s) % len(MIXED_RANKS)] for s in range(num_slices)]
        else:
            row = [int(rank_mode)] * num_slices
        if num_slices > 1 and g % 3 == 1:
            row[-1] = 0  # this adapter does not target the last slice
        ranks.append(tuple(row))
    adapters = tuple(range(len(seg_lens)))
    if lengths == "prefill":  # the first adapter comes back in a later segment
        adapters = (0, 1, 2, 0, 3)[: len(seg_lens)]
        ranks[3] = ranks[0]
    return Case(tuple(seg_lens), tuple(ranks), widths, in_features, adapters)


def make_batch(case: Case, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Lay the case out: gaps of adapter-free tokens around segments, shuffled weight offsets."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    k = case.in_features
    mats = {}  # (adapter, slice, "a" | "b") -> (rows, cols)
    for adapter, ranks in zip(case.adapters, case.ranks, strict=True):
        for s, (rank, width) in enumerate(zip(ranks, case.widths, strict=True)):
            if rank:
                mats[(adapter, s, "a")] = (rank, k)
                mats[(adapter, s, "b")] = (rank, width)
    keys = list(mats)
    rng.shuffle(keys)
    offsets, cursor = {}, 12_345
    for key in keys:
        offsets[key] = cursor
        rows, cols = mats[key]
        cursor += rows * cols + rng.randrange(1, 97)
    # NaN poisons any read outside the matrices, so a missing mask shows up as NaN.
    pool = torch.full((cursor + 1000,), float("nan"), dtype=dtype)
    for key, off in offsets.items():
        rows, cols = mats[key]
        pool[off : off + rows * cols] = torch.randn(rows * cols, generator=gen) / cols**0.5

    segments, start = [], 2
    for g, (length, adapter) in enumerate(zip(case.seg_lens, case.adapters, strict=True)):
        slices = [
            SliceWeights(
                offsets[(adapter, s, "a")], offsets[(adapter, s, "b")], rank, 0.5 + adapter / 4
            )
            if rank
            else None
            for s, rank in enumerate(case.ranks[g])
        ]
        segments.append(Segment(start, length, slices))
        start += length + g % 3  # some segments touch, most have gaps
    num_tokens = start + 2
    gap_rows = torch.ones(num_tokens, dtype=torch.bool)
    for seg in segments:
        gap_rows[seg.start : seg.start + seg.length] = False
    return Batch(
        x=torch.randn(num_tokens, k, generator=gen).to(dtype).to(DEVICE),
        pool=pool.to(DEVICE),
        segments=segments,
        meta=SegmentTensors.from_segments(segments, len(case.widths), DEVICE),
        out=torch.randn(num_tokens, sum(case.widths), generator=gen).to(dtype).to(DEVICE),
        slice_offsets=[sum(case.widths[:s]) for s in range(len(case.widths))],
        widths=list(case.widths),
        gap_rows=gap_rows.to(DEVICE),
    )


def grid() -> list[pytest.param]:
    """Ranks x slices x lengths x dtypes; the interpreter gets every rank and length once."""
    params = []
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    rank_modes = ["1", "8", "16", "64", "128", "mixed"]
    for i, rank_mode in enumerate(rank_modes):
        for j, lengths in enumerate(["decode", "prefill"]):
            slice_counts = [1, 2, 3] if FULL_GRID else [1 + (i + j) % 3]
            for num_slices in slice_counts:
                for dtype in dtypes:
                    marks = []
                    if dtype == torch.bfloat16 and INTERPRET:
                        reason = "the interpreter's tl.dot misreads bfloat16 (triton#11584)"
                        marks.append(pytest.mark.skip(reason=reason))
                    name = f"r{rank_mode}-s{num_slices}-{lengths}-{str(dtype)[6:]}"
                    case = make_case(rank_mode, num_slices, lengths)
                    params.append(pytest.param(case, dtype, id=name, marks=marks))
    return params


GRID = grid()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def rank_padding(batch: Batch) -> torch.Tensor:
    """[S, T, max_rank] bool: h entries no segment's rank covers."""
    num_slices, num_tokens = len(batch.widths), batch.x.shape[0]
    pad = torch.ones(num_slices, num_tokens, batch.meta.max_rank, dtype=torch.bool)
    for seg in batch.segments:
        for s, w in enumerate(seg.slices):
            if w is not None:
                pad[s, seg.start : seg.start + seg.length, : w.rank] = False
    return pad.to(DEVICE)


@pytest.mark.parametrize(("case", "dtype"), GRID)
def test_shrink_matches_reference(case: Case, dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype)
    h = lora_shrink(batch.x, batch.pool, batch.meta)
    expected = shrink_ref(batch.x, batch.pool, batch.segments, batch.meta.max_rank)
    assert h.dtype == torch.float32 and h.shape == expected.shape
    assert_close(h, expected, dtype)
    assert torch.all(h[rank_padding(batch)] == 0)


@pytest.mark.parametrize(("case", "dtype"), GRID)
def test_expand_matches_reference(case: Case, dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype)
    h = shrink_ref(batch.x, batch.pool, batch.segments, batch.meta.max_rank)
    h[rank_padding(batch)] = float("nan")  # expand must read only each segment's own rank
    out, expected = batch.out.clone(), batch.out.clone()
    lora_expand(h, batch.pool, batch.meta, out, batch.slice_offsets, batch.widths)
    expand_ref(h, batch.pool, batch.segments, expected, batch.slice_offsets, batch.widths)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize(("case", "dtype"), GRID)
def test_lora_matches_reference_and_leaves_gap_tokens_alone(case: Case, dtype: torch.dtype) -> None:
    batch = make_batch(case, dtype)
    out, expected = batch.out.clone(), batch.out.clone()
    lora_triton(batch.x, batch.pool, batch.meta, out, batch.slice_offsets, batch.widths)
    lora_ref(batch.x, batch.pool, batch.segments, expected, batch.slice_offsets, batch.widths)
    assert_close(out, expected, dtype)
    assert torch.equal(out[batch.gap_rows], batch.out[batch.gap_rows])


def test_slice_without_adapter_rank_keeps_its_columns() -> None:
    batch = make_batch(make_case("mixed", 3, "decode"), torch.float32)
    g = 1  # make_case leaves the last slice of segment 1 untargeted
    seg = batch.segments[g]
    assert seg.slices[-1] is None
    out = batch.out.clone()
    lora_triton(batch.x, batch.pool, batch.meta, out, batch.slice_offsets, batch.widths)
    rows, cols = slice(seg.start, seg.start + seg.length), slice(batch.slice_offsets[-1], None)
    assert torch.equal(out[rows, cols], batch.out[rows, cols])
    assert not torch.equal(out[rows, : batch.slice_offsets[-1]], batch.out[rows, : cols.start])


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_shrink_matches_reference(split_k: int) -> None:
    batch = make_batch(make_case("mixed", 2, "prefill"), torch.float32)
    config = ShrinkConfig(block_m=16, block_r=16, block_k=16, split_k=split_k)
    h = lora_shrink(batch.x, batch.pool, batch.meta, config)
    expected = shrink_ref(batch.x, batch.pool, batch.segments, batch.meta.max_rank)
    assert_close(h, expected, torch.float32)


@pytest.mark.parametrize(
    ("shrink", "expand"),
    [
        (ShrinkConfig(16, 16, 32), ExpandConfig(16, 16, 16)),
        (ShrinkConfig(32, 64, 16), ExpandConfig(32, 64, 64)),
    ],
    ids=["small-tiles", "wide-rank-tiles"],
)
def test_other_tile_sizes_match_reference(shrink: ShrinkConfig, expand: ExpandConfig) -> None:
    batch = make_batch(make_case("mixed", 3, "prefill"), torch.float16)
    h = lora_shrink(batch.x, batch.pool, batch.meta, shrink)
    out, expected = batch.out.clone(), batch.out.clone()
    lora_expand(h, batch.pool, batch.meta, out, batch.slice_offsets, batch.widths, expand)
    lora_ref(batch.x, batch.pool, batch.segments, expected, batch.slice_offsets, batch.widths)
    assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("lengths", ["decode", "prefill"])
def test_expand_reads_only_the_partial_sums_the_shrink_wrote(lengths: str) -> None:
    """lora_triton's scratch is not cleared: every entry the expand reads is one the shrink
    wrote (each K split's partial sums, over each segment's rows and rank), even across
    several splits; a NaN-filled scratch shows any other read."""
    case = make_case("mixed", 3, lengths)
    case = Case(case.seg_lens, case.ranks, case.widths, 1024, case.adapters)  # K worth splitting
    batch = make_batch(case, torch.float32)
    num_tokens, in_features = batch.x.shape
    if lengths == "decode":
        assert shrink_config(batch.meta, in_features).split_k > 1
    numel = lora_workspace_numel(batch.meta, num_tokens, in_features)
    workspace = torch.full((numel + 64,), float("nan"), device=DEVICE)
    out, expected = batch.out.clone(), batch.out.clone()
    lora_triton(batch.x, batch.pool, batch.meta, out, batch.slice_offsets, batch.widths, workspace)
    lora_ref(batch.x, batch.pool, batch.segments, expected, batch.slice_offsets, batch.widths)
    assert not out.isnan().any()
    assert_close(out, expected, torch.float32)


def test_expand_into_row_strided_view_touches_only_its_columns() -> None:
    batch = make_batch(make_case("16", 2, "prefill"), torch.float32)
    n = sum(batch.widths)
    wide = torch.randn(batch.x.shape[0], n + 24, device=DEVICE)
    before = wide.clone()
    lora_triton(
        batch.x, batch.pool, batch.meta, wide[:, 8 : 8 + n], batch.slice_offsets, batch.widths
    )
    expected = before[:, 8 : 8 + n].clone()
    lora_ref(batch.x, batch.pool, batch.segments, expected, batch.slice_offsets, batch.widths)
    assert_close(wide[:, 8 : 8 + n], expected, torch.float32)
    assert torch.equal(wide[:, :8], before[:, :8]) and torch.equal(
        wide[:, 8 + n :], before[:, 8 + n :]
    )


def test_offsets_beyond_int32_are_addressed() -> None:
    rank, k, width = 16, 64, 48
    # Never written outside the two matrices, so the 4 GiB stay mostly unbacked on the CPU.
    pool = torch.empty(2**31 + 2**20, dtype=torch.float16, device=DEVICE)
    a_off, b_off = 2**31 + 1234, 2**31 - 100  # Bt straddles element 2**31
    pool[a_off : a_off + rank * k] = torch.randn(rank * k, device=DEVICE)
    pool[b_off : b_off + rank * width] = torch.randn(rank * width, device=DEVICE)
    segments = [Segment(1, 3, [SliceWeights(a_off, b_off, rank, 1.0)])]
    meta = SegmentTensors.from_segments(segments, 1, DEVICE)
    x = torch.randn(5, k, device=DEVICE).half()
    out = torch.zeros(5, width, dtype=torch.float16, device=DEVICE)
    expected = out.clone()
    lora_triton(x, pool, meta, out, [0], [width])
    lora_ref(x, pool, segments, expected, [0], [width])
    assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("segments", [[], [Segment(0, 2, [None, None])]], ids=["none", "rank-0"])
def test_batch_without_lora_returns_zeros_and_leaves_out(segments: list[Segment]) -> None:
    x = torch.randn(3, 32, device=DEVICE)
    pool = torch.zeros(100, device=DEVICE)
    meta = SegmentTensors.from_segments(segments, 2, DEVICE)
    out = torch.randn(3, 40, device=DEVICE)
    before = out.clone()
    h = lora_shrink(x, pool, meta)
    assert h.shape == (2, 3, 0)
    lora_triton(x, pool, meta, out, [0, 24], [24, 16])
    assert torch.equal(out, before)


def test_launcher_rejects_int32_offsets() -> None:
    batch = make_batch(make_case("8", 1, "decode"), torch.float32)
    batch.meta.a_offsets = batch.meta.a_offsets.int()
    with pytest.raises(AssertionError, match="a_offsets"):
        lora_shrink(batch.x, batch.pool, batch.meta)


def test_launcher_rejects_pool_of_another_dtype() -> None:
    batch = make_batch(make_case("8", 1, "decode"), torch.float32)
    with pytest.raises(AssertionError, match="pool"):
        lora_shrink(batch.x, batch.pool.half(), batch.meta)


def test_launcher_rejects_overlapping_slices() -> None:
    batch = make_batch(make_case("8", 2, "decode"), torch.float32)
    h = lora_shrink(batch.x, batch.pool, batch.meta)
    with pytest.raises(AssertionError, match="overlap"):
        lora_expand(h, batch.pool, batch.meta, batch.out, [0, 10], batch.widths)


def test_bench_contenders_agree_on_a_tiny_shape() -> None:
    from bench.kernels import OpShape, check, make_workload

    for kind in ("shrink", "expand", "lora"):
        shape = OpShape(f"tiny_{kind}", kind, 64, (48, 16, 16))
        workload = make_workload(shape, 9, [8, 16, 1], torch.float32, DEVICE)
        check(shape, workload, ["triton", "padded_bmm"])
