"""Batched LoRA: adapter residency in the page pool (slots, slot tables, placement, LRU,
prefetch, the admission gate, the pool's reclaimer), per-step metadata, layer wrappers, ops.

Depends on server.memory (the generic page pool); server.memory never imports this package.
"""
