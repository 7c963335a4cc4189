"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config, tensors, tokenizer fields.

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes each tensor to
float32; this module maps GGUF's names and metadata onto the Hugging Face Llama layout:
- metadata `llama.*` -> config.json fields (transformers' GGUF loader maps the same keys);
- `blk.N.attn_q.weight` and the like -> `model.layers.N.self_attn.q_proj.weight`;
- q and k projections back to Hugging Face's rotary layout: llama.cpp's converter permutes
  their rows (per head, the two rotary halves interleaved) for its own RoPE kernel.
Anything else (another architecture, a tensor type the reader cannot dequantize, a tensor
with no Llama counterpart) is an error that names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.gguf_tokenizer import GgufVocabulary

# Tensor types dequantized here: what llama.cpp's Llama files use, all of which the gguf
# package's reader dequantizes (the i-quants and ternary types are left out).
SUPPORTED_TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


class GgufError(ValueError):
    """The GGUF file cannot be served: unreadable, or a model this loader does not handle."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor under its Hugging Face name, still in the file (read by `load`)."""

    name: str  # Hugging Face name
    gguf_name: str
    type_name: str
    shape: tuple[int, ...]  # torch order: [out_features, in_features] for a linear


class GgufCheckpoint:
    """A GGUF file opened for reading (memory-mapped: tensors are read as they are loaded)."""

    def __init__(self, path: str | Path) -> None:
        import gguf  # imported here: only GGUF checkpoints need it

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (OSError, ValueError, KeyError) as exc:
            raise GgufError(f"{self.path.name} is not a readable GGUF file: {exc}") from exc
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in SUPPORTED_GGUF_ARCHITECTURES:
            raise GgufError(
                f"{self.path.name}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        self.tensors = [self._tensor(t) for t in self._reader.tensors]
        pairs = zip(self.tensors, self._reader.tensors, strict=True)
        self._by_name = {t.name: raw for t, raw in pairs}

    def _field(self, key: str, default: Any = ...) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise GgufError(f"{self.path.name} has no GGUF metadata field {key!r}")
            return default
        return field.contents()

    def _arch_field(self, key: str, default: Any = ...) -> Any:
        return self._field(f"{self.architecture}.{key}", default)

    def _tensor(self, raw: Any) -> GgufTensor:
        type_name = raw.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise GgufError(
                f"{self.path.name}: tensor {raw.name!r} has GGUF type {type_name}, which is not "
                f"supported; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        name = _hf_name(raw.name)
        if name is None:
            raise GgufError(
                f"{self.path.name}: tensor {raw.name!r} has no place in a Llama model "
                "(rope_freqs, for instance, means a RoPE scaling this loader does not read)"
            )
        # GGUF lists dimensions fastest-varying first; torch wants the reverse.
        shape = tuple(int(d) for d in reversed(raw.shape.tolist()))
        return GgufTensor(name, raw.name, type_name, shape)

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json for the Hugging Face LlamaForCausalLM this file holds."""
        hidden = int(self._arch_field("embedding_length"))
        heads = int(self._arch_field("attention.head_count"))
        head_dim = int(self._arch_field("attention.key_length", hidden // heads))
        rotary = int(self._arch_field("rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise GgufError(
                f"{self.path.name}: {self.architecture}.rope.dimension_count is {rotary}, "
                f"not the head size {head_dim}; partial rotary embeddings are not supported"
            )
        vocab = self.vocabulary
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(self._arch_field("vocab_size", len(vocab.tokens))),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch_field("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self._arch_field("context_length")),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "tie_word_embeddings": all(t.name != "lm_head.weight" for t in self.tensors),
            "hidden_act": "silu",
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id", None),
        }
        scaling = self._arch_field("rope.scaling.type", "none")
        if scaling == "linear":
            factor = float(self._arch_field("rope.scaling.factor"))
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif scaling != "none":
            raise GgufError(
                f"{self.path.name}: {self.architecture}.rope.scaling.type {scaling!r} is not "
                "supported; supported: none, linear"
            )
        return config

    @cached_property
    def vocabulary(self) -> GgufVocabulary:
        """The tokenizer fields (tokenizer.ggml.*)."""
        return GgufVocabulary(
            model=str(self._field("tokenizer.ggml.model")),
            pre=str(self._field("tokenizer.ggml.pre", "default")),
            tokens=self._field("tokenizer.ggml.tokens"),
            token_types=[int(t) for t in self._field("tokenizer.ggml.token_type", [])],
            merges=self._field("tokenizer.ggml.merges", []),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
            add_bos_token=bool(self._field("tokenizer.ggml.add_bos_token", False)),
        )

    def token_text(self, key: str) -> str | None:
        """The text of the token a metadata field names by id, e.g. tokenizer.ggml.eos_token_id."""
        token_id = self._field(key, None)
        tokens = self.vocabulary.tokens
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise GgufError(f"{self.path.name}: {key} {token_id} is not a token id")
        return tokens[int(token_id)]

    @property
    def chat_template(self) -> str | None:
        """tokenizer.chat_template, when the file carries one."""
        source = self._field("tokenizer.chat_template", None)
        return None if source is None else str(source)

    def load(self, tensor: GgufTensor) -> torch.Tensor:
        """The tensor dequantized to float32, in Hugging Face's layout."""
        from gguf import dequantize

        raw = self._by_name[tensor.name]
        values = np.asarray(dequantize(raw.data, raw.tensor_type), dtype=np.float32)
        out = torch.from_numpy(values.reshape(tensor.shape).copy())
        if tensor.gguf_name.endswith("attn_q.weight"):
            return _unpermute_rotary(out, self.config["num_attention_heads"])
        if tensor.gguf_name.endswith("attn_k.weight"):
            return _unpermute_rotary(out, self.config["num_key_value_heads"])
        return out

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor) for every tensor, in file order."""
        for tensor in self.tensors:
            yield tensor.name, self.load(tensor)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Its converter stores each head's rows as
    (dim/2, 2) pairs, first and second rotary half interleaved, where Hugging Face keeps the
    halves apart as (2, dim/2): swap those two axes back."""
    rows, cols = weight.shape  # weight: [num_heads * head_dim, hidden]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
