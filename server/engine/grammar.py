"""Grammars that constrain a request's output (JSON schema, any JSON, regex, choice), on xgrammar.

A `Grammar` is what the request asked for; `GrammarCompiler` turns it into xgrammar's compiled
form once (cached by xgrammar, compiled off the event loop by the API), and each sequence gets
its own matcher, advanced token by token. Schemas are checked against the keywords xgrammar
enforces: xgrammar ignores the rest, and output it produced would then not validate.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import xgrammar as xgr

from server.engine.errors import InvalidRequestError
from server.engine.regex_bounds import check_count, check_regex_bounds
from server.model.tokenizer import Tokenizer

GrammarKind = Literal["json_object", "json_schema", "regex", "choice"]

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or choice list, serialized
MAX_CHOICES = 256
MAX_SCHEMA_DEPTH = 32
MAX_CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse (least recently used go)

# Keywords xgrammar turns into grammar rules: output of the compiled grammar validates them.
_ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
# Annotations: no effect on which values validate.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "strict",
    }
)
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> schema
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. `spec`: a JSON schema (dict), a regex (str) or a
    list of choices (strings); None for any JSON object."""

    kind: GrammarKind
    spec: Any = None
    # The form xgrammar compiled (set by GrammarCompiler.compile; not part of equality).
    compiled: Any = field(default=None, compare=False, repr=False)
    # The request field that asked for it, where not its kind's own (tools, LoRAX's).
    asked_by: str | None = field(default=None, compare=False)

    @property
    def param(self) -> str:
        """The request field that asked for it."""
        if self.asked_by is not None:
            return self.asked_by
        return "response_format" if self.kind.startswith("json") else f"guided_{self.kind}"

    def __post_init__(self) -> None:
        param = self.param
        if len(json.dumps(self.spec)) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(
                f"{param} is over {MAX_GRAMMAR_CHARS} characters when serialized", param
            )
        if self.kind == "json_schema":
            check_schema(self.spec)
        elif self.kind == "regex":
            if not isinstance(self.spec, str) or not self.spec:
                raise InvalidRequestError("guided_regex must be a non-empty string", param)
        elif self.kind == "choice":
            ok = isinstance(self.spec, list) and all(isinstance(c, str) and c for c in self.spec)
            if not ok or not 1 <= len(self.spec) <= MAX_CHOICES:
                raise InvalidRequestError(
                    f"guided_choice must be a list of 1 to {MAX_CHOICES} non-empty strings", param
                )


def check_schema(
    schema: Any,
    path: str = "response_format.json_schema.schema",
    param: str = "response_format",
    depth: int = 0,
) -> None:
    """Refuse a schema that uses a keyword the grammar cannot enforce, naming it and where."""
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(f"{path} nests more than {MAX_SCHEMA_DEPTH} schemas deep", param)
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{path} must be a JSON schema object", param)
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _ENFORCED:
            raise InvalidRequestError(
                f"JSON schema keyword {key!r} (at {path}) is not supported for structured output",
                param,
            )
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{path}.{key} must be an object", param)
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}", param, depth + 1)
        elif key in ("items", "additionalProperties"):
            check_schema(value, f"{path}.{key}", param, depth + 1)
        elif key in ("prefixItems", "anyOf"):
            if not isinstance(value, list) or (key == "anyOf" and not value):
                raise InvalidRequestError(f"{path}.{key} must be a non-empty array", param)
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{i}]", param, depth + 1)
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            unknown = [t for t in types if t not in _TYPES]
            if not types:
                raise InvalidRequestError(f"{path}.type must not be empty", param)
            if unknown:
                raise InvalidRequestError(
                    f"JSON schema type {unknown[0]!r} (at {path}) is not a JSON type",
                    param,
                )
        elif key == "pattern":
            _check_regex(value, f"{path}.pattern", param)
        elif key in _COUNTS:
            check_count(value, f"{path}.{key}", param)
    _check_required(schema, path, param)


def _check_required(schema: dict, path: str, param: str) -> None:
    """A required property the schema does not define could never be written: output would
    stop short of valid (extra properties are written only when additionalProperties says)."""
    required = schema.get("required")
    if not isinstance(required, list) or schema.get("additionalProperties") not in (None, False):
        return
    defined = schema.get("properties") or {}
    missing = [name for name in required if name not in defined]
    if missing:
        raise InvalidRequestError(
            f"{path}.required names {missing[0]!r}, which is not in its properties", param
        )


