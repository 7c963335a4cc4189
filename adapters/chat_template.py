"""An adapter's own chat template: read from the tokenizer files it ships, checked against the
base model's vocabulary (an adapter may change how chats are laid out, never the tokens).

The files, all optional: tokenizer_config.json (its chat_template and special tokens),
chat_template.jinja (newer transformers save the template there), tokenizer.json,
special_tokens_map.json and added_tokens.json. Any token they name must be the base's token
with the base's id; anything else is refused at registration.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from adapters.errors import AdapterError, short_repr

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_FILES = (
    TOKENIZER_CONFIG_FILE,
    TEMPLATE_FILE,
    TOKENIZER_FILE,
    SPECIAL_TOKENS_FILE,
    ADDED_TOKENS_FILE,
)
# Real templates are 1-15 KB (Llama 3.1's with tools is about 5 KB).
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
_MAX_NAMED = 3  # tokens quoted in an error message


# A chat renders in well under a millisecond per kilobyte; a template that loops for longer
# than this is stopped, so it cannot hold the tokenizer threads every request shares.
RENDER_SECONDS = 2.0
# Largest string or list a template may build with * (a chat is bounded by the context length).
MAX_REPEAT_ITEMS = 1 << 20
TEMPLATE_FILENAME = "<template>"  # what jinja names the code it compiles from a string


class TemplateTimeout(jinja2.TemplateError):
    """A template ran past RENDER_SECONDS."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a bound on what * and ** can build (jinja bounds only range())."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > 64:
                raise jinja2.TemplateError(f"exponent {right} is too large for a chat template")
            return super().call_binop(context, operator, left, right)
        for seq, times in ((left, right), (right, left)):
            repeats = isinstance(seq, (str, list, tuple)) and isinstance(times, int)
            if repeats and len(seq) * times > MAX_REPEAT_ITEMS:
                raise jinja2.TemplateError(
                    f"a chat template may not build a sequence of more than "
                    f"{MAX_REPEAT_ITEMS} items"
                )
        return super().call_binop(context, operator, left, right)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in the sandbox every template runs in (the base's too)."""
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_bounded(
    template: jinja2.Template, seconds: float = RENDER_SECONDS, **context: Any
) -> str:
    """template.render(**context), stopped with TemplateTimeout after `seconds`.

    A trace function on this thread watches only the template's own frames (the code jinja
    compiled from it) and checks the clock at each line they run; loops in a template are
    template code, so none escapes. Other frames are not traced and run at full speed.
    """
    deadline = time.monotonic() + seconds

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template ran for more than {seconds:g} s")
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return template.render(**context)
    finally:
        sys.settrace(previous)


@dataclass(frozen=True)
class BaseVocabulary:
    """The base model's tokens (added ones included) by text, and its bos/eos."""

    tokens: Mapping[str, int]
    bos_token: str | None = None
    eos_token: str | None = None


@dataclass(frozen=True)
class ChatTemplate:
    """An adapter's chat template and the bos/eos texts it renders with (None: the base's)."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None


def read_chat_template(
    adapter_dir: Path, vocabulary: BaseVocabulary | None, check: bool = True
) -> ChatTemplate | None:
    """The template an adapter directory ships, or None; check: validate every tokenizer file
    against the base vocabulary and compile the template (registration does; a re-read of a
    stored adapter need not)."""
    config = _json_object(adapter_dir, TOKENIZER_CONFIG_FILE)
    source = _template_source(adapter_dir, config)
    if check:
        _check_tokenizer_files(adapter_dir, config, vocabulary)
        if source is not None:
            _compile(source)
    if source is None:
        return None
    return ChatTemplate(
        source,
        _token_text(config.get("bos_token"), "bos_token"),
        _token_text(config.get("eos_token"), "eos_token"),
    )


def _template_source(adapter_dir: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = adapter_dir / TEMPLATE_FILE
    if jinja_file.is_file():  # transformers reads it in preference to the config's
        try:
            source: Any = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterError(f"{TEMPLATE_FILE} is not UTF-8 text") from exc
        where = TEMPLATE_FILE
    else:
        source = config.get("chat_template")
        where = f"{TOKENIZER_CONFIG_FILE}'s chat_template"
        if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if "default" not in named:
                raise AdapterError(f"{where} is a list of named templates without 'default'")
            source = named["default"]
    if source is None:
        return None
    if not isinstance(source, str):
        raise AdapterError(f"{where} must be a string")
    if len(source) > MAX_CHAT_TEMPLATE_CHARS:
        raise AdapterError(
            f"{where} is {len(source)} characters; at most {MAX_CHAT_TEMPLATE_CHARS} are allowed"
        )
    return source


def _compile(source: str) -> None:
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as exc:
        message = f"chat_template does not compile: line {exc.lineno}: {exc.message}"
        raise AdapterError(message) from exc
    except (jinja2.TemplateError, RecursionError) as exc:
        raise AdapterError(f"chat_template does not compile: {exc}") from exc


def _check_tokenizer_files(
    adapter_dir: Path, config: Mapping[str, Any], vocabulary: BaseVocabulary | None
) -> None:
    """Refuse any token (special, added, or in a whole vocabulary) that is not the base's."""
    special = _json_object(adapter_dir, SPECIAL_TOKENS_FILE)
    added = _json_object(adapter_dir, ADDED_TOKENS_FILE)
    named: dict[str, int | None] = {}  # token text -> the id the adapter gives it, if any
    for where, fields in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_FILE, special)):
        for key in _SPECIAL_KEYS:
            if (text := _token_text(fields.get(key), f"{where}'s {key}")) is not None:
                named.setdefault(text, None)
        extra = fields.get("additional_special_tokens") or []
        if not isinstance(extra, list):
            raise AdapterError(f"{where}'s additional_special_tokens must be a list")
        for value in extra:
            text = _token_text(value, f"{where}'s additional_special_tokens")
            if text is not None:
                named.setdefault(text, None)
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise AdapterError(f"{TOKENIZER_CONFIG_FILE}'s added_tokens_decoder must be an object")
    for key, value in decoder.items():
        text = _token_text(value, f"{TOKENIZER_CONFIG_FILE}'s added_tokens_decoder")
        if text is not None:
            named[text] = _token_id(key, f"{TOKENIZER_CONFIG_FILE}'s added_tokens_decoder")
    for text, value in added.items():
        named[text] = _token_id(value, ADDED_TOKENS_FILE)
    has_vocabulary = (adapter_dir / TOKENIZER_FILE).is_file()
    if not named and not has_vocabulary:
        return
    if vocabulary is None:
        raise AdapterError(
            "the adapter ships tokenizer files but the base model's vocabulary is unknown here"
        )
    if has_vocabulary:
        _compare(_vocabulary_of(adapter_dir / TOKENIZER_FILE), vocabulary.tokens)
    _compare(named, vocabulary.tokens, whole=False)


