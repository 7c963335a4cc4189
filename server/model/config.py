"""ModelConfig: the architecture facts loraplex needs, read once from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures served by the one Llama-family implementation, with their per-family quirks.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Packed linear of a decoder layer -> the checkpoint modules feeding its output slices, in
# column order. The one source of packed-slice geometry (see ModelConfig.packed_slices).
PACKED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass(frozen=True)
class PackedSlices:
    """Output columns of a packed linear: each slice's width and first column."""

    widths: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.widths[:i]) for i in range(len(self.widths)))


class ModelConfigError(ValueError):
    """The checkpoint's config.json cannot be served."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling from the checkpoint: `default`, `linear` or `llama3`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count, as the checkpoint stores it (tied embeddings counted once)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + embed + h

    def packed_slices(self, packed: str) -> PackedSlices:
        """Slice widths (and offsets) of packed linear `packed`, e.g. q/k/v of qkv_proj."""
        shapes = self.linear_shapes()
        return PackedSlices(tuple(shapes[name][1] for name in PACKED_LINEARS[packed]))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each per-layer linear, by its Hugging Face short name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(architectures) or "none"
            raise ModelConfigError(
                f"unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            cfg = cls(
                architecture=arch,
                model_type=str(raw.get("model_type", arch.removesuffix("ForCausalLM").lower())),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(raw),
                rope_scaling=_rope_scaling(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                o_bias=arch == "LlamaForCausalLM" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=_sliding_window(arch, raw),
                hidden_act=str(raw.get("hidden_act", "silu")),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_token_ids(raw.get("eos_token_id")),
                torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            )
        except KeyError as exc:
            raise ModelConfigError(
                f"config.json is missing required field {exc.args[0]!r}"
            ) from exc
        if cfg.hidden_act != "silu":
            raise ModelConfigError(f"unsupported hidden_act {cfg.hidden_act!r}; only 'silu'")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({cfg.num_heads}) is not a multiple of "
                f"num_key_value_heads ({cfg.num_kv_heads})"
            )
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"model directory {model_dir} has no config.json")
        return cls.from_dict(json.loads(path.read_text()))


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    return dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})


def _rope_theta(raw: dict[str, Any]) -> float:
    return float(raw.get("rope_theta") or _rope_params(raw).get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    params = _rope_params(raw)
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type == "default":
        return RopeScaling()
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )
    raise ModelConfigError(
        f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3"
    )


def _sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if arch == "MistralForCausalLM":
        return int(window) if window else None
    if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window"):
        raise ModelConfigError("Qwen2 with use_sliding_window=true is not supported")
    return None
