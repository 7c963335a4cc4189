"""adapter_config.json -> AdapterSpec, validated against a base model."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from adapters.base import MODULE_ORDER, BaseModelInfo, parse_linear_name
from adapters.chat_template import ChatTemplate
from adapters.errors import AdapterError, short_repr
from adapters.matching import (
    Regex,
    check_pattern_count,
    pattern_key,
    pattern_keys,
    saved_modules,
    str_list,
    targeted_linears,
)

__all__ = ["AdapterError", "AdapterSpec", "BaseModelInfo", "LoraTarget", "parse_adapter_config"]

# LoRA variants whose forward pass differs from plain LoRA (peft's lora_variants, use_qalora).
_VARIANT_KEYS = (
    "arrow_config",
    "use_bdlora",
    "alora_invocation_tokens",
    "monteclora_config",
    "kasa_config",
    "use_qalora",
)

# |scaling| bound. Real adapters use 0.25 (QLoRA: 16/64) to about 32 (rsLoRA, alpha = 2r at
# r 256); 1024 leaves 30x headroom over that, while a larger factor only serves to push
# scaling * B @ A x past fp16/bf16 range (1e30 turned every output into NaN).
MAX_SCALING = 1024.0


@dataclass(frozen=True)
class LoraTarget:
    """One targeted linear in one layer, with its own rank and scaling."""

    layer: int
    module: str  # short name, e.g. "q_proj"
    rank: int
    alpha: float
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with use_rslora
    in_features: int
    out_features: int

    @property
    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter: what it targets, at which ranks and scalings, and what it saves."""

    rank: int  # the config's r
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names targeted, in LORA_MODULES order
    targets: tuple[LoraTarget, ...]  # sorted by (layer, LORA_MODULES order)
    saved_modules: tuple[str, ...]  # full names of modules_to_save weights, named_modules order
    rope_scaling_factor: float = 1.0  # linear RoPE factor the adapter was trained with (LongLoRA)
    base_model_name_or_path: str | None = None
    num_saved_params: int = 0
    chat_template: ChatTemplate | None = None  # its own, from its tokenizer files

    @property
    def max_rank(self) -> int:
        return max(t.rank for t in self.targets)

    @property
    def num_lora_params(self) -> int:
        return sum(t.num_params for t in self.targets)

    @property
    def num_params(self) -> int:
        return self.num_lora_params + self.num_saved_params

    @cached_property
    def _by_key(self) -> dict[tuple[int, str], LoraTarget]:
        return {(t.layer, t.module): t for t in self.targets}

    def target(self, layer: int, module: str) -> LoraTarget | None:
        """The target for (layer, short module name), or None if that linear has no LoRA."""
        return self._by_key.get((layer, module))

    def targets_in_layer(self, layer: int) -> tuple[LoraTarget, ...]:
        """Targets of one layer, in LORA_MODULES order."""
        return tuple(t for t in self.targets if t.layer == layer)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that from_dict turns back into an equal spec."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSpec:
        """Rebuild a spec written by to_dict."""
        return cls(
            rank=data["rank"],
            alpha=data["alpha"],
            use_rslora=data["use_rslora"],
            target_modules=tuple(data["target_modules"]),
            targets=tuple(LoraTarget(**t) for t in data["targets"]),
            saved_modules=tuple(data["saved_modules"]),
            rope_scaling_factor=data["rope_scaling_factor"],
            base_model_name_or_path=data["base_model_name_or_path"],
            num_saved_params=data["num_saved_params"],
            chat_template=_template(data.get("chat_template")),
        )


def _template(data: Mapping[str, Any] | None) -> ChatTemplate | None:
    return None if data is None else ChatTemplate(**data)


def parse_adapter_config(
    raw: Mapping[str, Any], base: BaseModelInfo, max_lora_rank: int
) -> AdapterSpec:
    """Validate an adapter_config.json dict against the base and return its spec."""
    if not isinstance(raw, Mapping):
        raise AdapterError("adapter_config.json must hold a JSON object")
    try:
        # Unsorted: the order of rank_pattern/alpha_pattern keys decides which one applies.
        key = json.dumps(raw)
    except (TypeError, ValueError, RecursionError):
        key = None
    if key is None or json.loads(key) != raw:  # only plain JSON data is memoized
        return _parse(raw, base, max_lora_rank)
    # Thousands of stored adapters often share a config; each distinct one is parsed once.
    return _parse_json(key, base, max_lora_rank)


@functools.lru_cache(maxsize=1024)
def _parse_json(key: str, base: BaseModelInfo, max_lora_rank: int) -> AdapterSpec:
    return _parse(json.loads(key), base, max_lora_rank)


