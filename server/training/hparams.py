"""Fine-tuning hyperparameters: one dataclass, per-method defaults, validated overrides.

QLoRA defaults follow the paper's Guanaco scripts (r 64, alpha 16, dropout 0.1, lr 2e-4
constant with 3% warmup, max grad norm 0.3, beta2 0.999, effective batch 16, all linear layers
but lm_head). LongLoRA defaults follow its fine-tuning scripts (LoRA r 8 / alpha 16 on q/k/v/o,
embeddings and norms trained, lr 2e-5 with 20 warmup steps, S2-Attn group = 1/4 sequence).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.config import MAX_SCALING
from adapters.errors import AdapterError, short_repr
from adapters.matching import ALL_LINEAR, MAX_PATTERNS, check_pattern

METHODS = ("qlora", "longlora")
QUANTIZE_CHOICES = ("nf4", "none")


class HParamsError(ValueError):
    """A hyperparameter that is unknown, of the wrong type, or out of range."""


@dataclass
class HParams:
    """Every knob of a fine-tuning run; build with `hparams_for(method, overrides)`."""

    method: str = "qlora"
    # LoRA (PEFT names)
    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    # base model
    quantize: str = "nf4"
    # optimization (Hugging Face TrainingArguments names)
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_grad_norm: float = 0.3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when set
    # data
    max_seq_len: int | None = None  # None: the base context (QLoRA), context_length (LongLoRA)
    group_by_length: bool = True
    train_on_prompt: bool = False
    validation_fraction: float = 0.1  # held out when no validation file is given
    max_validation_examples: int = 1000
    # bookkeeping
    gradient_checkpointing: bool = True
    seed: int = 42
    eval_steps: int | None = None  # None: evaluate at checkpoints and at the end only
    checkpoint_steps: int = 100  # 0: only the final adapter
    keep_checkpoints: int = 2
    # LongLoRA
    context_length: int | None = None  # target context; None: twice the base's
    s2_attn: bool = True
    s2_group_ratio: float = 0.25

    def validate(self) -> HParams:
        """Raise HParamsError naming the first value out of range; returns self."""
        if self.method not in METHODS:
            raise HParamsError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise HParamsError(
                f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}"
            )
        for name, (ok, rule) in _RULES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise HParamsError(f"hyperparameter {name} {rule}, got {short_repr(value)}")
        self._check_modules()
        try:
            scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        except OverflowError:  # r beyond float range: the scaling is ~0, the rank is refused
            scaling = 0.0
        if scaling > MAX_SCALING:
            raise HParamsError(
                f"hyperparameter lora_alpha {self.lora_alpha:g} with r {self.r} gives a LoRA "
                f"scaling of {scaling:g}, beyond the supported {MAX_SCALING:g}"
            )
        return self

    def _check_modules(self) -> None:
        """target_modules (a list, or an RE2 regex as a string) and modules_to_save."""
        targets = self.target_modules
        if isinstance(targets, list) and not targets:
            raise HParamsError("target_modules must name at least one module")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) > MAX_PATTERNS:
                raise HParamsError(f"{name} may name at most {MAX_PATTERNS} modules")
        if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
            try:
                check_pattern(targets, "target_modules")
            except AdapterError as exc:
                raise HParamsError(str(exc)) from exc

    @property
    def is_longlora(self) -> bool:
        return self.method == "longlora"

    def num_warmup_steps(self, total_steps: int) -> int:
        """warmup_steps if set, else ceil(warmup_ratio * total) as Hugging Face computes it."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)

    def rope_scaling_factor(self, original_len: int) -> float:
        """LongLoRA's position-interpolation factor ceil(target / original); 1.0 for QLoRA."""
        if not self.is_longlora:
            return 1.0
        return float(max(1, math.ceil(self.target_context(original_len) / original_len)))

    def target_context(self, original_len: int) -> int:
        """The context length trained for: context_length, or twice the base's for LongLoRA."""
        if self.context_length is not None:
            return self.context_length
        return 2 * original_len if self.is_longlora else original_len

    @property
    def s2_num_groups(self) -> int:
        return round(1 / self.s2_group_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _at_least(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low}"


def _in_range(low: float, high: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: low <= v < high), f"must be in [{low}, {high})"


# Range rules checked by HParams.validate (None passes: "not set").
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "r": _at_least(1),
    "lora_alpha": ((lambda v: v > 0), "must be > 0"),
    "lora_dropout": _in_range(0, 1),
    "learning_rate": ((lambda v: v > 0), "must be > 0"),
    "warmup_ratio": _in_range(0, 1),
    "warmup_steps": _at_least(0),
    "max_grad_norm": ((lambda v: v > 0), "must be > 0"),
    "adam_beta1": _in_range(0, 1),
    "adam_beta2": _in_range(0, 1),
    "adam_epsilon": ((lambda v: v > 0), "must be > 0"),
    "weight_decay": _at_least(0),
    "batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "num_epochs": _at_least(1),
    "max_steps": _at_least(1),
    "max_seq_len": _at_least(2),
    "validation_fraction": _in_range(0, 1),
    "max_validation_examples": _at_least(1),
    "eval_steps": _at_least(1),
    "checkpoint_steps": _at_least(0),
    "keep_checkpoints": _at_least(1),
    "context_length": _at_least(2),
    # Groups must tile the sequence: 1/ratio groups (1/4 in the paper, 1/8 also studied).
    "s2_group_ratio": (
        (lambda v: 0 < v <= 0.5 and abs(1 / v - round(1 / v)) < 1e-9),
        "must be 1/k for an integer k >= 2",
    ),
}


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "qlora": {},
    "longlora": {
        "r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "modules_to_save": ["embed_tokens", "norm"],
        "learning_rate": 2e-5,
        "warmup_steps": 20,
        "max_grad_norm": 1.0,
        "batch_size": 1,
        "gradient_accumulation_steps": 8,
    },
}


