"""ModelRunner: everything on the device. Builds a step's inputs and metadata, runs the model."""

from __future__ import annotations

import torch

from server.engine.scheduler import ScheduledSeq
from server.memory.page_pool import PagePool
from server.model.context import (
    AttentionGroup,
    AttentionMetadata,
    ForwardContext,
    SeqLayout,
    forward_context,
)
from server.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: PagePool,
        device: torch.device,
        kernel_backend: str = "torch",
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.geometry.block_size
        self.sliding_window = model.config.sliding_window
        # "triton": attention reads the pool through block tables (server.kernels); "torch":
        # padded SDPA groups over gathered blocks.
        self.kernel_backend = kernel_backend
        for layer, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = pool.kv_views(layer)
        if kernel_backend == "triton":
            from server.kernels.paged_attention import paged_attention_layer

            for attn in model.attention_layers():
                attn.paged_kernel = paged_attention_layer

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], lora: object = None) -> torch.Tensor:
        """Run one step over `batch`; returns logits [S, vocab] for the sequences that sample,
        in batch order."""
        input_ids, positions, rope_scale, meta, sample_idx = self._prepare(batch)
        with forward_context(ForwardContext(attn=meta, lora=lora)):
            hidden = self.model(input_ids, positions, rope_scale)
        return self.model.compute_logits(hidden[sample_idx])

    def _prepare(self, batch: list[ScheduledSeq]):  # type: ignore[no-untyped-def]
        ids: list[int] = []
        for s in batch:
            ids.extend(s.seq.token_ids[s.start : s.start + s.num_new_tokens])
        counts = torch.tensor([s.num_new_tokens for s in batch])
        starts = torch.tensor([s.start for s in batch])
        # Attention reads whole blocks, masked: a row's padding repeats its own first page, so
        # it never reads another owner's page (a masked 0 x NaN there would still be NaN).
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = torch.tensor(
            [t + t[:1] * (max_blocks - len(t)) for t in (s.seq.block_table for s in batch)]
        )

        # Flat token -> (sequence, position).
        cu = torch.cumsum(counts, 0)
        seq_of_token = torch.repeat_interleave(torch.arange(len(batch)), counts)
        positions = starts[seq_of_token] + torch.arange(int(cu[-1])) - (cu - counts)[seq_of_token]
        slot_pages = tables[seq_of_token, positions // self.block_size]
        slot_offsets = positions % self.block_size
        sample_idx = torch.tensor([int(cu[i]) - 1 for i, s in enumerate(batch) if s.samples])

        groups = []
        seqs = None
        if self.kernel_backend == "triton":
            seqs = self._seq_layout(counts, starts, cu - counts, tables)
        else:
            for decode in (True, False):
                rows = [i for i, s in enumerate(batch) if (s.num_new_tokens == 1) == decode]
                if rows:
                    idx = torch.tensor(rows)
                    groups.append(
                        self._group(counts[idx], starts[idx], (cu - counts)[idx], tables[idx])
                    )

        rope_scale = None
        if any(s.seq.rope_scale != 1.0 for s in batch):
            scales = torch.tensor([s.seq.rope_scale for s in batch], dtype=torch.float32)
            rope_scale = scales[seq_of_token].to(self.device)

        dev = self.device
        meta = AttentionMetadata(slot_pages.to(dev), slot_offsets.to(dev), groups, seqs)
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            positions.to(dev),
            rope_scale,
            meta,
            sample_idx.to(dev),
        )

    def _seq_layout(
        self,
        counts: torch.Tensor,
        starts: torch.Tensor,
        flat_starts: torch.Tensor,
        tables: torch.Tensor,
    ) -> SeqLayout:
        """Per-sequence query ranges, key counts and block tables, for the attention kernel."""
        dev = self.device
        return SeqLayout(
            q_starts=flat_starts.to(dev, torch.int32),
            q_lens=counts.to(dev, torch.int32),
            ctx_lens=(starts + counts).to(dev, torch.int32),
            block_tables=tables.to(dev, torch.int32),
            max_q_len=int(counts.max()),
        )

    def _group(
        self,
        counts: torch.Tensor,
        starts: torch.Tensor,
        flat_starts: torch.Tensor,
        tables: torch.Tensor,
    ) -> AttentionGroup:
        """Padded attention layout for sequences with these query counts and cache starts."""
        ctx = starts + counts  # keys each sequence sees after this step
        max_q = int(counts.max())
        num_blocks = -(-int(ctx.max()) // self.block_size)
        q_range = torch.arange(max_q)
        k_range = torch.arange(num_blocks * self.block_size)
        q_valid = q_range[None, :] < counts[:, None]  # [B, max_q]
        q_pos = starts[:, None] + q_range[None, :]  # [B, max_q]
        mask = k_range[None, None, :] <= q_pos[:, :, None]  # causal
        if self.sliding_window is not None:
            mask &= k_range[None, None, :] > q_pos[:, :, None] - self.sliding_window
        # Padding queries attend key 0 only, so no row is fully masked (which gives NaN).
        mask &= q_valid[:, :, None]
        mask |= ~q_valid[:, :, None] & (k_range == 0)[None, None, :]
        q_index = torch.where(q_valid, flat_starts[:, None] + q_range[None, :], 0)
        dev = self.device
        return AttentionGroup(
            q_index=q_index.to(dev),
            q_valid=q_valid.to(dev),
            out_index=q_index[q_valid].to(dev),
            block_tables=tables[:, :num_blocks].to(dev),
            mask=mask.unsqueeze(1).to(dev),
        )
