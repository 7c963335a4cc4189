"""Grammar masks, logit_bias and min_tokens in the engine: per row, in shared batches."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from server.engine.errors import InvalidRequestError
from server.engine.grammar import Grammar, Utf8Guard, check_schema
from server.engine.logits_processors import LogitsState, accept_token, apply_logits_processors
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9},
        "name": {"type": "string", "maxLength": 4},
        "kind": {"anyOf": [{"const": "x"}, {"type": "null"}]},
    },
    "required": ["id", "name", "kind"],
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    model = tiny_model_dir("llama")
    config = EngineConfig(model=str(model), quantize="none", dtype="float32", pool_mb=16)
    return LLMEngine(config)


def test_constrained_rows_validate_and_unconstrained_rows_are_unchanged(engine) -> None:  # type: ignore[no-untyped-def]
    free = SamplingParams(max_tokens=12, temperature=0.8, seed=1)
    alone = engine.generate(["The quick"], free)[0].text
    shaped = [
        SamplingParams(max_tokens=80, temperature=t, seed=s, grammar=Grammar("json_schema", SCHEMA))
        for t, s in ((0.0, None), (1.0, 2), (1.0, 3))
    ]
    outs = engine.generate(["The quick", "If the", "Return a", "The quick"], [*shaped, free])
    for out in outs[:3]:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert outs[3].text == alone


SHORT_NAME = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}},
    "required": ["name"],
}


def test_sampled_constrained_output_is_valid_utf8_and_validates_whatever_the_seed(engine) -> None:  # type: ignore[no-untyped-def]
    """Sampling pushed towards the byte ED (which starts U+D000..U+DFFF, surrogates included)
    on a byte-level vocabulary: every output decodes as UTF-8 (no U+FFFD), parses and keeps
    to maxLength."""
    tok = engine.tokenizer
    ed = [_byte_level_bytes(tok.id_to_token(t)) for t in range(tok.vocab_size)].index(b"\xed")
    grammar = Grammar("json_schema", SHORT_NAME)
    params = [
        SamplingParams(
            max_tokens=40, temperature=1.0, seed=seed, logit_bias={ed: 6.0}, grammar=grammar
        )
        for seed in range(32)
    ]
    outs = engine.generate(["Return a"] * len(params), params)
    for out in outs:
        assert "\ufffd" not in out.text, out.text
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SHORT_NAME)


def test_utf8_guard_allows_only_tokens_that_keep_the_output_valid() -> None:
    # Tokens as bytes: xgrammar reads ED A0..BF xx (a surrogate) as a character; UTF-8 does not.
    vocab = [
        b"",
        b"a",
        b"\xed",
        b"\xa0\x80",
        b"\x9f\xbf",
        b"\xc3",
        b"\xa9",
        b"\xed\xa0\x80",
        b"\xf4\x90",
    ]
    guard = Utf8Guard(vocab, len(vocab))

    def allowed(state: int) -> list[int]:
        words = guard.allowed_bitmask[state].tolist()
        return [t for t in range(len(vocab)) if words[t // 32] >> (t % 32) & 1]

    assert allowed(0) == [0, 1, 2, 5]  # no lone continuation, surrogate or lead past U+10FFFF
    after_ed = guard.next_state[0][2]
    assert allowed(after_ed) == [0, 4]  # ED 9F BF is U+D7FF; ED A0 80 would be U+D800
    assert guard.next_state[after_ed][4] == 0 and guard.next_state[after_ed][0] == after_ed
    assert allowed(guard.next_state[0][5]) == [0, 6]  # C3 A9 is "é"


def test_a_surrogate_is_never_allowed_inside_a_json_string(engine) -> None:  # type: ignore[no-untyped-def]
    """The root of U+FFFD in structured output: after an ED byte xgrammar allows A0..BF."""
    tok = engine.tokenizer
    vocab = [_byte_level_bytes(tok.id_to_token(t)) for t in range(tok.vocab_size)]
    params = SamplingParams(grammar=Grammar("json_schema", {"type": "string"}))
    seq = Sequence("0", [1, 2], params)
    eos = sorted(tok.eos_token_ids)
    seq.logits = LogitsState.build(params, engine.grammars, eos, torch.device("cpu"))
    for text in (b'"', b"\xed"):
        accept_token(seq, vocab.index(text))
    logits = torch.zeros(1, engine.model_config.vocab_size)
    apply_logits_processors(logits, [seq])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert {vocab[t][0] for t in allowed} == set(range(0x80, 0xA0))


def _byte_level_bytes(text: str) -> bytes:
    """The bytes a byte-level BPE token stands for (GPT-2's byte-to-character map, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return bytes(to_byte[c] for c in text) if all(c in to_byte for c in text) else b""


def test_regex_and_choice_grammars_match_whole_output(engine) -> None:  # type: ignore[no-untyped-def]
    params = [
        SamplingParams(max_tokens=30, temperature=1.0, seed=s, grammar=g)
        for s, g in enumerate(
            [Grammar("regex", r"(yes|no)-[0-9]{2}"), Grammar("choice", ["alpha", 'b"eta'])]
        )
    ]
    regex, choice = engine.generate(["The quick", "The quick"], params)
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", regex.text)
    assert choice.text in ("alpha", 'b"eta')


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "not"),
        ({"oneOf": [{"type": "string"}]}, "oneOf"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"$defs": {"x": {"patternProperties": {}}}}, "patternProperties"),
    ],
)
def test_schema_keywords_the_grammar_cannot_enforce_are_refused_by_name(schema, keyword) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        check_schema(schema)
    assert f"'{keyword}'" in info.value.message and info.value.param == "response_format"