def _parse(raw: Mapping[str, Any], base: BaseModelInfo, max_lora_rank: int) -> AdapterSpec:
    _check_kind(raw)
    _refuse_unsupported(raw)
    rank = _rank(raw.get("r", 8), "r", max_lora_rank)
    alpha = _alpha(raw.get("lora_alpha", 8), "lora_alpha")
    use_rslora = _flag(raw, "use_rslora")
    rank_pattern = {
        k: _rank(v, f"rank_pattern[{short_repr(k)}]", max_lora_rank)
        for k, v in _pattern(raw, "rank_pattern").items()
    }
    alpha_pattern = {
        k: _alpha(v, f"alpha_pattern[{short_repr(k)}]")
        for k, v in _pattern(raw, "alpha_pattern").items()
    }
    rank_keys = pattern_keys(rank_pattern, "rank_pattern")
    alpha_keys = pattern_keys(alpha_pattern, "alpha_pattern")
    modules_to_save = str_list(raw.get("modules_to_save"), "modules_to_save")
    saved = saved_modules(modules_to_save, base)

    targets = []
    used_keys: set[str] = set()
    names = targeted_linears(raw, base, modules_to_save)
    for name in names:
        layer_module = parse_linear_name(name)
        assert layer_module is not None, name
        layer, module = layer_module
        r_key = pattern_key(rank_keys, name)
        a_key = pattern_key(alpha_keys, name)
        r = rank_pattern.get(r_key, rank)
        a = alpha_pattern.get(a_key, alpha)
        used_keys.update((r_key, a_key))
        in_features, out_features = base.linear_shapes[module]
        scaling = a / math.sqrt(r) if use_rslora else a / r
        if abs(scaling) > MAX_SCALING:
            _refuse_scaling(
                f"alpha_pattern[{short_repr(a_key)}]" if a_key in alpha_pattern else "lora_alpha",
                f"rank_pattern[{short_repr(r_key)}]" if r_key in rank_pattern else "r",
                a,
                r,
                use_rslora,
                name,
            )
        targets.append(LoraTarget(layer, module, r, a, scaling, in_features, out_features))
    targets.sort(key=lambda t: (t.layer, MODULE_ORDER[t.module]))
    _check_all_match(rank_keys, "rank_pattern", used_keys, names)
    _check_all_match(alpha_keys, "alpha_pattern", used_keys, names)

    base_name = raw.get("base_model_name_or_path")
    return AdapterSpec(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=tuple(sorted({t.module for t in targets}, key=MODULE_ORDER.__getitem__)),
        targets=tuple(targets),
        saved_modules=saved,
        rope_scaling_factor=_rope_scaling_factor(raw.get("rope_scaling_factor", 1.0)),
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        num_saved_params=sum(math.prod(base.saved_shape(n)) for n in saved),
    )


def _check_all_match(
    keys: list[tuple[str, Regex]], what: str, used_keys: set[str], names: list[str]
) -> None:
    # peft warns that such keys "were ignored"; a typo there silently changes the adapter.
    for key, regex in keys:
        if key not in used_keys and not any(regex.match(name) for name in names):
            raise AdapterError(
                f"{what} key {short_repr(key)} matches no module this adapter targets; "
                "fix or remove it"
            )


def _refuse_scaling(
    alpha_field: str, rank_field: str, alpha: float, rank: int, use_rslora: bool, name: str
) -> None:
    formula = (
        f"{alpha_field} / sqrt({rank_field})" if use_rslora else f"{alpha_field} / {rank_field}"
    )
    raise AdapterError(
        f"{alpha_field} {alpha:g} with {rank_field} {rank} gives {name} a LoRA scaling "
        f"({formula}) beyond the supported range of +-{MAX_SCALING:g}"
    )


def _check_kind(raw: Mapping[str, Any]) -> None:
    peft_type = raw.get("peft_type")
    if peft_type is not None and (not isinstance(peft_type, str) or peft_type.upper() != "LORA"):
        raise AdapterError(
            f"peft_type {short_repr(peft_type)} is not supported; only LORA adapters are"
        )
    task_type = raw.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise AdapterError(f"task_type {short_repr(task_type)} is not supported; only CAUSAL_LM is")


def _refuse_unsupported(raw: Mapping[str, Any]) -> None:
    if raw.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora: true) are not supported")
    if raw.get("lora_bias"):
        raise AdapterError("LoRA bias (lora_bias: true) is not supported")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias {short_repr(bias)} is not supported; only bias 'none' is")
    if raw.get("fan_in_fan_out"):
        raise AdapterError(
            "fan_in_fan_out: true (GPT-2 style Conv1D weights) is not supported; "
            "Llama-family linears store [out, in]"
        )
    if raw.get("layer_replication"):
        raise AdapterError("layer_replication is not supported")
    if raw.get("target_parameters"):
        raise AdapterError("target_parameters (LoRA on raw parameters) is not supported")
    if raw.get("trainable_token_indices"):
        raise AdapterError("trainable_token_indices is not supported")
    for key in _VARIANT_KEYS:
        if raw.get(key):
            raise AdapterError(f"{key} is set: this LoRA variant is not supported, only plain LoRA")


def _flag(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise AdapterError(f"{key} must be true or false, got {short_repr(value)}")
    return value


def _rank(value: Any, what: str, max_lora_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{what} must be an integer rank, got {short_repr(value)}")
    if value < 1:
        raise AdapterError(f"{what} must be >= 1, got {short_repr(value)}")
    if value > max_lora_rank:
        raise AdapterError(
            f"{what} is rank {short_repr(value)}, above the server's maximum LoRA rank "
            f"{max_lora_rank} (set by --max-lora-rank)"
        )
    return value


def _alpha(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterError(f"{what} must be a number, got {short_repr(value)}")
    alpha = _as_float(value)
    if not math.isfinite(alpha):
        raise AdapterError(f"{what} must be a finite number, got {short_repr(value)}")
    if alpha <= 0:
        raise AdapterError(f"{what} must be positive, got {short_repr(value)}")
    return alpha


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf if value > 0 else -math.inf


def _rope_scaling_factor(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(_as_float(value))
        or value < 1
    ):
        raise AdapterError(
            "rope_scaling_factor must be a number >= 1 (the linear RoPE factor the adapter "
            f"was trained with), got {short_repr(value)}"
        )
    return float(value)


def _pattern(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise AdapterError(
            f"{key} must map module-name patterns to values, got {short_repr(value)}"
        )
    check_pattern_count(len(value), key)
    return dict(value)
