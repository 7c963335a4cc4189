"""Triton kernels for the GPU path: the NF4 matmul and paged attention."""