def _check_regex(pattern: Any, where: str, param: str) -> None:
    if not isinstance(pattern, str):
        raise InvalidRequestError(f"{where} must be a string", param)
    check_regex_bounds(pattern, where, param)
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # the bounds leave re.error
        raise InvalidRequestError(f"{where} is not a valid regex: {exc}", param) from exc
    # xgrammar skips what it cannot match exactly (lookarounds, backreferences) with a warning;
    # output would then not match the pattern.
    if re.search(r"\(\?<?[=!]|\\[1-9]|\(\?P=", pattern):
        raise InvalidRequestError(
            f"{where} uses a lookaround or backreference, which structured output cannot enforce",
            param,
        )


def _vocab_type(spec: dict) -> xgr.VocabType:
    decoder = json.dumps(spec.get("decoder"))
    if '"ByteLevel"' in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if spec.get("model", {}).get("byte_fallback") or '"ByteFallback"' in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


class GrammarCompiler:
    """Compiles Grammars for one tokenizer and vocabulary; safe to call from any thread.

    The tokenizer's tables (a pass over the whole vocabulary) are built on first use, so a
    server that never sees a constrained request never pays for them.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 2) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._max_threads = max_threads
        self._compiler: xgr.GrammarCompiler | None = None
        self._control_token_ids: list[int] = []
        self._utf8: Utf8Guard | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = self._tokenizer_info()
                # xgrammar's JSON strings admit raw control characters, which JSON forbids.
                self._control_token_ids = [
                    i for i, text in enumerate(info.decoded_vocab) if any(b < 0x20 for b in text)
                ]
                self._utf8 = Utf8Guard(info.decoded_vocab, self.vocab_size)
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=self._max_threads, cache_limit_bytes=MAX_CACHE_BYTES
                )
            return self._compiler

    @property
    def control_token_ids(self) -> list[int]:
        """Tokens holding a control character (below U+0020): never part of JSON output, since
        JSON grammars here write no newlines or tabs between values."""
        _ = self.compiler
        return self._control_token_ids

    @property
    def utf8(self) -> Utf8Guard:
        """Which tokens keep each sequence's output valid UTF-8 (see Utf8Guard)."""
        _ = self.compiler
        assert self._utf8 is not None
        return self._utf8

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        tok = self._tokenizer
        # Special tokens become empty strings, which xgrammar never allows inside the output:
        # their text would vanish when the output is decoded.
        vocab = [
            "" if i in tok.special_token_ids else (tok.id_to_token(i) or "")
            for i in range(self.vocab_size)
        ]
        return xgr.TokenizerInfo(
            vocab,
            _vocab_type(json.loads(tok.to_json())),
            vocab_size=self.vocab_size,
            stop_token_ids=sorted(tok.eos_token_ids),
            add_prefix_space=_adds_prefix_space(tok),
        )

    def compile(self, grammar: Grammar) -> Grammar:
        """The grammar with its compiled form; an InvalidRequestError names what failed."""
        if grammar.compiled is not None:
            return grammar
        compiler = self.compiler
        try:
            if grammar.kind == "json_object":  # any object, extra keys allowed, no idle spaces
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            elif grammar.kind == "json_schema":
                compiled = compiler.compile_json_schema(
                    json.dumps(grammar.spec), any_whitespace=False
                )
            elif grammar.kind == "regex":
                _check_regex(grammar.spec, "guided_regex", "guided_regex")
                compiled = compiler.compile_regex(grammar.spec)
            else:
                alternatives = "|".join(_quote_ebnf(c) for c in grammar.spec)
                compiled = compiler.compile_grammar(f"root ::= {alternatives}")
        except RuntimeError as exc:  # xgrammar's error for a grammar it cannot build
            # xgrammar's messages start "[time] source.cc:line: "; the rest is for the user.
            detail = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip().splitlines()[-1])
            raise InvalidRequestError(
                f"{grammar.param} cannot be compiled: {detail}", grammar.param
            ) from exc
        return replace(grammar, compiled=compiled)

    def matcher(self, grammar: Grammar) -> xgr.GrammarMatcher:
        """A fresh matcher for one sequence (compiling the grammar first if needed)."""
        return xgr.GrammarMatcher(self.compile(grammar).compiled)


