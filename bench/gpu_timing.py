"""CUDA-event timing of a call, and the device's memory bandwidth measured by a copy."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

NO_GPU = (
    "needs a CUDA GPU: it times kernels with CUDA events, and the Triton interpreter "
    "(TRITON_INTERPRET=1) runs on the CPU and measures nothing useful."
)


def time_call(fn: Callable[[], object], warmup: int, iters: int, repeats: int = 5) -> float:
    """Microseconds per call: the median over repeats of a CUDA-event mean over iters calls."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        means.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(means)


def _copy_us(device: torch.device, num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_call(lambda: dst.copy_(src), warmup=3, iters=10)


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once, written once)."""
    us = _copy_us(device, num_bytes)
    torch.cuda.empty_cache()  # the buffers are gone with _copy_us's frame
    return 2 * num_bytes / (us * 1e-6)


def floor_us(num_bytes: int, bandwidth: float) -> float:
    """The time to move num_bytes at the measured bandwidth, in microseconds."""
    return num_bytes / bandwidth * 1e6
