"""PEFT's rules for which modules an adapter_config.json targets and saves.

Follows peft 0.21: `check_target_module_exists` and `_maybe_include_all_linear_layers`
(tuners/tuners_utils.py), `get_pattern_key` (utils/other.py) for rank_pattern/alpha_pattern,
and `_set_trainable` for modules_to_save.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from adapters.base import LORA_MODULES, BaseModelInfo, ModuleKind
from adapters.errors import AdapterError

ALL_LINEAR = "all-linear"
# PEFT's default target_modules for the llama model type, used when the config has none.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
_LORA_ABLE = ", ".join(LORA_MODULES)


def str_list(value: Any, key: str) -> list[str]:
    """A config value that must be a list of strings (None reads as empty)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{key} must be a list of module names, got {value!r}")
    return list(value)


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    """Compile a regex from a config, naming it if it is invalid."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{what} {pattern!r} is not a valid regular expression: {e}") from e


def pattern_key(patterns: Mapping[str, Any], name: str, what: str) -> str:
    """The rank_pattern/alpha_pattern key that applies to a module (peft's get_pattern_key)."""
    # The first key matching a dot-suffix of the name wins, as in peft.
    for key in patterns:
        if compile_pattern(rf"(.*\.)?({key})$", f"{what} key").match(name):
            return key
    return name


def saved_modules(modules_to_save: list[str], base: BaseModelInfo) -> tuple[str, ...]:
    """Full names of the modules whose weights modules_to_save stores; only norms and embeddings."""
    # peft's _set_trainable matches modules_to_save by plain suffix: "norm" catches every norm.
    saved = []
    used: set[str] = set()
    for name, kind in base.modules:
        hits = [entry for entry in modules_to_save if name.endswith(entry)]
        if not hits:
            continue
        used.update(hits)
        if kind is ModuleKind.HEAD:
            raise AdapterError("lm_head in modules_to_save is not supported")
        if kind not in (ModuleKind.NORM, ModuleKind.EMBEDDING):
            raise AdapterError(
                f"modules_to_save entry {hits[0]!r} matches {name!r}; only norm layers and "
                "embed_tokens can be saved with an adapter"
            )
        saved.append(name)
    unknown = [entry for entry in modules_to_save if entry not in used]
    if unknown:
        raise AdapterError(
            f"modules_to_save entry {unknown[0]!r} matches no module of the base model"
        )
    return tuple(saved)


def targeted_linears(
    raw: Mapping[str, Any], base: BaseModelInfo, modules_to_save: list[str]
) -> list[str]:
    """Full names of the linears LoRA targets, by peft's check_target_module_exists."""
    targets = raw.get("target_modules")
    if targets is None:
        targets = list(DEFAULT_TARGET_MODULES)
    layers = _layers_to_transform(raw.get("layers_to_transform"), base.num_layers)
    layers_pattern = raw.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    layers_pattern = str_list(layers_pattern, "layers_pattern")
    if layers_pattern and layers is None:
        raise AdapterError("layers_pattern needs layers_to_transform")

    regex: re.Pattern[str] | None = None
    if isinstance(targets, str):
        if layers is not None:
            raise AdapterError("layers_to_transform cannot be used when target_modules is a str")
        if targets.lower() == ALL_LINEAR:
            targets = [n for n, kind in base.modules if kind is ModuleKind.LINEAR]
        else:
            regex = compile_pattern(targets, "target_modules")
    else:
        targets = str_list(targets, "target_modules")
        _check_entries_exist(targets, base)
    exclude = _exclusion(raw.get("exclude_modules"))
    save_patterns = [
        compile_pattern(rf"(^|.*\.){m}($|\..*)", "modules_to_save") for m in modules_to_save
    ]

    target_set = set(targets)
    matched = []
    for name, kind, suffixes in base.module_suffixes:
        if exclude(name, suffixes) or any(p.match(name) for p in save_patterns):
            continue
        if regex is not None:
            found = regex.fullmatch(name) is not None
        elif name in target_set:
            found = True
        else:
            # peft's name.endswith("." + t), as set lookups of the name's dot-suffixes
            found = not target_set.isdisjoint(suffixes) and _in_layers(name, layers, layers_pattern)
        if found:
            _check_lora_able(name, kind)
            matched.append(name)
    if not matched:
        raise AdapterError(
            "adapter_config.json targets no module of the base model; check target_modules, "
            "layers_to_transform and exclude_modules"
        )
    return matched


def _check_entries_exist(targets: list[str], base: BaseModelInfo) -> None:
    for entry in targets:
        if entry not in base.all_suffixes:
            raise AdapterError(
                f"target module {entry!r} does not exist in the base model "
                f"(LoRA can target {_LORA_ABLE})"
            )


def _check_lora_able(name: str, kind: ModuleKind) -> None:
    if kind in (ModuleKind.HEAD, ModuleKind.EMBEDDING):
        short = name.rsplit(".", 1)[-1]
        raise AdapterError(
            f"LoRA on {short} is not supported; only {_LORA_ABLE} can carry LoRA "
            "(embed_tokens may be fully trained via modules_to_save)"
        )
    if kind is not ModuleKind.LINEAR:
        raise AdapterError(
            f"target_modules matches {name!r}, which is not a linear layer; "
            f"only {_LORA_ABLE} can carry LoRA"
        )


def _layers_to_transform(value: Any, num_layers: int) -> list[int] | None:
    if value is None or value == []:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise AdapterError(f"layers_to_transform must be an int or a list of ints, got {value!r}")
    for v in values:
        if not 0 <= v < num_layers:
            raise AdapterError(
                f"layers_to_transform names layer {v}, but the base model has {num_layers} "
                f"layers (0..{num_layers - 1})"
            )
    return values


def _in_layers(name: str, layers: list[int] | None, layers_pattern: list[str]) -> bool:
    if layers is None:
        return True
    # Lazy .*? takes the first numbered segment, as peft does.
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_pattern:
            compiled = compile_pattern(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern")
            match = compiled.match(name)
            if match is not None:
                break
    return match is not None and int(match.group("idx")) in layers


def _exclusion(value: Any) -> Callable[[str, frozenset[str]], bool]:
    """A predicate on (name, its dot-suffixes) for exclude_modules: regex or name/suffix list."""
    if not value:
        return lambda name, suffixes: False
    if isinstance(value, str):
        regex = compile_pattern(value, "exclude_modules")
        return lambda name, suffixes: regex.fullmatch(name) is not None
    entries = set(str_list(value, "exclude_modules"))
    return lambda name, suffixes: name in entries or not entries.isdisjoint(suffixes)
