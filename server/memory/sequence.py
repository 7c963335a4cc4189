"""What the KV tier reads and writes of a sequence: the engine's Sequence is one.

Declared here, below the engine, so the page pool, the block tables and the prefix cache need
nothing from the engine's packages to be imported or tested.
"""

from __future__ import annotations

from typing import Protocol


class KVSequence(Protocol):
    """A sequence's tokens, its adapter version and the blocks holding its K/V."""

    token_ids: list[int]  # prompt + output
    adapter_id: int  # the adapter version shaping its K/V (-1: the base model)
    rope_scale: float
    num_computed_tokens: int  # tokens whose K/V are in the cache
    block_table: list[int]  # pages holding its K/V, in order
    block_hashes: list[bytes]  # prefix-cache hashes of its full blocks so far
    num_cached_blocks: int  # leading blocks of block_table that are in the prefix cache

    @property
    def num_tokens(self) -> int: ...
