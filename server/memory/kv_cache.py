"""KV-cache bookkeeping: which pages hold each sequence's keys and values."""

from __future__ import annotations

from server.engine.sequence import Sequence
from server.memory.page_pool import KV, PagePool, Reclaimer


class KVCacheManager:
    """Block tables over the page pool: check with can_allocate, then allocate.

    `reclaimer` (the adapter residency, when adapters are served) gives back idle adapters'
    pages when free ones run short, before anything must be preempted.
    """

    def __init__(self, pool: PagePool, reclaimer: Reclaimer | None = None) -> None:
        self.pool = pool
        self.reclaimer = reclaimer
        self.block_size = pool.geometry.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        needed = self.blocks_needed(seq, num_new_tokens) + reserve
        return needed <= self.pool.available(self.reclaimer)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed:
            pages = self.pool.allocate(needed, KV, self.reclaimer)
            # A reused page holds its last owner's values (another request's KV, an adapter's
            # weights), maybe inf or NaN; attention reads whole blocks, where a masked slot
            # still multiplies its value (0 x NaN = NaN).
            self.pool.clear(pages)
            seq.block_table.extend(pages)

    def free(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table, KV)
            seq.block_table = []

    def max_blocks_per_seq(self, max_model_len: int) -> int:
        return -(-max_model_len // self.block_size)

    @property
    def usage(self) -> float:
        """Fraction of the pool's pages holding KV blocks."""
        return self.pool.used_by_kind[KV] / self.pool.num_pages
