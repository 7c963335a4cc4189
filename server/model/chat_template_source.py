"""Which chat template the base model renders chats with, and where it was read from.

In order: an explicit file (`--chat-template`), the checkpoint's chat_template.jinja (where
transformers >= 4.43 saves it), then tokenizer_config.json's chat_template (a string, or a
list of named templates of which `default` is used). The adapters' own templates are read by
adapters.chat_template; this is the base's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_CHARS = 256 * 1024  # an operator's file; real templates are 1-15 KB


class ChatTemplateSourceError(ValueError):
    """A chat template file or field that cannot be used, named with where it is."""


@dataclass(frozen=True)
class ChatTemplateSource:
    """A chat template's jinja source and where it came from (for logs and errors)."""

    source: str
    origin: str


def base_chat_template(
    model_dir: Path, override: str | Path | None = None
) -> ChatTemplateSource | None:
    """The base model's chat template: `override` if given, else the checkpoint's own."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ChatTemplateSourceError(f"--chat-template {str(path)!r} is not a file")
        return ChatTemplateSource(_read_text(path, f"--chat-template {path.name}"), str(path))
    jinja_file = model_dir / TEMPLATE_FILE
    if jinja_file.is_file():
        return ChatTemplateSource(_read_text(jinja_file, TEMPLATE_FILE), TEMPLATE_FILE)
    config = read_tokenizer_config(model_dir)
    where = f"{TOKENIZER_CONFIG_FILE} field 'chat_template'"
    source: Any = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateSourceError(f"{where} is a list of named templates without 'default'")
        source = named["default"]
        where = f"{where} (its 'default' template)"
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateSourceError(f"{where} must be a string, got {type(source).__name__}")
    _check_size(source, where)
    return ChatTemplateSource(source, where)


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} when the checkpoint has none)."""
    path = model_dir / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ChatTemplateSourceError(f"{TOKENIZER_CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ChatTemplateSourceError(f"{TOKENIZER_CONFIG_FILE} must hold a JSON object")
    return data


def _read_text(path: Path, where: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ChatTemplateSourceError(f"{where} is not UTF-8 text") from exc
    _check_size(text, where)
    return text


def _check_size(source: str, where: str) -> None:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateSourceError(
            f"{where} is {len(source)} characters; at most {MAX_TEMPLATE_CHARS} are allowed"
        )
