"""How much device memory a training job may take beside the serving pool, and the checks.

The serving process preallocates its page pool at start (`--pool-mb`, or a fraction of free
memory), so the pool itself cannot be taken; what a worker could take is what serving's
per-step activations grow into. Three things bound a worker:

1. At creation, a job whose estimate exceeds `--training-memory-mb` is refused (400): it could
   never run.
2. At launch, a job whose estimate exceeds the device's free memory less `SERVING_HEADROOM` of
   its total waits in the queue (one event says why) and starts when memory frees.
3. In the worker, the CUDA caching allocator is capped at the memory granted at launch
   (`torch.cuda.set_per_process_memory_fraction`), so an estimate that was too low ends the job
   with an out-of-memory error naming the budget instead of growing into serving's memory.

The estimate counts the base as trained (NF4 linears at ~0.52 bytes a parameter, the rest in
the compute dtype), 16 bytes per trainable parameter (fp32 weight, gradient and AdamW's two
moments), one micro-batch's activations at its longest (`batch_size x max_seq_len` tokens) and a
CUDA context. It has not been measured against a GPU yet; on CPU nothing is measured and only
`--training-memory-mb`, when set, is checked (how tests exercise these rules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapters.config import AdapterSpec
from server.model.config import ModelConfig
from server.training.hparams import HParams

MIB = 2**20
NF4_BYTES_PER_PARAM = 0.52  # 4-bit codes + double-quantized absmax per 64 values
TRAINABLE_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
CUDA_CONTEXT_BYTES = 512 * MIB  # a second process's CUDA context and kernels
SERVING_HEADROOM = 0.05  # of total device memory, left free for serving's activations

DeviceMemory = Callable[[], tuple[int, int] | None]  # (free, total) bytes; None on CPU


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs on its device, by what holds them."""

    weights: int
    trainable: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.overhead

    def describe(self) -> str:
        parts = (
            f"base weights {self.weights / MIB:.0f}, trainable state {self.trainable / MIB:.0f}, "
            f"activations {self.activations / MIB:.0f}"
        )
        return f"about {self.total / MIB:.0f} MiB ({parts} MiB)"


def estimate(
    cfg: ModelConfig, hp: HParams, spec: AdapterSpec, max_seq_len: int, cuda: bool
) -> MemoryEstimate:
    """The device memory one training job on this base needs, by the rules above."""
    dtype_bytes = 2 if cuda else 4  # bf16 on GPUs, float32 on CPUs (as the Trainer runs)
    shapes = cfg.linear_shapes()
    linear = cfg.num_layers * sum(i * o for i, o in shapes.values())
    rest = cfg.num_params - linear
    per_linear = NF4_BYTES_PER_PARAM if hp.quantize == "nf4" else dtype_bytes
    weights = int(linear * per_linear) + rest * dtype_bytes
    trainable = spec.num_params * TRAINABLE_BYTES_PER_PARAM
    tokens = hp.batch_size * max_seq_len
    h = cfg.hidden_size
    # One layer's forward intermediates (q/k/v/o, gate/up/act, residuals), kept for backward.
    layer = tokens * (4 * h + 2 * cfg.kv_size + 3 * cfg.intermediate_size) * dtype_bytes
    groups = hp.s2_num_groups if hp.is_longlora and hp.s2_attn else 1
    scores = hp.batch_size * cfg.num_heads * max_seq_len**2 // groups * dtype_bytes
    if hp.gradient_checkpointing:  # every layer's input, one layer recomputed at a time
        layers = cfg.num_layers * tokens * h * dtype_bytes + layer + scores
    else:
        layers = cfg.num_layers * (layer + scores)
    logits = 2 * tokens * cfg.vocab_size * 4  # float32 logits and their gradient
    return MemoryEstimate(weights, trainable, layers + logits, CUDA_CONTEXT_BYTES if cuda else 0)


class MemoryBudgetError(ValueError):
    """A job that can never fit the training memory budget."""


@dataclass(frozen=True)
class MemoryBudget:
    """--training-memory-mb and the device's free memory: may a job start now?"""

    limit_bytes: int | None  # None: no fixed cap, only what is free
    device_memory: DeviceMemory
    # What was free beside serving once the pool was allocated: more never frees up.
    capacity_bytes: int | None = None

    @classmethod
    def at_start(cls, limit_bytes: int | None, device_memory: DeviceMemory) -> MemoryBudget:
        """Call once serving has allocated its pool: the capacity is read from the device."""
        device = device_memory()
        capacity = None if device is None else device[0] - int(SERVING_HEADROOM * device[1])
        return cls(limit_bytes, device_memory, capacity)

    def check_fits(self, need: MemoryEstimate) -> None:
        """Raise MemoryBudgetError when the job could never fit the cap or the device."""
        advice = "lower batch_size, max_seq_len or r, or use quantize nf4"
        if self.limit_bytes is not None and need.total > self.limit_bytes:
            raise MemoryBudgetError(
                f"this job needs {need.describe()} but --training-memory-mb allows "
                f"{self.limit_bytes / MIB:.0f} MiB; {advice}"
            )
        if self.capacity_bytes is not None and need.total > self.capacity_bytes:
            raise MemoryBudgetError(
                f"this job needs {need.describe()} but at most "
                f"{max(self.capacity_bytes, 0) / MIB:.0f} MiB of device memory is free beside "
                f"the serving pool; {advice}"
            )

    def grant(self, need: MemoryEstimate, granted: int = 0) -> tuple[int | None, str | None]:
        """(bytes the worker may use, None) to start now, or (None, why it must wait).

        `granted`: what running workers were granted. Their use may not show in the device's
        free memory yet (a worker allocates as it loads), so it counts as taken: with several
        concurrent jobs a later one may wait longer than it needs to, never take too much.
        On CPU (no device memory to measure) the grant is the fixed cap, or None: unbounded.
        """
        self.check_fits(need)
        device = self.device_memory()
        if device is None:
            return self.limit_bytes, None
        free, total = device
        available = free - int(SERVING_HEADROOM * total) - granted
        if need.total > available:
            return None, (
                f"waiting for device memory: this job needs {need.describe()}, "
                f"{max(available, 0) / MIB:.0f} MiB are free beside serving"
            )
        grant = available if self.limit_bytes is None else min(available, self.limit_bytes)
        return grant, None


def cuda_memory(device_index: int = 0) -> DeviceMemory:
    """The device's (free, total) bytes, read when called."""

    def read() -> tuple[int, int]:
        import torch

        return torch.cuda.mem_get_info(device_index)

    return read


def no_device_memory() -> None:
    """CPU: there is no device memory to measure."""
    return None


def cap_worker_memory(limit_bytes: int | None) -> None:
    """In a worker on CUDA: make the allocator refuse to grow past the grant."""
    import torch

    if limit_bytes is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), 0)
