"""generation_config.json: the tokens that end generation, and the model's sampling defaults.

Model authors ship their recommended sampling there (Llama 3.1: temperature 0.6, top_p 0.9).
As vLLM does with `--generation-config auto`, a request that leaves a field out gets the
model's value; only the fields that differ from transformers' own defaults count, so a
file that restates a default (top_k 50) changes nothing. `--generation-config vllm` ignores
the file's sampling fields; a folder path reads generation_config.json from there instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' GenerationConfig defaults: a field equal to its default is no recommendation.
_HF_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
    "max_new_tokens": None,
}


class GenerationConfigError(ValueError):
    """generation_config.json has a field that cannot be used."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling values for fields a request leaves out (None: the API's own default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # the file's max_new_tokens

    def as_dict(self) -> dict[str, float | int]:
        """The fields that are set."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class GenerationConfig:
    """What generation_config.json says: end-of-generation ids and sampling defaults."""

    eos_token_ids: tuple[int, ...] = ()
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    @classmethod
    def from_dir(cls, model_dir: Path) -> GenerationConfig:
        """Read model_dir/generation_config.json; an absent file says nothing."""
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:
            message = f"{GENERATION_CONFIG_FILE} is not valid JSON: {exc}"
            raise GenerationConfigError(message) from exc
        if not isinstance(raw, dict):
            raise GenerationConfigError(f"{GENERATION_CONFIG_FILE} must hold a JSON object")
        return cls(_eos_ids(raw.get("eos_token_id")), _defaults(raw))


def generation_defaults(mode: str, model_dir: Path) -> GenerationDefaults:
    """The defaults `--generation-config mode` asks for: auto (the model's), vllm (none), or
    a folder holding a generation_config.json."""
    if mode == "vllm":
        return GenerationDefaults()
    folder = Path(model_dir) if mode == "auto" else Path(mode)
    if mode != "auto" and not (folder / GENERATION_CONFIG_FILE).is_file():
        raise GenerationConfigError(
            f"--generation-config {folder.name!r} is not a folder holding {GENERATION_CONFIG_FILE}"
        )
    return GenerationConfig.from_dir(folder).defaults


def _where(key: str) -> str:
    return f"{GENERATION_CONFIG_FILE} field {key!r}"


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise GenerationConfigError(
            f"{_where('eos_token_id')} must be a token id or a list of them, got {value!r}"
        )
    return tuple(values)


def _defaults(raw: dict[str, Any]) -> GenerationDefaults:
    found: dict[str, Any] = {}
    for key, default in _HF_DEFAULTS.items():
        value = raw.get(key)
        if value is None or value == default:
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise GenerationConfigError(f"{_where(key)} must be a number, got {value!r}")
        found[key] = value
    _check(found, "temperature", lambda v: 0 <= v <= 2, "in [0, 2]")
    _check(found, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    _check(found, "top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    _check(found, "repetition_penalty", lambda v: v > 0, "> 0")
    _check(found, "max_new_tokens", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    return GenerationDefaults(
        temperature=found.get("temperature"),
        top_p=found.get("top_p"),
        top_k=found.get("top_k"),
        repetition_penalty=found.get("repetition_penalty"),
        max_tokens=found.get("max_new_tokens"),
    )


def _check(found: dict[str, Any], key: str, ok: Any, expected: str) -> None:
    if key in found and not ok(found[key]):
        raise GenerationConfigError(f"{_where(key)} must be {expected}, got {found[key]!r}")
