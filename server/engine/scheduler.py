"""Continuous batching: which sequences run this step, and how many tokens each.

Every sequence is a list of tokens of which the first `num_computed_tokens` have K/V in the
cache; a step computes the next chunk of each scheduled sequence. Decodes (one token), whole
prefills, chunks of long prefills and recomputation after preemption are the same operation,
so prefill and decode mix freely in one batch under one token budget.

Order: running sequences first, oldest first; then waiting ones, first come first served.
When a running sequence needs a page and none is free, the newest running sequence is
preempted: its pages are freed and it waits to be recomputed from its tokens.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.sequence import Sequence, SequenceStatus
from server.memory.kv_cache import KVCacheManager

logger = logging.getLogger(__name__)


class AdapterGate(Protocol):
    """What the scheduler asks of the adapter tier before a sequence may run, by the
    sequence's adapter id (NO_ADAPTER for the base model)."""

    def is_ready(self, adapter_id: int) -> bool:
        """Whether the adapter's weights are in memory (else they are being read)."""
        ...

    def can_admit(self, adapter_id: int, kv_blocks: int) -> bool: ...

    def is_resident(self, adapter_id: int) -> bool: ...

    def admit(self, adapter_id: int) -> None: ...

    def release(self, adapter_id: int) -> None: ...

    def prefetch(self, waiting: Iterable[int]) -> None: ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # index of the first token computed this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        adapters: AdapterGate | None = None,
        watermark: float = 0.01,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapters = adapters
        # Pages kept free when admitting new work, so running sequences can grow a little
        # before anything must be preempted.
        self.watermark_pages = int(watermark * kv.pool.num_pages)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, n, out):
                self.kv.allocate(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
                budget -= n
                i += 1
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        if self.adapters is not None:
            self.adapters.prefetch(s.adapter_id for s in self.waiting)
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the tail until `seq` can grow by n tokens; False if seq itself went."""
        while not self.kv.can_allocate(seq, n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        """First come, first served, except that a request whose adapter is still being read
        into host memory lets every request behind it go ahead, and a request waiting for room
        for its adapter lets requests whose adapters are already resident (or that use none)
        go ahead; no later request may bring in a new adapter past the latter."""
        adapter_blocked = False
        i = 0
        while (
            i < len(self.waiting)
            and i < self.max_num_seqs
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[i]
            if self.adapters is not None and not self.adapters.is_ready(seq.adapter_id):
                i += 1  # its weights are being read: never on the step thread
                continue
            # Cached blocks found now are held from here: the checks below see them as the
            # sequence's own, no longer as reclaimable room.
            hit = self.kv.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.kv.can_allocate(seq, n, reserve=self.watermark_pages):
                self.kv.unmatch(seq)
                break
            if self.adapters is not None:
                kv_blocks = self.kv.blocks_needed(seq, n)
                if not self.adapters.can_admit(seq.adapter_id, kv_blocks) or (
                    adapter_blocked and not self.adapters.is_resident(seq.adapter_id)
                ):
                    self.kv.unmatch(seq)
                    adapter_blocked = True
                    i += 1
                    continue
                self.adapters.admit(seq.adapter_id)
            if self.kv.prefix is not None:
                self.kv.prefix.record_hit(seq, hit)
            if seq.first_scheduled_time is None:
                seq.num_cached_tokens = hit
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.kv.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)
        self.kv.free(seq)
        if self.adapters is not None:
            self.adapters.release(seq.adapter_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, out: SchedulerOutput) -> None:
        """After the forward pass: the scheduled tokens now have K/V in the cache."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.commit(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and free what it holds, wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if self.adapters is not None:
                self.adapters.release(seq.adapter_id)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
