"""Shared bench pieces: random checkpoints of a chosen size, synthetic adapters, timing."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters import AdapterWeights, write_adapter
from adapters.format import lora_config_dict

TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class ModelSize:
    layers: int = 8
    hidden: int = 512
    intermediate: int = 1408
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 4096
    max_len: int = 1024

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each LoRA-targetable linear."""
        kv = self.hidden // self.heads * self.kv_heads
        return {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def describe(self) -> str:
        return (
            f"{self.layers} layers x {self.hidden} hidden ({self.heads} heads, "
            f"{self.kv_heads} kv heads), vocab {self.vocab}"
        )


def real_model(spec: str) -> tuple[Path, ModelSize]:
    """A pretrained checkpoint to benchmark on ('default': SmolLM2-135M-Instruct, else a
    directory or a .gguf file) and its shape."""
    from server.model.config import ModelConfig
    from server.model.resolve import resolve_model

    model_dir = resolve_model(None if spec == "default" else spec, torch.float32)
    cfg = ModelConfig.from_dir(model_dir)
    size = ModelSize(
        layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        vocab=cfg.vocab_size,
        max_len=cfg.max_position_embeddings,
    )
    return model_dir, size


def random_model(
    path: Path, size: ModelSize, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A randomly initialized Llama checkpoint (transformers layout) with a BPE tokenizer,
    its weights saved in `dtype` (built in it too, so an 8B model needs 16 GB, not 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").is_file():
        return path
    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_len,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    finally:
        torch.set_default_dtype(default)
    from pydoc_data.topics import topics

    _bpe_tokenizer(list(topics.values()), size.vocab).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    return path


def _bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on texts, with <pad>, <s> and </s> as ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def synthetic_adapter(
    path: Path, size: ModelSize, rank: int, targets: tuple[str, ...], seed: int
) -> Path:
    """A PEFT-format LoRA adapter with small random weights."""
    if (path / "adapter_model.safetensors").is_file():
        return path
    gen = torch.Generator().manual_seed(seed)
    shapes = size.linear_shapes
    lora = {}
    for layer in range(size.layers):
        for m in targets:
            fan_in, fan_out = shapes[m]
            lora[layer, m] = (
                torch.randn(rank, fan_in, generator=gen) / fan_in**0.5,
                torch.randn(fan_out, rank, generator=gen) * 0.01,
            )
    write_adapter(path, lora_config_dict(rank, 2.0 * rank, targets), AdapterWeights(lora=lora))
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
