"""Sampling, penalties, stop conditions and logprobs, through the engine."""

from __future__ import annotations

import math

import pytest

from server.engine.sampling_params import SamplingParams

PROMPT = [1, 5, 9, 33, 70]


@pytest.fixture
def engine(tiny_model_dir, make_engine):  # type: ignore[no-untyped-def]
    return make_engine(tiny_model_dir("llama"))


def _one(engine, prompt=PROMPT, **kwargs):  # type: ignore[no-untyped-def]
    return engine.generate([prompt], SamplingParams(**kwargs))[0]


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True)
    mixed = engine.generate([[1, 2, 3], PROMPT, [1, 77]], [others, params, others])
    assert mixed[1].token_ids == alone


def test_different_seeds_give_different_samples(engine):
    a = _one(engine, max_tokens=20, temperature=1.5, seed=1, ignore_eos=True).token_ids
    b = _one(engine, max_tokens=20, temperature=1.5, seed=2, ignore_eos=True).token_ids
    assert a != b


def test_top_k_one_is_greedy(engine):
    greedy = _one(engine, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    top1 = _one(engine, max_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert top1.token_ids == greedy


def test_tiny_top_p_is_greedy(engine):
    greedy = _one(engine, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    nucleus = _one(engine, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)
    assert nucleus.token_ids == greedy


def test_max_tokens_ends_with_length(engine):
    out = _one(engine, max_tokens=7, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 7


def test_stop_token_id_ends_with_stop_and_reports_it(engine):
    greedy = _one(engine, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    target = greedy[4]
    out = _one(engine, max_tokens=12, temperature=0, stop_token_ids=[target], ignore_eos=True)
    assert out.finish_reason == "stop"
    assert out.stop_reason == target
    assert out.token_ids == greedy[: greedy.index(target) + 1]


def test_eos_stops_unless_ignore_eos(engine):
    eos = next(iter(engine.tokenizer.eos_token_ids))
    greedy = _one(engine, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    # Make the greedy path hit EOS: penalize nothing, but treat its 3rd token as EOS.
    engine.tokenizer.eos_token_ids = frozenset({eos, greedy[2]})
    stopped = _one(engine, max_tokens=12, temperature=0)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy[: greedy.index(greedy[2]) + 1]
    assert _one(engine, max_tokens=12, temperature=0, ignore_eos=True).token_ids == greedy


def test_stop_string_cuts_the_text_before_it(engine):
    full = _one(engine, max_tokens=16, temperature=0, ignore_eos=True).text
    stop = full[5:8]
    out = _one(engine, max_tokens=16, temperature=0, stop=[stop], ignore_eos=True)
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == full[: full.index(stop)]


def test_streamed_text_equals_the_final_text_with_stop_strings(engine):
    full = _one(engine, max_tokens=16, temperature=0, ignore_eos=True).text
    stop = full[6:9]
    engine.add_request(PROMPT, SamplingParams(max_tokens=16, temperature=0, stop=stop))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert "".join(pieces) == final.text == full[: full.index(stop)]


def test_logprobs_report_the_sampled_token_and_top_alternatives(engine):
    out = _one(engine, max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    assert len(out.logprobs) == 5
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy picks the most likely
        assert math.isclose(lp.logprob, lp.top[0][1], rel_tol=1e-6)
        assert lp.logprob <= 0


def test_repetition_penalty_discourages_repeats(engine):
    plain = _one(engine, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    penalized = _one(
        engine, max_tokens=40, temperature=0, repetition_penalty=5.0, ignore_eos=True
    ).token_ids
    assert len(set(penalized)) > len(set(plain))


def test_frequency_penalty_discourages_repeats(engine):
    plain = _one(engine, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    penalized = _one(
        engine, max_tokens=40, temperature=0, frequency_penalty=2.0, ignore_eos=True
    ).token_ids
    assert len(set(penalized)) >= len(set(plain))
    assert penalized != plain