def test_a_lookaround_pattern_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="lookaround"):
        check_schema({"type": "string", "pattern": "a(?=b)"})


def test_schema_nesting_is_bounded() -> None:
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequestError, match="nests more than"):
        check_schema(schema)


def test_logit_bias_and_min_tokens_edit_only_their_rows(engine) -> None:  # type: ignore[no-untyped-def]
    eos = sorted(engine.tokenizer.eos_token_ids)
    params = [
        SamplingParams(logit_bias={5: 100.0, 6: -100.0}),
        SamplingParams(),
        SamplingParams(min_tokens=3, stop_token_ids=[7]),
    ]
    seqs = [Sequence(str(i), [1, 2], p) for i, p in enumerate(params)]
    for seq in seqs:
        seq.logits = LogitsState.build(seq.params, engine.grammars, eos, torch.device("cpu"))
    logits = torch.zeros(3, engine.model_config.vocab_size)
    apply_logits_processors(logits, seqs)
    assert (logits[0, 5], logits[0, 6]) == (100.0, -100.0) and logits[0, 7] == 0
    assert torch.equal(logits[1], torch.zeros_like(logits[1]))
    assert torch.isinf(logits[2, [*eos, 7]]).all() and logits[2, 8] == 0


def test_invalid_logits_options_are_refused(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidRequestError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=1, grammar=Grammar("json_object"))
    with pytest.raises(InvalidRequestError, match="token ids in"):
        engine.requests.make([1, 2], SamplingParams(logit_bias={10**6: 1.0}))


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"anyOf": []}, "anyOf must be a non-empty array"),
        ({"type": []}, "type must not be empty"),
        ({"type": "object", "required": ["b"], "properties": {}}, "names 'b'"),
    ],
)
def test_schemas_no_output_could_satisfy_are_refused(schema, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=fragment):
        check_schema(schema)


def test_a_grammar_dead_end_lets_the_row_end_instead_of_breaking_the_step(engine) -> None:  # type: ignore[no-untyped-def]
    eos = sorted(engine.tokenizer.eos_token_ids)
    params = SamplingParams(grammar=Grammar("choice", ["x"]))
    seq = Sequence("0", [1, 2], params)
    seq.logits = LogitsState.build(params, engine.grammars, eos, torch.device("cpu"))
    assert seq.logits is not None and seq.logits.matcher is not None
    for token in [*engine.tokenizer.encode("x", add_special_tokens=False), eos[0]]:
        assert seq.logits.matcher.accept_token(token)
    logits = torch.zeros(1, engine.model_config.vocab_size)
    apply_logits_processors(logits, [seq])  # the finished grammar allows nothing more
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == eos
