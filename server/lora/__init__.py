"""Batched LoRA: per-step metadata, torch reference ops, Triton kernels, layer wrappers."""
