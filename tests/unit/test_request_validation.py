"""Bad requests are refused with a message naming the problem, before anything is queued."""

from __future__ import annotations

import pytest

from server.engine.errors import InvalidRequestError
from server.engine.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_model_dir, make_engine):  # type: ignore[no-untyped-def]
    return make_engine(tiny_model_dir("llama"), max_model_len=64)


def _refused(engine, prompt, param: str, match: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match=match) as info:
        engine.add_request(prompt, SamplingParams(**kwargs))
    assert info.value.param == param
    assert engine.num_requests == 0
    assert not engine.has_unfinished_requests()


def test_prompt_longer_than_max_model_len_is_refused(engine):
    _refused(engine, list(range(3, 80)), "prompt", "maximum context length is 64")


def test_prompt_plus_max_tokens_over_max_model_len_is_refused(engine):
    _refused(engine, list(range(3, 40)), "max_tokens", "max_tokens asks for 30", max_tokens=30)


def test_empty_prompt_is_refused(engine):
    _refused(engine, [], "prompt", "prompt is empty")


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    _refused(engine, [1, 5, 100000], "prompt", "in \\[0, 320\\)")


@pytest.mark.parametrize("value", [0, -3])
def test_max_tokens_below_one_is_refused(value):
    with pytest.raises(InvalidRequestError, match="max_tokens must be >= 1") as info:
        SamplingParams(max_tokens=value)
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_top_p_outside_zero_one_is_refused(value):
    with pytest.raises(InvalidRequestError, match=r"top_p must be in \(0, 1\]") as info:
        SamplingParams(top_p=value)
    assert info.value.param == "top_p"


@pytest.mark.parametrize("value", [2**63, 13818370331251289620480, -(2**63) - 1])
def test_top_k_beyond_64_bits_is_refused(value):
    with pytest.raises(InvalidRequestError, match=r"top_k must be below 2\*\*63") as info:
        SamplingParams(top_k=value)
    assert info.value.param == "top_k"


@pytest.mark.parametrize("stop", [42, [1, 2], {"a": 1}, ["ok", 3]])
def test_stop_of_unknown_type_is_refused(stop):
    with pytest.raises(InvalidRequestError, match="stop must be a string or a list of strings"):
        SamplingParams(stop=stop)


def test_negative_temperature_is_refused():
    with pytest.raises(InvalidRequestError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)


def test_logprobs_above_the_limit_is_refused():
    with pytest.raises(InvalidRequestError, match="logprobs must be in"):
        SamplingParams(logprobs=21)


def test_a_single_stop_string_is_accepted_as_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]


# ---- bounds on what the step thread checks per token -----------------------------------------


def test_more_than_16_stop_strings_are_refused():
    with pytest.raises(
        InvalidRequestError, match="stop may hold at most 16 strings, got 17"
    ) as info:
        SamplingParams(stop=[f"s{i}" for i in range(17)])
    assert info.value.param == "stop"


def test_a_stop_string_over_256_characters_is_refused():
    with pytest.raises(InvalidRequestError, match="at most 256 characters, got one of 257") as info:
        SamplingParams(stop=["ok", "x" * 257])
    assert info.value.param == "stop"


def test_more_than_64_stop_token_ids_are_refused():
    with pytest.raises(InvalidRequestError, match="at most 64 ids, got 65") as info:
        SamplingParams(stop_token_ids=list(range(65)))
    assert info.value.param == "stop_token_ids"


def test_stop_bounds_are_inclusive():
    params = SamplingParams(stop=["x" * 256] * 16, stop_token_ids=list(range(64)))
    assert len(params.stop) == 16 and len(params.stop_token_ids) == 64
