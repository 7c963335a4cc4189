"""PEFT LoRA adapter artifacts: parse, validate, store, and cache. No engine or device code."""
