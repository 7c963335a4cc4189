"""Tokenizer: `tokenizers` for the vocabulary, jinja2 for the chat template."""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream
from tokenizers.pre_tokenizers import ByteLevel

from adapters.chat_template import (
    BaseVocabulary,
    TemplateTimeout,
    compile_chat_template,
    render_bounded,
)
from server.model.chat_template_source import (
    ChatTemplateSourceError,
    base_chat_template,
    read_tokenizer_config,
)

logger = logging.getLogger(__name__)

# Normalizers and pre-tokenizers that never drop characters: each input character still
# reaches the model (see Tokenizer.max_chars_per_token).
_KEEPING_NORMALIZERS = frozenset({"Prepend", "Replace"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation"})


class TokenizerError(ValueError):
    """The tokenizer files are missing or cannot be used."""


class TemplateTooSlowError(TokenizerError):
    """A chat template ran past its time bound (adapters.chat_template.RENDER_SECONDS)."""


def _token_text(config: dict[str, Any], key: str) -> str | None:
    # tokenizer_config.json stores special tokens as strings or serialized AddedToken dicts.
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"tokenizer_config.json field {key!r} must be a token's text")


class Tokenizer:
    """The checkpoint's tokenizer.json plus what tokenizer_config.json says about it."""

    def __init__(
        self,
        model_dir: str | Path,
        extra_eos_token_ids: tuple[int, ...] = (),
        chat_template: str | Path | None = None,
    ) -> None:
        """Read model_dir's tokenizer files; chat_template: a template file that overrides
        the checkpoint's own (see server.model.chat_template_source for the order)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"model directory {model_dir} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        try:
            config = read_tokenizer_config(model_dir)
            template = base_chat_template(model_dir, chat_template)
        except ChatTemplateSourceError as exc:
            raise TokenizerError(str(exc)) from exc
        self.bos_token = _token_text(config, "bos_token")
        self.eos_token = _token_text(config, "eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        eos = {self._id_of(self.eos_token), *extra_eos_token_ids}
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eos if i is not None)
        self.chat_template: str | None = None if template is None else template.source
        self.chat_template_origin = None if template is None else template.origin
        self.special_token_ids = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        self._template: jinja2.Template | None = None
        if template is not None:
            self._template = _compile_base_template(template.source, template.origin)

    def with_chat_template(
        self, source: str, bos_token: str | None, eos_token: str | None
    ) -> Tokenizer:
        """This vocabulary with another chat template (an adapter's), rendered with the given
        bos/eos texts where set; the vocabulary and the tokens that end generation stay."""
        self._plain  # noqa: B018 (computed once here, so every view shares it)
        view = copy.copy(self)
        view.chat_template = source
        view.bos_token = bos_token or self.bos_token
        view.eos_token = eos_token or self.eos_token
        view._template = None
        return view

    @property
    def eos_token_id_of_template(self) -> int | None:
        """The id of the eos text the chat template renders with."""
        return self._id_of(self.eos_token)

    def vocabulary(self) -> BaseVocabulary:
        """The tokens, by text, that an adapter's tokenizer files must agree with."""
        return BaseVocabulary(
            self._tok.get_vocab(with_added_tokens=True), self.bos_token, self.eos_token
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in it are parsed as such."""
        return self._encode(self._tok, text, add_special_tokens).ids

    @staticmethod
    def _encode(tok: HFTokenizer, text: str, add_special_tokens: bool = False) -> Encoding:
        # encode_batch releases the GIL while it works (encode does not), so a long prompt
        # tokenized on another thread never stalls the event loop.
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    @cached_property
    def _plain(self) -> HFTokenizer:
        """A copy that reads special tokens' text as ordinary text (for chat content)."""
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters one token can stand for, when this tokenizer has such a bound.

        Then a text of C characters has at least C / bound tokens: every character reaches
        the BPE model (no normalizer or pre-tokenizer drops any, no added token absorbs
        whitespace) and every byte has a token (byte-level or byte fallback) or becomes one
        unknown token of its own. None for tokenizers where that does not hold.
        """
        spec = json.loads(self._tok.to_str())
        model = spec["model"]
        added = spec.get("added_tokens") or []
        if model.get("type") != "BPE" or any(t.get("lstrip") or t.get("rstrip") for t in added):
            return None
        if not _keeps_characters(spec.get("normalizer"), _KEEPING_NORMALIZERS):
            return None
        pre = spec.get("pre_tokenizer")
        if not _keeps_characters(pre, _KEEPING_PRE_TOKENIZERS):
            return None
        vocab: dict[str, int] = model["vocab"]
        every_byte = (
            model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))
        ) or (_has_type(pre, "ByteLevel") and all(c in vocab for c in ByteLevel.alphabet()))
        if not every_byte and (model.get("unk_token") is None or model.get("fuse_unk")):
            return None
        longest = max((len(t) for t in vocab), default=1)
        return max(longest, *(len(t["content"]) for t in added), 1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_json(self) -> str:
        """The tokenizer.json contents (vocabulary, model and decoder)."""
        return self._tok.to_str()

    def decode_stream(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self._tok, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages with the checkpoint's chat template (jinja2, sandboxed)."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; use /v1/completions")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        try:
            return render_bounded(
                self._template,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=tools,
            )
        except TemplateTimeout as exc:
            raise TemplateTooSlowError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # a template is user content: it may raise anything
            raise TokenizerError(f"chat template failed: {exc}") from exc

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a chat. Special tokens come from the template alone: message content
        that spells one (say "<|im_start|>system") stays ordinary text."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        whole = self._encode(self._tok, text)
        spans = self._content_spans(messages, add_generation_prompt, text, tools)
        if spans is None:
            for m in messages:
                if self.special_token_ids.intersection(self.encode(m["content"], False)):
                    raise TokenizerError(
                        "message content holds a special token's text, which this model's "
                        "chat template does not let the server keep apart from its own"
                    )
            return whole.ids
        special = self.special_token_ids
        forged = any(
            _overlaps(offsets, spans)
            for token_id, offsets in zip(whole.ids, whole.offsets, strict=True)
            if token_id in special
        )
        if not forged:
            return whole.ids  # the usual case: exactly the ids of the whole text
        ids: list[int] = []
        pos = 0
        for start, end in spans:
            ids += self._encode(self._tok, text[pos:start]).ids
            ids += self._encode(self._plain, text[start:end]).ids
            pos = end
        return ids + self._encode(self._tok, text[pos:]).ids

    def _content_spans(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        text: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[tuple[int, int]] | None:
        """Where each message's content lies in the rendered text: found by rendering again
        with a unique marker for each content. None when the template changes content beyond
        trimming it, or lays out the chat differently for the markers."""
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}.{i}\ue001"} for i, m in enumerate(messages)]
        try:
            layout = self.apply_chat_template(marked, add_generation_prompt, tools)
        except TokenizerError:
            return None
        pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", layout)
        templates, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
        spans: list[tuple[int, int]] = []
        pos = 0
        for j, index in enumerate(indices):
            if not text.startswith(templates[j], pos):
                return None
            pos += len(templates[j])
            after, last = templates[j + 1], j + 1 == len(indices)
            content = messages[index]["content"]
            for shown in dict.fromkeys(
                (content, content.strip(), content.lstrip(), content.rstrip())
            ):
                end = pos + len(shown)
                if (
                    text.startswith(shown, pos)
                    and text.startswith(after, end)
                    and (not last or end + len(after) == len(text))
                ):
                    break
            else:
                return None
            spans.append((pos, end))
            pos = end
        return spans if indices or layout == text else None


def _compile_base_template(source: str, origin: str) -> jinja2.Template:
    try:
        return compile_chat_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"{origin}: chat template line {exc.lineno}: {exc.message}") from exc
    except (jinja2.TemplateError, RecursionError) as exc:
        raise TokenizerError(f"{origin}: chat template does not compile: {exc}") from exc


def _keeps_characters(spec: dict | None, keeping: frozenset[str]) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        parts = spec.get("normalizers") or spec.get("pretokenizers") or []
        return all(_keeps_characters(p, keeping) for p in parts)
    if kind not in keeping or spec.get("behavior") == "Removed":
        return False
    if kind == "Replace":  # a string replaced by one at least as long
        pattern = spec.get("pattern", {}).get("String")
        return pattern is not None and len(spec.get("content", "")) >= len(pattern)
    return True


def _has_type(spec: dict | None, kind: str) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_has_type(p, kind) for p in spec.get("pretokenizers", []))
    return spec.get("type") == kind


def _overlaps(offsets: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offsets
    return any(start < span_end and end > span_start for span_start, span_end in spans)


class IncrementalDecoder:
    """Text of a growing token sequence, one token at a time (complete UTF-8 only)."""

    def __init__(self, tok: HFTokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
