"""`--quantize auto`: the base's weight format, chosen from its size and the device's memory.

NF4 costs a small model quality it cannot spare (SmolLM2-135M: see docs/benchmarks.md,
"Serving precision") and, on a CPU, speed (weights are dequantized at every call). It pays
where memory is the constraint. So the base stays unquantized when its weights in the serving
dtype take at most 1/8 of the device's memory (the GPU's, or the host's RAM on a CPU), and is
quantized to NF4 above that: an 8B model in bfloat16 (16 GB) is NF4 on an 80 GB GPU, a 4B one
(8 GB) is not; SmolLM2-135M in float32 (0.5 GB) is unquantized on any machine with 4 GB.
"""

from __future__ import annotations

import os

import torch

UNQUANTIZED_SHARE = 1 / 8  # of the device's memory the unquantized weights may take


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the GPU, or of the host for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_quantize(num_params: int, dtype: torch.dtype, device_memory: int) -> str:
    """'none' when num_params weights of `dtype` fit in UNQUANTIZED_SHARE of the memory,
    else 'nf4'."""
    weight_bytes = num_params * torch.empty((), dtype=dtype).element_size()
    return "none" if weight_bytes <= device_memory * UNQUANTIZED_SHARE else "nf4"