# Names other tools use for our hyperparameters, accepted as they are: OpenAI (n_epochs),
# axolotl (lora_r, micro_batch_size, lora_target_modules, sequence_len), LLaMA-Factory
# (lora_rank), Hugging Face TrainingArguments (num_train_epochs, per_device_train_batch_size)
# and TRL (max_seq_length).
ALIASES: dict[str, str] = {
    "lora_r": "r",
    "lora_rank": "r",
    "n_epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "lora_target_modules": "target_modules",
    "sequence_len": "max_seq_len",
    "max_seq_length": "max_seq_len",
}
# OpenAI's learning-rate knob: a factor on the method's default learning_rate.
LR_MULTIPLIER = "learning_rate_multiplier"
# OpenAI's "auto" for these means "the method's default" here.
AUTO = "auto"
AUTO_NAMES = frozenset({"batch_size", "num_epochs", LR_MULTIPLIER})


def hparams_for(method: str, overrides: Mapping[str, Any] | None = None) -> HParams:
    """Defaults for `method` with `overrides` applied; unknown keys are refused by name."""
    checked = _checked(canonical_overrides(method, overrides))
    return HParams(method=method, **{**METHOD_DEFAULTS[method], **checked}).validate()


def canonical_overrides(method: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """`overrides` under our names: aliases renamed, "auto" dropped (the method's default),
    learning_rate_multiplier turned into learning_rate. Unknown names are left for _checked."""
    if method not in METHODS:
        raise HParamsError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    overrides = dict(overrides or {})
    if overrides.get("method", method) != method:
        raise HParamsError(f"hyperparameter method={overrides['method']!r} contradicts {method!r}")
    overrides.pop("method", None)
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in overrides.items():
        name = ALIASES.get(key, key)
        if value == AUTO and name in AUTO_NAMES:
            continue
        if name in given_as:
            raise HParamsError(
                f"hyperparameters {given_as[name]} and {key} name the same setting; give one"
            )
        given_as[name] = key
        out[name] = value
    if LR_MULTIPLIER in out:
        multiplier = out.pop(LR_MULTIPLIER)
        if "learning_rate" in out:
            raise HParamsError(
                f"give learning_rate or {LR_MULTIPLIER}, not both (the multiplier scales the "
                f"default learning_rate of {method})"
            )
        if not _fits(multiplier, float) or not multiplier > 0:
            raise HParamsError(
                f"hyperparameter {LR_MULTIPLIER} must be a number > 0 or 'auto', "
                f"got {short_repr(multiplier)}"
            )
        default = METHOD_DEFAULTS[method].get("learning_rate", HParams.learning_rate)
        out["learning_rate"] = default * multiplier
    return out


def _suggestion(key: str, names: list[str]) -> str:
    """'; did you mean ...?' for the closest known name or alias, or ''."""
    close = difflib.get_close_matches(key, [*names, *ALIASES, LR_MULTIPLIER], n=1)
    if not close:
        return ""
    target = ALIASES.get(close[0])
    also = f" (an alias of {target!r})" if target else ""
    return f"; did you mean {close[0]!r}{also}?"


def _checked(overrides: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(HParams)
    for key, value in overrides.items():
        if key not in hints:
            raise HParamsError(f"unknown hyperparameter {key!r}{_suggestion(key, list(hints))}")
        if not _fits(value, hints[key]):
            raise HParamsError(
                f"hyperparameter {key} must be {_type_name(hints[key])}, got {short_repr(value)}"
            )
    # JSON may carry 2 for a float field; keep the dataclass's declared types.
    return {k: float(v) if hints[k] is float else v for k, v in overrides.items()}


def _fits(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        try:
            return isinstance(value, int | float) and math.isfinite(value)
        except OverflowError:  # an int beyond float range
            return False
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        return "a list of strings" if item is str else f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )
