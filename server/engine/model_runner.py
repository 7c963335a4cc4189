"""ModelRunner: everything on the device. Builds a step's typed inputs in preallocated
buffers, runs the model under the step's ForwardContext, returns the sampled rows' logits (and
the prompt scores of sequences that ask for prompt logprobs).

The torch attention path's padded groups (masks sized by the step's longest sequence) are
built per step; that path serves the CPU. The kernel path reads only fixed buffers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.engine.backends import KernelBackend
from server.engine.prompt_logprobs import (
    PromptRows,
    PromptScores,
    plan_prompt_rows,
    score_prompt_rows,
)
from server.engine.scheduler import ScheduledSeq
from server.engine.step_inputs import StepBuffers, StepInputs, StepOutput
from server.lora.batch import LoRABatch
from server.memory.page_pool import PagePool
from server.model.context import (
    AttentionGroup,
    AttentionMetadata,
    ForwardContext,
    SeqLayout,
    forward_context,
)
from server.model.llama import LlamaForCausalLM


class StepReplayer(Protocol):
    """Captured steps the runner may replay instead of running the forward (CUDA graphs:
    server.engine.cuda_graphs.DecodeGraphs, installed by the engine after warm-up)."""

    def can_replay(self, step: StepInputs) -> bool: ...

    def replay(self, step: StepInputs) -> torch.Tensor: ...


class ModelRunner:
    """Owns the device side of a step: the model, the KV views, the step buffers."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: PagePool,
        device: torch.device,
        kernels: KernelBackend,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.geometry.block_size
        self.sliding_window = model.config.sliding_window
        self.kernels = kernels  # which attention layout a step needs
        max_blocks = -(-max_model_len // self.block_size)
        self.buffers = StepBuffers(max_num_batched_tokens, max_num_seqs, max_blocks, device)
        # Prompt rows scored per lm_head call: ~12 bytes per vocabulary entry per row (logits,
        # log-softmax, comparisons), inside the sampler's activation reserve of 48 bytes per
        # entry for each of max_num_seqs rows (server/engine/memory_budget.py).
        self.prompt_chunk_rows = 4 * max_num_seqs
        self.graphs: StepReplayer | None = None  # decode CUDA graphs (CUDA, kernel path)
        for layer, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = pool.kv_views(layer)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], lora: LoRABatch | None = None) -> StepOutput:
        """Run one step over `batch`: logits [S, vocab] for the sequences that sample, in batch
        order, and the prompt scores of those asking. Nothing between preparing the inputs and
        returning waits for the device."""
        step = self.prepare(batch, lora)
        if step.prompt is None and self.graphs is not None and self.graphs.can_replay(step):
            return StepOutput(self.graphs.replay(step))
        return self.run(step)

    def run(self, step: StepInputs) -> StepOutput:
        """The forward over prepared inputs -> logits [S, vocab] float32 (+ prompt scores)."""
        with forward_context(step.context):
            hidden = self.model(step.input_ids, step.positions)
        logits = self.model.compute_logits(hidden[step.sample_idx])
        if step.prompt is None:
            return StepOutput(logits)
        assert step.prompt_plan is not None
        values = score_prompt_rows(self.model, hidden, step.prompt, self.prompt_chunk_rows)
        return StepOutput(logits, PromptScores(step.prompt_plan, values))

    def prepare(self, batch: list[ScheduledSeq], lora: LoRABatch | None = None) -> StepInputs:
        """Build the step's metadata on the host and copy it into the step buffers."""
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
        num_tokens = int(cu[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(batch)), counts)
        positions = starts[seq_of_token] + torch.arange(num_tokens) - (cu - counts)[seq_of_token]
        slot_pages = tables[seq_of_token, positions // self.block_size]
        slot_offsets = positions % self.block_size
        buf = self.buffers
        tokens = buf.fill_tokens(
            [torch.tensor(ids, dtype=torch.int64), positions, slot_pages, slot_offsets]
        )
        sample_idx = buf.fill_sample_idx(
            torch.tensor([int(cu[i]) - 1 for i, s in enumerate(batch) if s.samples])
        )

        groups = []
        seqs = None
        if self.kernels.reads_block_tables:
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
            rope_scale = buf.fill_rope_scale(scales[seq_of_token])

        meta = AttentionMetadata(
            tokens[StepBuffers.SLOT_PAGES], tokens[StepBuffers.SLOT_OFFSETS], groups, seqs
        )
        decode_only = all(s.num_new_tokens == 1 for s in batch)
        plan = plan_prompt_rows(batch)
        prompt = None
        if plan is not None:
            idx, targets = buf.fill_prompt_rows(plan.flat_idx, plan.targets)
            prompt = PromptRows(idx, targets, plan.k)
        return StepInputs(
            input_ids=tokens[StepBuffers.INPUT_IDS],
            positions=tokens[StepBuffers.POSITIONS],
            sample_idx=sample_idx,
            context=ForwardContext(attn=meta, lora=lora, rope_scale=rope_scale),
            num_decode_only=len(batch) if decode_only else None,
            prompt=prompt,
            prompt_plan=plan,
        )

    def _seq_layout(
        self,
        counts: torch.Tensor,
        starts: torch.Tensor,
        flat_starts: torch.Tensor,
        tables: torch.Tensor,
    ) -> SeqLayout:
        """Per-sequence query ranges, key counts and block tables, for the attention kernel."""
        seqs, block_tables = self.buffers.fill_seqs([flat_starts, counts, starts + counts], tables)
        return SeqLayout(
            q_starts=seqs[StepBuffers.Q_STARTS],
            q_lens=seqs[StepBuffers.Q_LENS],
            ctx_lens=seqs[StepBuffers.CTX_LENS],
            block_tables=block_tables,
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
            valid_rows=q_valid.flatten().nonzero().squeeze(1).to(dev),
            out_index=q_index[q_valid].to(dev),
            block_tables=tables[:, :num_blocks].to(dev),
            mask=mask.unsqueeze(1).to(dev),
            ctx_lens=ctx.to(dev),
        )
