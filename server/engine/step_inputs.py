"""A step's inputs, typed, the device buffers they live in, and what the forward returns.

Every per-step tensor the forward reads through the kernel path (token ids, positions, KV slot
mapping, per-sequence lengths, block tables, RoPE factors, rows to sample) is a view of a buffer
allocated once at the engine's maximum sizes and filled in place: the addresses never change
between steps (what CUDA graphs need), and each step costs a few host-to-device copies of
exactly its own size, all issued before the forward starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.prompt_logprobs import PromptPlan, PromptRows, PromptScores
from server.model.context import ForwardContext


@dataclass
class StepInputs:
    """What ModelRunner.execute feeds the model for one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    sample_idx: torch.Tensor  # [S] int64: rows of the hidden states that sample, batch order
    context: ForwardContext
    num_decode_only: int | None = None  # batch size when every sequence decodes one token
    prompt: PromptRows | None = None  # rows scoring prompt tokens (prompt logprobs)
    prompt_plan: PromptPlan | None = None  # whose those rows are (host side)


@dataclass
class StepOutput:
    """What a step's forward leaves on the device for the sampler and the output path."""

    logits: torch.Tensor  # [S, vocab] float32, the sampling rows in batch order
    prompt: PromptScores | None = None  # prompt logprobs scored this step


class StepBuffers:
    """Device buffers at maximum sizes plus pinned host staging of the same shapes."""

    # Rows of the token table: one [T] int64 vector each.
    INPUT_IDS, POSITIONS, SLOT_PAGES, SLOT_OFFSETS = range(4)
    # Rows of the sequence table: one [B] int32 vector each.
    Q_STARTS, Q_LENS, CTX_LENS = range(3)

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device
    ) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.device = device
        pin = device.type == "cuda"

        def pair(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(*shape, dtype=dtype)
            return torch.zeros(*shape, dtype=dtype, device=device), (
                host.pin_memory() if pin else host
            )

        self.tokens, self._tokens_host = pair(4, max_tokens, dtype=torch.int64)
        self.rope_scale, self._rope_host = pair(max_tokens, dtype=torch.float32)
        self.sample_idx, self._sample_host = pair(max_seqs, dtype=torch.int64)
        self.prompt_rows, self._prompt_host = pair(2, max_tokens, dtype=torch.int64)
        self.seqs, self._seqs_host = pair(3, max_seqs, dtype=torch.int32)
        self.block_tables, self._tables_host = pair(max_seqs, max_blocks, dtype=torch.int32)

    # The host staging is rewritten each step; the previous step's copies out of it have
    # finished by then, because every step ends by copying its sampled tokens to the host.

    def fill_tokens(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """rows: input ids, positions, slot pages, slot offsets ([T] each) -> [4, T] view."""
        num_tokens = rows[0].shape[0]
        assert num_tokens <= self.max_tokens, f"{num_tokens} tokens > {self.max_tokens}"
        host = self._tokens_host[:, :num_tokens]
        for i, row in enumerate(rows):
            host[i].copy_(row)
        out = self.tokens[:, :num_tokens]
        out.copy_(host, non_blocking=True)
        return out

    def fill_rope_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """[T] float32 per-token RoPE factor -> its device view."""
        n = scale.shape[0]
        self._rope_host[:n].copy_(scale)
        out = self.rope_scale[:n]
        out.copy_(self._rope_host[:n], non_blocking=True)
        return out

    def fill_sample_idx(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[0]
        assert n <= self.max_seqs
        self._sample_host[:n].copy_(idx)
        out = self.sample_idx[:n]
        out.copy_(self._sample_host[:n], non_blocking=True)
        return out

    def fill_prompt_rows(
        self, idx: list[int], targets: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows scoring prompt tokens and the tokens they score ([P] each) -> device views."""
        n = len(idx)
        assert n <= self.max_tokens
        host = self._prompt_host[:, :n]
        host[0].copy_(torch.tensor(idx, dtype=torch.int64))
        host[1].copy_(torch.tensor(targets, dtype=torch.int64))
        out = self.prompt_rows[:, :n]
        out.copy_(host, non_blocking=True)
        return out[0], out[1]

    def fill_seqs(
        self, rows: list[torch.Tensor], tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: q starts, q lens, ctx lens ([B] each); tables: [B, blocks] -> device views."""
        num_seqs, num_blocks = tables.shape
        assert num_seqs <= self.max_seqs and num_blocks <= self.max_blocks
        host = self._seqs_host[:, :num_seqs]
        for i, row in enumerate(rows):
            host[i].copy_(row)
        seqs = self.seqs[:, :num_seqs]
        seqs.copy_(host, non_blocking=True)
        host_tables = self._tables_host[:num_seqs, :num_blocks]
        host_tables.copy_(tables)
        out_tables = self.block_tables[:num_seqs, :num_blocks]
        out_tables.copy_(host_tables, non_blocking=True)
        return seqs, out_tables
