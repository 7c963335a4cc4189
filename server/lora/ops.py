"""Batched LoRA over a batch's segments (tokens of one adapter), weights read from the page pool.

Semantics, for each segment g (tokens [start_g, start_g + len_g) of one adapter) and slice s
of a packed linear (q/k/v or gate/up), with A_gs: [rank_gs, in] and Bt_gs: [rank_gs, width_s]
stored row-major in the flat pool at a_offset_gs and b_offset_gs:

    h[s, t, :rank_gs] = scaling_gs * x[t] @ A_gs.T                       (shrink)
    out[t, offset_s : offset_s + width_s] += h[s, t, :rank_gs] @ Bt_gs   (expand)

Each adapter contributes only its own rank: nothing is padded to a maximum rank. Tokens outside
every segment (requests without an adapter) are left alone. This module is the plain-torch
version, used on CPU and as the oracle for the Triton kernels; views into the pool make it
copy no weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SliceWeights:
    """Where one LoRA pair of one slice sits in the flat pool."""

    a_offset: int  # A: [rank, in_features] row-major
    b_offset: int  # Bt: [rank, width] row-major (lora_B transposed)
    rank: int
    scaling: float


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens using one adapter, with that adapter's weights per slice."""

    start: int
    length: int
    slices: Sequence[SliceWeights | None]  # None: the adapter does not target this slice


def shrink_ref(x: torch.Tensor, pool: torch.Tensor, segments: Sequence[Segment], max_rank: int):
    """x: [T, in], pool: [P] flat -> h: [S, T, max_rank] float32 (zero where no LoRA applies)."""
    num_slices = len(segments[0].slices) if segments else 1
    h = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    in_features = x.shape[1]
    for seg in segments:
        xs = x[seg.start : seg.start + seg.length]  # [n, in]
        for s, w in enumerate(seg.slices):
            if w is None:
                continue
            a = pool[w.a_offset : w.a_offset + w.rank * in_features].view(w.rank, in_features)
            h[s, seg.start : seg.start + seg.length, : w.rank] = (xs @ a.T).float() * w.scaling
    return h


def expand_ref(
    h: torch.Tensor,
    pool: torch.Tensor,
    segments: Sequence[Segment],
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> None:
    """h: [S, T, R] float32; out: [T, N] updated in place (columns per slice offsets/widths)."""
    for seg in segments:
        rows = slice(seg.start, seg.start + seg.length)
        for s, w in enumerate(seg.slices):
            if w is None:
                continue
            width, col = slice_widths[s], slice_offsets[s]
            bt = pool[w.b_offset : w.b_offset + w.rank * width].view(w.rank, width)
            out[rows, col : col + width] += (h[s, rows, : w.rank].to(bt.dtype) @ bt).to(out.dtype)


def lora_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    segments: Sequence[Segment],
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> None:
    """shrink then expand: out += the LoRA delta of each token's adapter."""
    max_rank = max((w.rank for seg in segments for w in seg.slices if w is not None), default=0)
    if max_rank == 0:
        return
    h = shrink_ref(x, pool, segments, max_rank)
    expand_ref(h, pool, segments, out, slice_offsets, slice_widths)


@dataclass(frozen=True)
class ModuleWeights:
    """One adapter's LoRA for one packed linear, as views into the pool (the CPU path)."""

    a: torch.Tensor  # [sum of slice ranks, in]: the A of every targeted slice, stacked
    slices: tuple[tuple[int, int, torch.Tensor, float], ...]  # (slice, first row in a, Bt, scaling)


def lora_apply(
    x: torch.Tensor,
    out: torch.Tensor,
    segments: Sequence[tuple[int, int, ModuleWeights]],
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> None:
    """The same semantics as lora_ref, for the CPU: one matmul shrinks all slices of a segment,
    one addmm per slice expands in place, and no weight is sliced out of the pool per step.

    segments: (start, length, weights) per segment.
    """
    for start, length, w in segments:
        rows = slice(start, start + length)
        h = x[rows] @ w.a.T  # [n, sum of ranks]
        for s, r0, bt, scaling in w.slices:
            col = slice_offsets[s]
            target = out[rows, col : col + slice_widths[s]]
            target.addmm_(h[:, r0 : r0 + bt.shape[0]], bt, alpha=scaling)


@dataclass
class SegmentTensors:
    """The same segments as device tensors, for kernels (G segments, S slices)."""

    seg_starts: torch.Tensor  # [G] int64
    seg_lens: torch.Tensor  # [G] int64
    a_offsets: torch.Tensor  # [G, S] int64
    b_offsets: torch.Tensor  # [G, S] int64
    ranks: torch.Tensor  # [G, S] int32, 0 where the adapter does not target the slice
    scalings: torch.Tensor  # [G, S] float32
    max_rank: int
    max_seg_len: int
    # Every a/b offset is a multiple of this many elements (the pool layout's promise, which
    # kernels take as an alignment hint); 1 promises nothing.
    offset_align: int = 1

    @classmethod
    def from_segments(
        cls, segments: Sequence[Segment], num_slices: int, device: torch.device
    ) -> SegmentTensors:
        weights = [w for seg in segments for w in seg.slices if w is not None]

        def column(get, dtype):  # type: ignore[no-untyped-def]
            rows = [[get(w) if w else 0 for w in seg.slices] for seg in segments]
            return torch.tensor(rows, dtype=dtype, device=device).view(len(segments), num_slices)

        return cls(
            seg_starts=torch.tensor([s.start for s in segments], dtype=torch.int64, device=device),
            seg_lens=torch.tensor([s.length for s in segments], dtype=torch.int64, device=device),
            a_offsets=column(lambda w: w.a_offset, torch.int64),
            b_offsets=column(lambda w: w.b_offset, torch.int64),
            ranks=column(lambda w: w.rank, torch.int32),
            scalings=column(lambda w: w.scaling, torch.float32),
            max_rank=max((w.rank for s in segments for w in s.slices if w), default=0),
            max_seg_len=max((s.length for s in segments), default=0),
            offset_align=math.gcd(*(o for w in weights for o in (w.a_offset, w.b_offset))) or 1,
        )
