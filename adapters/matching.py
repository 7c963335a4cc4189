"""PEFT's rules for which modules an adapter_config.json targets and saves.

Follows peft 0.21: `check_target_module_exists` and `_maybe_include_all_linear_layers`
(tuners/tuners_utils.py), `get_pattern_key` (utils/other.py) for rank_pattern/alpha_pattern,
and `_set_trainable` for modules_to_save. Patterns from configs run on RE2 rather than
Python's re (same match semantics for module names, but linear time), so a pattern like
"(.*)*(.*)*Z" cannot hold the GIL for minutes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import re2

from adapters.base import LORA_MODULES, BaseModelInfo, ModuleKind
from adapters.errors import AdapterError, short_repr

ALL_LINEAR = "all-linear"
# PEFT's default target_modules for the llama model type, used when the config has none.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
_LORA_ABLE = ", ".join(LORA_MODULES)

# Patterns come from uploads and job requests, so they run on RE2 (linear time, no catastrophic
# backtracking) with bounded size: a real pattern names modules in well under 1 KiB, and a
# rank_pattern listing every linear of a 126-layer model one by one has 882 keys.
MAX_PATTERN_CHARS = 1024
MAX_PATTERNS = 1024
# RE2's budget for one compiled program and its DFA cache; a pattern needing more is refused.
_RE2_MAX_MEM = 2 << 20
Regex = Any  # a compiled re2 pattern (re2 ships no type stubs)
_FIRST_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # ours, not a user pattern


def str_list(value: Any, key: str) -> list[str]:
    """A config value that must be a list of strings (None reads as empty)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{key} must be a list of module names, got {short_repr(value)}")
    return list(value)


def check_pattern_count(num_patterns: int, what: str) -> None:
    """Refuse more patterns than MAX_PATTERNS under one field."""
    if num_patterns > MAX_PATTERNS:
        raise AdapterError(
            f"{what} has {num_patterns} patterns; at most {MAX_PATTERNS} are allowed"
        )


def check_pattern(pattern: str, what: str) -> None:
    """Refuse a user pattern RE2 cannot run (or one too long), naming the field."""
    compile_pattern(pattern, pattern, what)


def compile_pattern(regex: str, pattern: str, what: str) -> Regex:
    """Compile regex (built around the user's pattern) with RE2; errors name what and pattern."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(
            f"{what} {short_repr(pattern)} is {len(pattern)} characters long; patterns may have "
            f"at most {MAX_PATTERN_CHARS}"
        )
    try:
        return _compile(regex)
    except re2.error as e:
        reason = (
            e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        )
        raise AdapterError(
            f"{what} {short_repr(pattern)} is not a supported regular expression: {reason} "
            "(RE2 syntax: no backreferences or lookaround)"
        ) from e


# Bounded: each entry may hold up to _RE2_MAX_MEM, and uploads bring new patterns.
@functools.lru_cache(maxsize=256)
def _compile(regex: str) -> Regex:
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    return re2.compile(regex, options)


def pattern_keys(patterns: Mapping[str, Any], what: str) -> list[tuple[str, Regex]]:
    """rank_pattern/alpha_pattern keys with the regex peft's get_pattern_key matches them by."""
    return [(key, compile_pattern(rf"(.*\.)?({key})$", key, f"{what} key")) for key in patterns]


def pattern_key(keys: list[tuple[str, Regex]], name: str) -> str:
    """The rank_pattern/alpha_pattern key that applies to a module (peft's get_pattern_key)."""
    # The first key matching a dot-suffix of the name wins, as in peft.
    for key, regex in keys:
        if regex.match(name):
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
                f"modules_to_save entry {short_repr(hits[0])} matches {name!r}; only norm "
                "layers and embed_tokens can be saved with an adapter"
            )
        saved.append(name)
    unknown = [entry for entry in modules_to_save if entry not in used]
    if unknown:
        raise AdapterError(
            f"modules_to_save entry {short_repr(unknown[0])} matches no module of the base model"
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
    check_pattern_count(len(layers_pattern), "layers_pattern")
    layers_regexes = [
        compile_pattern(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", p, "layers_pattern")
        for p in layers_pattern
    ]
    if layers_pattern and layers is None:
        raise AdapterError("layers_pattern needs layers_to_transform")

    regex: Regex | None = None
    if isinstance(targets, str):
        if layers is not None:
            raise AdapterError("layers_to_transform cannot be used when target_modules is a str")
        if targets.lower() == ALL_LINEAR:
            targets = [n for n, kind in base.modules if kind is ModuleKind.LINEAR]
        else:
            regex = compile_pattern(targets, targets, "target_modules")
    else:
        targets = str_list(targets, "target_modules")
        _check_entries_exist(targets, base)
    exclude = _exclusion(raw.get("exclude_modules"))
    check_pattern_count(len(modules_to_save), "modules_to_save")
    save_patterns = [
        compile_pattern(rf"(^|.*\.){m}($|\..*)", m, "modules_to_save") for m in modules_to_save
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
            found = not target_set.isdisjoint(suffixes) and _in_layers(name, layers, layers_regexes)
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
                f"target module {short_repr(entry)} does not exist in the base model "
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
        raise AdapterError(
            f"layers_to_transform must be an int or a list of ints, got {short_repr(value)}"
        )
    for v in values:
        if not 0 <= v < num_layers:
            raise AdapterError(
                f"layers_to_transform names layer {v}, but the base model has {num_layers} "
                f"layers (0..{num_layers - 1})"
            )
    return values


def _in_layers(name: str, layers: list[int] | None, layers_regexes: list[Regex]) -> bool:
    if layers is None:
        return True
    # Lazy .*? takes the first numbered segment, as peft does.
    if not layers_regexes:
        match = _FIRST_LAYER_INDEX.match(name)
    else:
        match = None
        for regex in layers_regexes:
            match = regex.match(name)
            if match is not None:
                break
    return match is not None and int(match.group("idx")) in layers


def _exclusion(value: Any) -> Callable[[str, frozenset[str]], bool]:
    """A predicate on (name, its dot-suffixes) for exclude_modules: regex or name/suffix list."""
    if not value:
        return lambda name, suffixes: False
    if isinstance(value, str):
        regex = compile_pattern(value, value, "exclude_modules")
        return lambda name, suffixes: regex.fullmatch(name) is not None
    entries = set(str_list(value, "exclude_modules"))
    return lambda name, suffixes: name in entries or not entries.isdisjoint(suffixes)
