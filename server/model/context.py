"""Per-step forward metadata, set once by the model runner and read by the layers.

Serving passes flat token batches ([T, hidden]) through the model; what each layer needs to
know about the batch (where each token's KV goes, which keys each query sees, which adapter
each token uses) travels in one ForwardContext instead of through every forward signature.
Training runs the model without a context: dense [B, S, hidden] batches, causal attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one padded SDPA call (decodes apart from prefills)."""

    q_index: torch.Tensor  # [B, max_q] flat token index of each query (padding -> 0)
    # [N] positions of the real queries in the flattened [B * max_q] grid, and their flat
    # token indices (== q_index.flatten()[valid_rows]): integer indices built on the host, so
    # the forward never indexes with a boolean mask (which syncs with the host).
    valid_rows: torch.Tensor
    out_index: torch.Tensor
    # [B, max_blocks] pages holding each sequence's keys, in order, padded with its first page.
    # Slots past a sequence's keys are zero (pages are cleared when handed out as KV), so
    # whole blocks may be read: nothing there belongs to another request.
    block_tables: torch.Tensor
    mask: torch.Tensor  # [B, 1, max_q, max_blocks * block_size] bool, True = may attend
    ctx_lens: torch.Tensor  # [B] int64 keys each sequence sees after this step


@dataclass
class SeqLayout:
    """Each sequence's queries and keys in a step, for kernels that follow block tables."""

    q_starts: torch.Tensor  # [B] int32 flat token index of each sequence's first query
    q_lens: torch.Tensor  # [B] int32 new tokens (queries) per sequence
    ctx_lens: torch.Tensor  # [B] int32 keys each sequence sees after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32 pages holding each sequence's keys
    max_q_len: int


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which keys each query reads."""

    slot_pages: torch.Tensor  # [T] page receiving each new token's K/V
    slot_offsets: torch.Tensor  # [T] offset within that page's block
    groups: list[AttentionGroup]  # padded SDPA layout (torch path)
    seqs: SeqLayout | None = None  # per-sequence layout (kernel path)


@dataclass
class ForwardContext:
    """Everything a serving forward reads besides token ids and positions."""

    attn: AttentionMetadata | None = None
    # The step's server.lora.batch.LoRABatch when a token uses an adapter. Opaque here: the
    # plain model never reads it, only the LoRA module swaps do (server.lora.layers).
    lora: object | None = None
    # [T] float32 per-token linear RoPE factor (LongLoRA adapters); None when all are 1.
    rope_scale: torch.Tensor | None = None


_context: ContextVar[ForwardContext | None] = ContextVar("loraplex_forward_context", default=None)


def get_context() -> ForwardContext | None:
    return _context.get()


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)
