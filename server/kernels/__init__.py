"""Our kernels: Triton's for the GPU path (the NF4 matmul, paged attention, SGMV LoRA) and C for
the CPU path (decode attention over the pages in place, short-segment LoRA: cpu_kernels.py)."""
