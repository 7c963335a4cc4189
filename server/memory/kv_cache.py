"""KV-cache bookkeeping: which pages hold each sequence's keys and values."""

from __future__ import annotations

from server.memory.page_pool import KV, PagePool, Reclaimer
from server.memory.prefix_cache import PrefixCache
from server.memory.sequence import KVSequence


class KVCacheManager:
    """Block tables over the page pool: check with can_allocate, then allocate.

    `reclaimer` (the pool's one eviction policy: idle adapters and cached prefix blocks) gives
    pages back when free ones run short, before anything must be preempted. With `prefix` set,
    a sequence starts from the longest prefix of whole blocks already cached under its adapter
    (match_prefix), and its blocks become findable as they fill (commit).
    """

    def __init__(
        self, pool: PagePool, reclaimer: Reclaimer | None = None, prefix: PrefixCache | None = None
    ) -> None:
        self.pool = pool
        self.reclaimer = reclaimer
        self.prefix = prefix
        self.block_size = pool.geometry.block_size

    def blocks_needed(self, seq: KVSequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: KVSequence, num_new_tokens: int, reserve: int = 0) -> bool:
        needed = self.blocks_needed(seq, num_new_tokens) + reserve
        return needed <= self.pool.available(self.reclaimer)

    def allocate(self, seq: KVSequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed:
            pages = self.pool.allocate(needed, KV, self.reclaimer)
            # A reused page holds its last owner's values (another request's KV, an adapter's
            # weights), maybe inf or NaN; attention reads whole blocks, where a masked slot
            # still multiplies its value (0 x NaN = NaN).
            self.pool.clear(pages)
            seq.block_table.extend(pages)

    def match_prefix(self, seq: KVSequence) -> int:
        """Give a sequence with no cache yet its longest cached prefix; the tokens found."""
        if self.prefix is None or seq.block_table:
            return 0
        pages = self.prefix.acquire(seq)
        seq.block_table = pages
        seq.num_cached_blocks = len(pages)
        seq.num_computed_tokens = len(pages) * self.block_size
        return seq.num_computed_tokens

    def unmatch(self, seq: KVSequence) -> None:
        """Undo match_prefix for a sequence that was not admitted after all."""
        self.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def commit(self, seq: KVSequence) -> None:
        """After a step: the blocks seq has filled become findable by later requests."""
        if self.prefix is None:
            return
        full = seq.num_computed_tokens // self.block_size
        if full > seq.num_cached_blocks:
            self.prefix.insert(seq, seq.num_cached_blocks, full)
            seq.num_cached_blocks = full

    def free(self, seq: KVSequence) -> None:
        if seq.block_table:
            pages = seq.block_table
            if self.prefix is not None:
                pages = self.prefix.release(pages)
            if pages:
                self.pool.free(pages, KV)
            seq.block_table = []

    def max_blocks_per_seq(self, max_model_len: int) -> int:
        return -(-max_model_len // self.block_size)

    @property
    def num_cached_idle(self) -> int:
        """KV pages holding cached blocks no sequence uses (reclaimable)."""
        return self.prefix.num_evictable if self.prefix is not None else 0

    @property
    def usage(self) -> float:
        """Fraction of the pool's pages holding KV blocks that running requests use."""
        return (self.pool.used_by_kind[KV] - self.num_cached_idle) / self.pool.num_pages