# UTF-8 (RFC 3629) as a state machine over bytes. State 0: at a character boundary; any other
# state: inside a character, which needs more continuation bytes, the next in [lo, hi].
# _UTF8_NEED[state] = (lo, hi, state after a byte in range).
_UTF8_NEED = {
    1: (0x80, 0xBF, 0),  # one byte left
    2: (0x80, 0xBF, 1),  # two left
    3: (0xA0, 0xBF, 1),  # after E0: no overlong forms
    4: (0x80, 0x9F, 1),  # after ED: no surrogates (U+D800..U+DFFF)
    5: (0x80, 0xBF, 2),  # three left
    6: (0x90, 0xBF, 2),  # after F0: no overlong forms
    7: (0x80, 0x8F, 2),  # after F4: nothing past U+10FFFF
}
_UTF8_LEAD = {0xE0: 3, 0xED: 4, 0xF0: 6, 0xF4: 7}
UTF8_STATES = 8
_INVALID = 0xFF


def _utf8_byte_table() -> list[bytes]:
    """[state][byte] -> the next state, or _INVALID where that byte breaks UTF-8."""
    table = []
    for state in range(UTF8_STATES):
        row = bytearray([_INVALID] * 256)
        if state == 0:
            row[:0x80] = bytes(0x80)
            for b in range(0xC2, 0xF5):
                row[b] = _UTF8_LEAD.get(b, 1 if b < 0xE0 else 2 if b < 0xF0 else 5)
        else:
            lo, hi, after = _UTF8_NEED[state]
            row[lo : hi + 1] = bytes([after]) * (hi - lo + 1)
        table.append(bytes(row))
    return table


class Utf8Guard:
    """Keeps constrained output valid UTF-8, which xgrammar alone does not.

    xgrammar 0.2.8 reads a UTF-8 encoded surrogate (ED A0..BF xx, never valid UTF-8) as one
    character: JSON strings, regex dots and classes spanning U+D800..U+DFFF admit it, so a
    byte-level vocabulary can spell bytes that decode to three U+FFFD, past a string's
    maxLength. Each
    constrained sequence tracks where its output stands in a UTF-8 character (one of
    UTF8_STATES), and its grammar mask is narrowed to the tokens that keep it valid.
    """

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int) -> None:
        byte_table = _utf8_byte_table()
        num_words = (vocab_size + 31) // 32
        allowed = torch.zeros(UTF8_STATES, num_words * 32, dtype=torch.bool)
        # next_state[state][token]; a token that breaks UTF-8 from `state` is never allowed
        # there, and leads back to 0 should it be accepted anyway (a grammar dead end).
        next_state = [bytearray(vocab_size) for _ in range(UTF8_STATES)]
        for token, text in enumerate(decoded_vocab[:vocab_size]):
            if text.isascii():  # the common case: valid only at a character boundary
                allowed[0, token] = True
                if not text:  # special and padding tokens: no bytes, no change
                    allowed[:, token] = True
                    for state in range(1, UTF8_STATES):
                        next_state[state][token] = state
                continue
            for start in range(UTF8_STATES):
                state = start
                for b in text:
                    state = byte_table[state][b]
                    if state == _INVALID:
                        break
                else:
                    allowed[start, token] = True
                    next_state[start][token] = state
        self.next_state = [bytes(row) for row in next_state]
        # As xgrammar's token bitmasks: bit token % 32 of int32 word token // 32.
        bits = allowed.view(UTF8_STATES, num_words, 32).long() << torch.arange(32)
        words = bits.sum(dim=-1)
        self.allowed_bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _adds_prefix_space(tok: Tokenizer) -> bool:
    """Whether the tokenizer puts a space (SentencePiece's "▁") before the first word."""
    ids = tok.encode("a", add_special_tokens=False)
    return bool(ids) and (tok.id_to_token(ids[0]) or "").startswith("\u2581")


def _quote_ebnf(text: str) -> str:
    return json.dumps(text)  # EBNF string literals take JSON's escapes
