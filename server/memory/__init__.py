"""Device memory: the unified page pool and KV-cache tables (adapter residency is server.lora's)."""