def _compare(
    adapter: Mapping[str, int | None], base: Mapping[str, int], whole: bool = True
) -> None:
    """Refuse tokens the base lacks or numbers otherwise; whole: also tokens the adapter lacks."""
    extra = sorted(t for t in adapter if t not in base)
    if extra:
        raise AdapterError(
            f"the adapter's tokenizer adds {len(extra)} token{'s' if len(extra) > 1 else ''} "
            f"the base model lacks ({_named(extra)}); an adapter must use the base's vocabulary"
        )
    moved = sorted(t for t, i in adapter.items() if i is not None and base[t] != i)
    if moved:
        raise AdapterError(
            f"the adapter's tokenizer gives {len(moved)} token{'s' if len(moved) > 1 else ''} "
            f"other ids than the base model does ({_named(moved)}); an adapter must use the "
            "base's vocabulary"
        )
    missing = len(base) - len(adapter) if whole else 0
    if missing:
        raise AdapterError(
            f"the adapter's tokenizer lacks {missing} of the base model's {len(base)} tokens; "
            "an adapter must use the base's vocabulary"
        )


def _vocabulary_of(path: Path) -> dict[str, int | None]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # the tokenizers crate raises plain Exceptions for bad files
        raise AdapterError(f"{TOKENIZER_FILE} is not a valid tokenizer file") from exc
    return dict(tok.get_vocab(with_added_tokens=True))


def _named(tokens: list[str]) -> str:
    shown = ", ".join(short_repr(t) for t in tokens[:_MAX_NAMED])
    return shown + (f" and {len(tokens) - _MAX_NAMED} more" if len(tokens) > _MAX_NAMED else "")


def _json_object(adapter_dir: Path, file: str) -> dict[str, Any]:
    path = adapter_dir / file
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{file} must hold a JSON object")
    return data


def _token_text(value: Any, where: str) -> str | None:
    # Special tokens are stored as strings or as serialized AddedToken objects.
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise AdapterError(f"{where} must be a token's text, got {short_repr(value)}")


def _token_id(value: Any, where: str) -> int:
    try:
        token_id = int(value)
    except (TypeError, ValueError):
        token_id = -1
    if isinstance(value, bool) or token_id < 0:
        raise AdapterError(
            f"{where} must map tokens to ids (integers >= 0), got {short_repr(value)}"
        )
    return token_id
