"""A GGUF file's byte-level BPE vocabulary as a `tokenizers` tokenizer (tokenizer.json).

GGUF stores the vocabulary as three arrays (tokens, their types, merges) plus the name of the
pre-tokenizer llama.cpp splits text with (`tokenizer.ggml.pre`). The tokens of a `gpt2`
vocabulary are already spelled in the byte-level alphabet, as tokenizer.json spells them, so
the conversion is the BPE model, llama.cpp's text split for that pre-tokenizer name, and the
control tokens as special added tokens. SentencePiece (`llama`) vocabularies are not handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's token types (llama_token_type): control tokens are special, user-defined ones
# are matched whole in text but are not special.
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# The text split of each pre-tokenizer name, as llama.cpp's llama-vocab.cpp applies it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's split is ByteLevel's own regex; `smollm` (and starcoder, refact) first cut every
# digit apart.
_GPT2 = ("gpt-2", "default")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_QWEN2 = ("qwen2",)
SUPPORTED_PRE_TOKENIZERS = _GPT2 + _DIGITS_THEN_GPT2 + _LLAMA3 + _QWEN2


class GgufTokenizerError(ValueError):
    """The GGUF's tokenizer metadata describes a tokenizer this conversion does not build."""


@dataclass(frozen=True)
class GgufVocabulary:
    """The tokenizer fields of a GGUF file (`tokenizer.ggml.*`)."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: Sequence[str]
    token_types: Sequence[int]
    merges: Sequence[str]
    bos_token_id: int | None = None
    add_bos_token: bool = False


def build_tokenizer(vocab: GgufVocabulary) -> Tokenizer:
    """The `tokenizers` tokenizer llama.cpp would tokenize with for this vocabulary."""
    if vocab.model != "gpt2":
        raise GgufTokenizerError(
            f"GGUF tokenizer.ggml.model {vocab.model!r} is not supported; supported: 'gpt2' "
            "(byte-level BPE)"
        )
    if vocab.pre not in SUPPORTED_PRE_TOKENIZERS:
        raise GgufTokenizerError(
            f"GGUF tokenizer.ggml.pre {vocab.pre!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    if len(vocab.token_types) not in (0, len(vocab.tokens)):
        raise GgufTokenizerError(
            f"GGUF tokenizer.ggml.token_type has {len(vocab.token_types)} entries for "
            f"{len(vocab.tokens)} tokens"
        )
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    merges = [_merge_pair(m) for m in vocab.merges]
    tok = Tokenizer(
        models.BPE(vocab=ids, merges=merges, ignore_merges=vocab.pre in _LLAMA3, fuse_unk=False)
    )
    tok.pre_tokenizer = _pre_tokenizer(vocab.pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(vocab)
    types = vocab.token_types or [0] * len(vocab.tokens)
    added = [
        AddedToken(token, special=kind == TOKEN_CONTROL, normalized=False)
        for token, kind in zip(vocab.tokens, types, strict=True)
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    return tok


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise GgufTokenizerError(f"GGUF tokenizer.ggml.merges holds a malformed merge {merge!r}")
    return left, right


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level_regex
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_regex]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(vocab: GgufVocabulary) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if not vocab.add_bos_token or vocab.bos_token_id is None:
        return byte_level
    bos = vocab.tokens[vocab.bos_token_id]
    prepend = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_token_id)]
    )
    return processors.Sequence([byte_level, prepend])
