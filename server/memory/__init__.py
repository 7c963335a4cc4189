"""Device memory: the unified page pool, KV-cache tables, adapter residency."""
