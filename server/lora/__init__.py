"""Batched LoRA: adapter residency in the page pool (slots, slot tables, placement, the
admission gate, prefetch, eviction under the pool's one policy), the loader that reads
adapters off the step thread, per-step metadata (segments), layer wrappers, and the torch and
Triton implementations of the ops.

Depends on server.memory (the generic page pool) and server.model; neither imports this
package (tests/import_graph.py's LAYERS).
"""
