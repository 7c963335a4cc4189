"""Adapter-aware prefix caching: full KV blocks found again by a hash of everything before them.

A block's identity is a hash chain: blake2b over the previous block's hash, the adapter
version (adapter_id, new on every in-place reload and never reused), the sequence's RoPE
factor, and the block's tokens. The K/V of a token depends on exactly those (every layer's
attention sees only the tokens before it, and the adapter's weights shape every projection),
so a block hashed equal holds equal K/V. A hit also compares the stored tokens and adapter
id, so a hash collision could not hand one tenant's K/V to another.

Blocks are reference-counted: a running sequence holds its blocks; a block no sequence holds
stays in the pool, still found by its hash, and is evictable through the pool's one
reclaimer (server.memory.reclaim) alongside idle adapters. Only full blocks are cached, and
never one a sequence would write into: a hit covers at most the tokens before the last, so
the step that computes the rest starts in a block of its own.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from array import array
from dataclasses import dataclass

from server.memory.page_pool import KV, PagePool
from server.memory.reclaim import EvictionClock
from server.memory.sequence import KVSequence

_ROOT = b"\0" * 16


@dataclass
class CachedBlock:
    page: int
    hash: bytes
    adapter_id: int
    tokens: tuple[int, ...]
    refcount: int = 1
    key: tuple[float, int] | None = None  # eviction priority while evictable
    # Its adapter version was deleted or reloaded while sequences held it: no longer findable,
    # and its page is freed when the last of them lets go (not made evictable).
    dropped: bool = False


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens of admitted sequences
    hit_tokens: int = 0  # of which found cached
    reclaimed_blocks: int = 0
    dropped_blocks: int = 0  # freed because their adapter was deleted or reloaded


def block_hash(parent: bytes, adapter_id: int, rope_scale: float, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack("<qd", adapter_id, rope_scale))
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PrefixCache:
    """Full KV blocks by hash chain; an EvictionSource for the pool's reclaimer."""

    def __init__(self, pool: PagePool, clock: EvictionClock) -> None:
        self.pool = pool
        self.clock = clock
        self.block_size = pool.geometry.block_size
        self.stats = PrefixCacheStats()
        self._by_hash: dict[bytes, CachedBlock] = {}
        self._by_page: dict[int, CachedBlock] = {}
        self._by_adapter: dict[int, set[int]] = {}  # adapter_id -> pages
        self._evictable: list[tuple[float, int, int]] = []  # heap of (priority, tick, page)
        self._num_evictable = 0

    # ---- queries ------------------------------------------------------------------------

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or not."""
        return len(self._by_page)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no sequence holds (pages that are KV but reclaimable)."""
        return self._num_evictable

    def hashes(self, seq: KVSequence, num_blocks: int) -> list[bytes]:
        """The hashes of seq's first num_blocks full blocks (computed once per sequence)."""
        done = seq.block_hashes
        bs = self.block_size
        tokens = seq.token_ids
        while len(done) < num_blocks:
            j = len(done)
            parent = done[-1] if done else _ROOT
            done.append(
                block_hash(parent, seq.adapter_id, seq.rope_scale, tokens[j * bs : (j + 1) * bs])
            )
        return done[:num_blocks]

    # ---- sequences ----------------------------------------------------------------------

    def acquire(self, seq: KVSequence) -> list[int]:
        """The pages of seq's longest cached prefix, now held by seq. Never the block of its
        last token: that token is computed again, so the step has logits to sample from."""
        limit = (seq.num_tokens - 1) // self.block_size
        bs = self.block_size
        pages: list[int] = []
        for j, h in enumerate(self.hashes(seq, limit)):
            blk = self._by_hash.get(h)
            if (
                blk is None
                or blk.adapter_id != seq.adapter_id
                or list(blk.tokens) != seq.token_ids[j * bs : (j + 1) * bs]
            ):
                break
            if blk.refcount == 0:
                blk.key = None  # its heap entry is stale from now on
                self._num_evictable -= 1
            blk.refcount += 1
            pages.append(blk.page)
        return pages

    def insert(self, seq: KVSequence, first: int, last: int) -> None:
        """seq's blocks [first, last) are now full and computed: make them findable. A block
        another sequence computed first under the same hash stays the cached one."""
        bs = self.block_size
        hashes = self.hashes(seq, last)
        for j in range(first, last):
            page = seq.block_table[j]
            if hashes[j] in self._by_hash or page in self._by_page:
                continue
            blk = CachedBlock(
                page, hashes[j], seq.adapter_id, tuple(seq.token_ids[j * bs : (j + 1) * bs])
            )
            self._by_hash[blk.hash] = blk
            self._by_page[page] = blk
            self._by_adapter.setdefault(seq.adapter_id, set()).add(page)

    def release(self, pages: list[int]) -> list[int]:
        """A sequence lets go of its pages; returns those that are not cached (the caller
        frees them). Cached ones no one holds become evictable, the last block first."""
        private = []
        cost = self.clock.kv_block_cost(self.block_size)
        for page in reversed(pages):
            blk = self._by_page.get(page)
            if blk is None:
                private.append(page)
                continue
            assert blk.refcount > 0, f"cached block on page {page} released too often"
            blk.refcount -= 1
            if blk.refcount == 0 and blk.dropped:
                del self._by_page[page]
                private.append(page)
                self.stats.dropped_blocks += 1
            elif blk.refcount == 0:
                blk.key = self.clock.stamp(cost)
                heapq.heappush(self._evictable, (*blk.key, page))
                self._num_evictable += 1
        private.reverse()
        return private

    def drop_adapter(self, adapter_id: int) -> int:
        """Forget every block computed under an adapter version (deleted or reloaded): idle
        ones are freed now, held ones when the last sequence holding them lets go (a block
        several sequences share stays theirs until then). Returns blocks freed now."""
        freed = []
        for page in self._by_adapter.pop(adapter_id, set()):
            blk = self._by_page[page]
            del self._by_hash[blk.hash]
            if blk.refcount == 0:
                del self._by_page[page]
                blk.key = None
                self._num_evictable -= 1
                freed.append(page)
            else:
                blk.dropped = True
        if freed:
            self.pool.free(freed, KV)
        self.stats.dropped_blocks += len(freed)
        return len(freed)

    def record_hit(self, seq: KVSequence, hit_tokens: int) -> None:
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += hit_tokens

    # ---- EvictionSource -----------------------------------------------------------------

    def reclaimable_pages(self) -> int:
        return self._num_evictable

    def _top(self) -> CachedBlock | None:
        """The evictable block of lowest priority, dropping stale heap entries on the way."""
        heap = self._evictable
        while heap:
            priority, tick, page = heap[0]
            blk = self._by_page.get(page)
            if blk is not None and blk.key == (priority, tick):
                return blk
            heapq.heappop(heap)
        return None

    def peek(self) -> tuple[float, int] | None:
        blk = self._top()
        return blk.key if blk is not None else None

    def evict_one(self) -> int:
        blk = self._top()
        if blk is None:
            return 0
        heapq.heappop(self._evictable)
        del self._by_page[blk.page]
        del self._by_hash[blk.hash]
        pages = self._by_adapter[blk.adapter_id]
        pages.discard(blk.page)
        if not pages:
            del self._by_adapter[blk.adapter_id]
        self._num_evictable -= 1
        self.pool.free([blk.page], KV)
        self.stats.reclaimed_blocks += 1
        return 1
