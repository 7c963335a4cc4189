"""What a run reports: per-step events to a callback, and its result at the end."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

EVENT_KINDS = ("step", "eval", "checkpoint", "message")


@dataclass
class TrainingEvent:
    """kind: one of EVENT_KINDS; fields a kind does not use are None (and left out of to_dict)."""

    kind: str
    step: int  # optimizer steps completed
    total_steps: int
    loss: float | None = None  # step: mean loss per trained token of this step
    learning_rate: float | None = None  # step: the rate this step used
    tokens: int | None = None  # step: real (unpadded) tokens in this step's batches
    tokens_per_second: float | None = None  # step: tokens / step time
    grad_norm: float | None = None  # step: before clipping
    train_loss: float | None = None  # checkpoint/eval: mean step loss since the last one
    valid_loss: float | None = None  # eval/checkpoint: per-token loss on the validation set
    checkpoint_dir: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainingResult:
    """How a run ended (status "succeeded" or "cancelled") and what it produced."""

    status: str
    step: int
    total_steps: int
    adapter_dir: Path | None  # None when cancelled
    initial_valid_loss: float | None  # before the first step (None when resumed)
    valid_loss: float | None
    train_loss: float | None
    rope_scaling_factor: float
    trained_tokens: int  # tokens this process trained on (resumed steps not counted)
    train_seconds: float
    peak_memory_bytes: int  # CUDA: peak allocated; CPU: the process's peak RSS

    @property
    def tokens_per_second(self) -> float:
        return self.trained_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


EventCallback = Callable[[TrainingEvent], None]
StopCallback = Callable[[], bool]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run on `device`: CUDA allocator peak, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
