"""Train the demo model: the project's own LlamaForCausalLM, from scratch, on the CPU."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from server.model.config import ModelConfig
from server.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

INIT_STD = 0.02
WARMUP_STEPS = 30
MIN_LR_RATIO = 0.1
MAX_EVAL_WINDOWS = 32
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5


@dataclass(frozen=True)
class DemoSize:
    """The demo model's shape, vocabulary, context, and the batch it trains with."""

    # Sized for 150 s on two busy CPU cores: measured there, a 3-layer 128-wide model seeing
    # ~1M tokens in small batches beats 4x256 or 4x192 models that see fewer.
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 2048
    context_length: int = 256
    batch_size: int = 2
    learning_rate: float = 1.5e-3

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                f"{self.num_kv_heads} do not divide evenly"
            )

    def hf_config(self, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict[str, Any]:
        """config.json for this size, as transformers writes it for a Llama model."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size // self.num_heads,
            "max_position_embeddings": self.context_length,
            "hidden_act": "silu",
            "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": ROPE_THETA,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": INIT_STD,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }


@dataclass(frozen=True)
class TrainResult:
    """What a training run did, for the record written next to the weights."""

    steps: int
    tokens: int
    seconds: float
    train_loss: float
    validation_loss: float
    num_threads: int


class ThreadCalibration:
    """Times a few steps with torch's thread count and with one thread, then keeps the faster.

    On a machine whose cores are busy with other work, intra-op threads wait on each other
    and one thread trains 2-30x faster (measured on two shared cores); on idle cores, all
    threads win.
    """

    STEPS_PER_CANDIDATE = 3

    def __init__(self) -> None:
        self.default = torch.get_num_threads()
        self.candidates = [self.default, 1] if self.default > 1 else []
        self.seconds = dict.fromkeys(self.candidates, 0.0)
        self.chosen: int | None = None

    def _candidate(self, step: int) -> int | None:
        index = (step - 1) // self.STEPS_PER_CANDIDATE  # step 0 warms up and is not timed
        return self.candidates[index] if step >= 1 and index < len(self.candidates) else None

    def before_step(self, step: int) -> None:
        candidate = self._candidate(step)
        if candidate is not None:
            torch.set_num_threads(candidate)

    def after_step(self, step: int, seconds: float) -> None:
        candidate = self._candidate(step)
        if candidate is None:
            return
        self.seconds[candidate] += seconds
        if step == len(self.candidates) * self.STEPS_PER_CANDIDATE:
            self.chosen = min(self.seconds, key=lambda n: self.seconds[n])
            torch.set_num_threads(self.chosen)
            logger.debug(
                "training with %d thread(s); seconds per step by thread count: %s",
                self.chosen,
                ", ".join(
                    f"{n}: {t / self.STEPS_PER_CANDIDATE:.2f}" for n, t in self.seconds.items()
                ),
            )

    def restore(self) -> None:
        torch.set_num_threads(self.default)


def init_weights(model: LlamaForCausalLM) -> None:
    """GPT-2 style init: N(0, 0.02), residual projections scaled down by depth."""
    residual_std = INIT_STD / math.sqrt(2 * model.config.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else INIT_STD
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW that decays matrices only; shrinking norm gains would just fight the loss."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, progress: float, peak: float) -> float:
    """Linear warmup over steps, then cosine decay over the fraction of the time budget used."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cosine)


def lm_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over windows: [B, S + 1] token ids."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    logits = model.compute_logits(model(inputs, positions))  # [B, S, vocab]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def eval_windows(stream: torch.Tensor, context_length: int) -> torch.Tensor:
    """Up to MAX_EVAL_WINDOWS evenly spaced, non-overlapping windows: [N, S + 1]."""
    length = min(context_length, stream.numel() - 1)
    count = min(MAX_EVAL_WINDOWS, (stream.numel() - 1) // length)
    starts = torch.linspace(0, stream.numel() - length - 1, count).long()
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()])


def train_step(
    model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float
) -> float:
    """One clipped AdamW step on batch: [B, S + 1] token ids; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = lm_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Mean loss over windows: [N, S + 1], in eval mode and without gradients."""
    model.eval()
    loss = lm_loss(model, windows).item()
    model.train()
    return loss


def train_model(
    cfg: ModelConfig,
    size: DemoSize,
    train_stream: torch.Tensor,
    validation_stream: torch.Tensor,
    *,
    train_seconds: float,
    seed: int,
    progress: bool,
) -> tuple[LlamaForCausalLM, TrainResult]:
    """Train a fresh model on random windows of the token stream until train_seconds pass."""
    assert train_stream.numel() > size.context_length + 1, "training text shorter than a window"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        init_weights(model)
    model.train()
    optimizer = make_optimizer(model, size.learning_rate)
    gen = torch.Generator().manual_seed(seed)
    window = size.context_length + 1
    offsets = torch.arange(window)
    max_start = train_stream.numel() - window
    bar = tqdm(
        total=round(train_seconds),
        unit="s",
        desc="training demo model",
        disable=not progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total}s{postfix}",
    )
    threads = ThreadCalibration()
    step, smoothed, start = 0, float("nan"), time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - start) < train_seconds:
            lr = lr_at(step, elapsed / train_seconds, size.learning_rate)
            starts = torch.randint(0, max_start + 1, (size.batch_size, 1), generator=gen)
            threads.before_step(step)
            step_start = time.perf_counter()
            loss = train_step(model, optimizer, train_stream[starts + offsets], lr)
            threads.after_step(step, time.perf_counter() - step_start)
            step += 1
            smoothed = loss if step == 1 else 0.9 * smoothed + 0.1 * loss
            bar.set_postfix_str(f"step {step}, loss {smoothed:.3f}, lr {lr:.1e}", refresh=False)
            bar.update(min(round(time.perf_counter() - start), bar.total) - bar.n)
    finally:
        threads.restore()
        bar.close()
    seconds = time.perf_counter() - start
    result = TrainResult(
        steps=step,
        tokens=step * size.batch_size * size.context_length,
        seconds=seconds,
        train_loss=evaluate(model, eval_windows(train_stream, size.context_length)),
        validation_loss=evaluate(model, eval_windows(validation_stream, size.context_length)),
        num_threads=threads.chosen or threads.default,
    )
    logger.info(
        "trained the demo model for %d steps (%.1fM tokens, %d thread(s)) in %.0fs: "
        "train loss %.3f, validation loss %.3f",
        result.steps,
        result.tokens / 1e6,
        result.num_threads,
        result.seconds,
        result.train_loss,
        result.validation_loss,
    )
    return model.eval(), result
