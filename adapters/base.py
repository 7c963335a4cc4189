"""The base model adapters are validated against: its Llama module names and shapes."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.chat_template import BaseVocabulary

# The linears LoRA may target, in the order targets are sorted.
LORA_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
MODULE_ORDER: dict[str, int] = {m: i for i, m in enumerate(LORA_MODULES)}
_PARENT = {m: "self_attn" for m in LORA_MODULES[:4]} | {m: "mlp" for m in LORA_MODULES[4:]}

EMBED_TOKENS = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"
LAYER_NORMS: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

_LINEAR_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


class ModuleKind(enum.Enum):
    """What a named module is, which decides whether LoRA or modules_to_save may touch it."""

    LINEAR = "linear"  # q/k/v/o/gate/up/down: LoRA-able
    EMBEDDING = "embedding"
    NORM = "norm"
    HEAD = "head"  # lm_head: a linear never LoRA-targeted
    OTHER = "other"  # containers, activations, rotary embedding


def linear_name(layer: int, module: str) -> str:
    """Full module name of one targeted linear, e.g. model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def parse_linear_name(name: str) -> tuple[int, str] | None:
    """(layer, short module) for a LoRA-able linear's full name, else None."""
    match = _LINEAR_NAME.fullmatch(name)
    if match is None or _PARENT.get(match.group(3)) != match.group(2):
        return None
    return int(match.group(1)), match.group(3)


def named_modules(num_layers: int) -> list[tuple[str, ModuleKind]]:
    """Every module name of a Llama causal LM with num_layers layers, in named_modules order."""
    names: list[tuple[str, ModuleKind]] = [
        ("model", ModuleKind.OTHER),
        (EMBED_TOKENS, ModuleKind.EMBEDDING),
        ("model.layers", ModuleKind.OTHER),
    ]
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        names.append((prefix, ModuleKind.OTHER))
        names.append((f"{prefix}.self_attn", ModuleKind.OTHER))
        names.extend((linear_name(i, m), ModuleKind.LINEAR) for m in LORA_MODULES[:4])
        names.append((f"{prefix}.mlp", ModuleKind.OTHER))
        names.extend((linear_name(i, m), ModuleKind.LINEAR) for m in LORA_MODULES[4:])
        names.append((f"{prefix}.mlp.act_fn", ModuleKind.OTHER))
        names.extend((f"{prefix}.{n}", ModuleKind.NORM) for n in LAYER_NORMS)
    names.append((FINAL_NORM, ModuleKind.NORM))
    names.append(("model.rotary_emb", ModuleKind.OTHER))
    names.append((LM_HEAD, ModuleKind.HEAD))
    return names


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter is validated against (built by the server from the model's config)."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    # short name -> (in_features, out_features), for every module in LORA_MODULES
    linear_shapes: dict[str, tuple[int, int]] = field(hash=False)
    # The tokenizer's tokens, which an adapter's tokenizer files must match; None: unknown,
    # and then an adapter shipping tokenizer files is refused.
    vocabulary: BaseVocabulary | None = field(default=None, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        missing = [m for m in LORA_MODULES if m not in self.linear_shapes]
        if missing:
            raise ValueError(f"BaseModelInfo.linear_shapes lacks {', '.join(missing)}")

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any], vocabulary: BaseVocabulary | None = None
    ) -> BaseModelInfo:
        """Shapes of a Llama-family model from its Hugging Face config.json contents."""
        hidden = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            vocab_size=int(config["vocab_size"]),
            linear_shapes={
                "q_proj": (hidden, heads * head_dim),
                "k_proj": (hidden, kv_heads * head_dim),
                "v_proj": (hidden, kv_heads * head_dim),
                "o_proj": (heads * head_dim, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
            vocabulary=vocabulary,
        )

    @cached_property
    def modules(self) -> list[tuple[str, ModuleKind]]:
        """Every module name of the base, in named_modules order."""
        return named_modules(self.num_layers)

    @cached_property
    def module_suffixes(self) -> list[tuple[str, ModuleKind, frozenset[str]]]:
        """Each module with its proper dot-suffixes ("q_proj", "self_attn.q_proj", ...)."""
        result = []
        for name, kind in self.modules:
            parts = name.split(".")
            suffixes = frozenset(".".join(parts[i:]) for i in range(1, len(parts)))
            result.append((name, kind, suffixes))
        return result

    @cached_property
    def all_suffixes(self) -> frozenset[str]:
        """Every module name and every dot-suffix of one: what a target_modules entry may be."""
        names = {name for name, _ in self.modules}
        return frozenset(names.union(*(s for _, _, s in self.module_suffixes)))

    def saved_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a saved module weight: [vocab, hidden] for embed_tokens, [hidden] for norms."""
        if name == EMBED_TOKENS:
            return (self.vocab_size, self.hidden_size)
        return (self.hidden_size,)
