"""How much device memory the page pool gets: what is left of the GPU's share after the
weights, the activation peak of the largest step and any training worker's reserve."""

from __future__ import annotations

from dataclasses import dataclass

from server.model.config import ModelConfig


@dataclass(frozen=True)
class MemorySplit:
    """Bytes of one GPU, as the server plans to use them."""

    total: int
    budget: int  # total x --gpu-memory-utilization
    in_use: int  # already allocated when the pool is sized (weights, other processes)
    activations: int  # reserve for the largest step's transient tensors
    training: int  # reserve for a fine-tuning worker on the same GPU
    pool: int

    def describe(self) -> str:
        mib = 2**20
        return (
            f"GPU {self.total / mib:.0f} MiB: budget {self.budget / mib:.0f} MiB "
            f"= in use {self.in_use / mib:.0f} + activations {self.activations / mib:.0f} "
            f"+ training {self.training / mib:.0f} + page pool {self.pool / mib:.0f} MiB"
        )


def activation_bytes(
    cfg: ModelConfig,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_lora_rank: int,
    dtype_bytes: int,
) -> int:
    """An upper estimate of the transient memory of the largest step: per token the residual
    stream, the packed q/k/v and gate/up outputs and LoRA's fp32 shrink buffer; per sampled row
    the float32 logits and the sampler's [rows, vocab] temporaries (sort, softmax, int64 noise
    hash). With 20% slack for the allocator's rounding."""
    qkv = cfg.q_size + 2 * cfg.kv_size
    per_token = dtype_bytes * (4 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size)
    per_token += 4 * 3 * max_lora_rank
    per_row = cfg.vocab_size * (6 * 4 + 3 * 8)
    return int(1.2 * (max_num_batched_tokens * per_token + max_num_seqs * per_row))


def split_memory(
    total: int, free: int, utilization: float, activations: int, training: int
) -> MemorySplit:
    """The pool gets total x utilization minus what is in use and the two reserves."""
    budget = int(total * utilization)
    in_use = total - free
    pool = budget - in_use - activations - training
    return MemorySplit(total, budget, in_use, activations, training, max(pool, 0))
