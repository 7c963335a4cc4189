"""CUDA graphs for decode steps: captured once per batch-size bucket at start-up, then replayed.

A decode-only step of n sequences is padded to the smallest bucket b >= n (1, 2, 4, 8, ...,
up to --max-num-seqs) and replays that bucket's graph; prefill and mixed steps, steps whose
adapters replace norms or embeddings, and the torch attention path run eagerly. Every tensor a
graph reads is a view of the runner's step buffers (server.engine.step_inputs), filled in place
before the replay; the padding rows decode nothing (query length 0) and write their K/V into a
scratch page no sequence owns.

Only on CUDA with the Triton kernel path; `--enforce-eager` turns graphs off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.model_runner import ModelRunner
from server.engine.step_inputs import StepBuffers, StepInputs
from server.lora.batch import LoRABatch
from server.memory.page_pool import KV
from server.model.context import AttentionMetadata, ForwardContext, SeqLayout

if TYPE_CHECKING:
    from server.lora.residency import DeviceAdapterCache

logger = logging.getLogger(__name__)

_POWERS = tuple(2**i for i in range(16))


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below max_num_seqs, then max_num_seqs."""
    return [b for b in _POWERS if b < max_num_seqs] + [max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding num_seqs sequences, or None if none does."""
    return next((b for b in buckets if b >= num_seqs), None)


@dataclass(frozen=True)
class DecodePadding:
    """The rows [num_seqs, bucket) a padded decode step adds, and what they hold."""

    num_seqs: int
    bucket: int
    scratch_page: int

    def fill(self, buffers: StepBuffers) -> None:
        """Write the padding rows into the step buffers (device fills, no host copy): token 0
        at position 0, K/V into the scratch page, no queries and no keys."""
        n, b = self.num_seqs, self.bucket
        if n == b:
            return
        tokens = buffers.tokens[:, n:b]
        tokens[StepBuffers.INPUT_IDS].zero_()
        tokens[StepBuffers.POSITIONS].zero_()
        tokens[StepBuffers.SLOT_PAGES].fill_(self.scratch_page)
        tokens[StepBuffers.SLOT_OFFSETS].zero_()
        seqs = buffers.seqs[:, n:b]
        seqs[StepBuffers.Q_LENS].zero_()
        seqs[StepBuffers.CTX_LENS].zero_()
        seqs[StepBuffers.Q_STARTS].zero_()
        buffers.sample_idx[n:b].zero_()  # a stale index could point past the bucket's rows


class DecodeGraphs:
    """One captured decode graph per bucket, sharing one memory pool."""

    def __init__(self, runner: ModelRunner, residency: DeviceAdapterCache | None) -> None:
        assert runner.device.type == "cuda", "CUDA graphs need a CUDA device"
        assert runner.kernels.reads_block_tables, "graphs need the kernel path's fixed layout"
        assert residency is None or residency.lora_ops.graph_safe, "graphs need LoRA kernels"
        self.runner = runner
        self.residency = residency
        self.buckets = batch_buckets(runner.buffers.max_seqs)
        # A page no sequence owns: padding rows write their K/V here.
        self.scratch_page = runner.pool.allocate(1, KV)[0]
        runner.pool.clear([self.scratch_page])
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._mempool = torch.cuda.graph_pool_handle()

    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse its memory)."""
        start = time.perf_counter()
        for bucket in reversed(self.buckets):
            self._capture(bucket)
        torch.cuda.synchronize()
        logger.info(
            "captured decode CUDA graphs for batch sizes %s in %.1fs",
            self.buckets,
            time.perf_counter() - start,
        )

    def can_replay(self, step: StepInputs) -> bool:
        """Decode-only, within the largest bucket, and no adapter replacing a norm or the
        embedding (those run per-segment Python the graph cannot hold)."""
        n = step.num_decode_only
        if n is None or bucket_for(n, self.buckets) is None:
            return False
        lora = step.context.lora
        return lora is None or not any(
            r.weights.norms or r.weights.embed_chunks for r in lora.segments
        )

    def replay(self, step: StepInputs) -> torch.Tensor:
        """Logits [n, vocab] of a prepared decode step, by replaying its bucket's graph."""
        n = step.num_decode_only
        assert n is not None
        bucket = bucket_for(n, self.buckets)
        assert bucket is not None
        buffers = self.runner.buffers
        DecodePadding(n, bucket, self.scratch_page).fill(buffers)
        if step.context.rope_scale is None:
            buffers.rope_scale[:bucket].fill_(1.0)
        if self.residency is not None:
            num_segments = len(step.context.lora.segments) if step.context.lora is not None else 0
            self.residency.segment_buffers.clear_from(num_segments)
        self._graphs[bucket].replay()
        return self._logits[bucket][:n]

    def _static_step(self, bucket: int) -> StepInputs:
        """The step a graph is captured over: fixed views of the step buffers."""
        buf = self.runner.buffers
        tokens, seqs = buf.tokens[:, :bucket], buf.seqs[:, :bucket]
        layout = SeqLayout(
            q_starts=seqs[StepBuffers.Q_STARTS],
            q_lens=seqs[StepBuffers.Q_LENS],
            ctx_lens=seqs[StepBuffers.CTX_LENS],
            block_tables=buf.block_tables[:bucket],
            max_q_len=1,
        )
        meta = AttentionMetadata(
            tokens[StepBuffers.SLOT_PAGES], tokens[StepBuffers.SLOT_OFFSETS], [], layout
        )
        lora = None
        if self.residency is not None:
            r = self.residency
            lora = LoRABatch.for_graph(
                r.pool.buffer.view(-1), r.tables, r.lora_ops, r.segment_buffers, r.max_rank, bucket
            )
        context = ForwardContext(attn=meta, lora=lora, rope_scale=buf.rope_scale[:bucket])
        return StepInputs(
            tokens[StepBuffers.INPUT_IDS],
            tokens[StepBuffers.POSITIONS],
            buf.sample_idx[:bucket],
            context,
            bucket,
        )

    def _dummy_inputs(self, bucket: int) -> None:
        """A valid decode of `bucket` one-token sequences, all in the scratch page."""
        buf = self.runner.buffers
        DecodePadding(0, bucket, self.scratch_page).fill(buf)
        seqs = buf.seqs[:, :bucket]
        seqs[StepBuffers.Q_STARTS].copy_(torch.arange(bucket, device=buf.device))
        seqs[StepBuffers.Q_LENS].fill_(1)
        seqs[StepBuffers.CTX_LENS].fill_(1)
        buf.block_tables[:bucket].fill_(self.scratch_page)
        buf.sample_idx[:bucket].copy_(torch.arange(bucket, device=buf.device))
        buf.rope_scale[:bucket].fill_(1.0)
        if self.residency is not None:
            self.residency.segment_buffers.clear_from(0)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        self._dummy_inputs(bucket)
        self.runner.run(self._static_step(bucket))  # compiles every kernel variant first
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        step = self._static_step(bucket)  # fresh LoRA gathers, recorded into the graph
        with torch.cuda.graph(graph, pool=self._mempool):
            self._logits[bucket] = self.runner.run(step)
        self._graphs[bucket] = graph
