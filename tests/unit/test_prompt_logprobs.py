"""Prompt logprobs: every prompt token's log-probability given the tokens before it, scored in
the batched step, equal to a transformers (+ PEFT) forward pass of the same adapter (float32),
whatever shares the batch, however the prompt is chunked, cached or preempted."""

from __future__ import annotations

import pytest
import torch

from server.engine.errors import InvalidRequestError
from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.hf_reference import load_hf, next_token_logprobs
from tests.peft_reference import load_peft, save_peft_adapter
from tests.unit.test_no_host_sync import forbid_host_sync

TOL = 1e-4
PROMPTS = [[1, *range(10, 41)], [1, 250, 17, 17, 8, 99, 140, 64, 31], [1, 5, 9, 33, 70, 4]]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _scoring(k: int = 3, max_tokens: int = 2) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=k)


def _assert_matches(out, reference: torch.Tensor, prompt: list[int], k: int) -> None:  # type: ignore[no-untyped-def]
    scored = out.prompt_logprobs
    assert scored is not None and len(scored) == len(prompt)
    assert scored[0] is None  # the first token has nothing before it
    for j in range(1, len(prompt)):
        row, lp = reference[j - 1], scored[j]
        assert lp.token_id == prompt[j]
        assert lp.logprob == pytest.approx(row[prompt[j]].item(), abs=TOL)
        assert lp.rank == int((row > row[prompt[j]]).sum()) + 1
        values, ids = row.topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=TOL)


def test_base_model_prompt_logprobs_equal_transformers(tiny_model_dir, make_engine):
    path = tiny_model_dir("llama")
    engine, hf = make_engine(path), load_hf(path)
    outs = engine.generate(PROMPTS, _scoring())
    for prompt, out in zip(PROMPTS, outs, strict=True):
        _assert_matches(out, next_token_logprobs(hf, prompt), prompt, 3)


def test_adapter_prompt_logprobs_in_a_mixed_chunked_batch_equal_peft(
    tiny_model_dir, make_engine, tmp_path
):
    """Two adapters and the base score their prompts in 8-token chunks, beside rows that do not
    ask: the scores equal PEFT's, and the other rows' tokens equal their tokens alone."""
    base = tiny_model_dir("llama")
    registry = open_registry(tmp_path / "data", make_engine(base).config)
    dirs = {}
    for i, name in enumerate(["a", "b"]):
        dirs[name] = save_peft_adapter(base, tmp_path / name, seed=i + 1, **LORA)
        registry.register_dir(name, dirs[name])
    engine = make_engine(base, registry=registry, max_num_batched_tokens=8)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [engine.generate([p], plain, [a])[0].token_ids for p, a in [(PROMPTS[1], "b")]]

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    names = ["a", "b", None, "b"]
    params = [_scoring(2), plain, _scoring(0), _scoring(5)]
    outs = engine.generate(prompts, params, names)

    assert outs[1].prompt_logprobs is None and outs[1].token_ids == alone[0]
    _assert_matches(outs[2], next_token_logprobs(load_hf(base), PROMPTS[2]), PROMPTS[2], 0)
    for i, k in ((0, 2), (3, 5)):
        peft = load_peft(base, dirs[names[i]])
        _assert_matches(outs[i], next_token_logprobs(peft, prompts[i]), prompts[i], k)


def test_a_cached_prefix_is_scored_again(tiny_model_dir, make_engine):
    """The prefix cache never skips a position of a prompt being scored; what it stored is
    still used by requests that do not score."""
    path = tiny_model_dir("llama")
    engine = make_engine(path)
    prompt = [1, *range(10, 90)]  # two whole 32-token blocks and a part
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))

    [out] = engine.generate([prompt], _scoring())
    _assert_matches(out, next_token_logprobs(load_hf(path), prompt), prompt, 3)
    assert out.num_cached_tokens == 0
    [again] = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    assert again.num_cached_tokens > 0


def test_preempted_requests_keep_every_prompt_score_once(tiny_model_dir, make_engine):
    path = tiny_model_dir("llama")
    prompts = [[1, *range(10 + i, 40 + i)] for i in range(6)]
    small = make_engine(path, num_pages=8, max_model_len=128, max_num_batched_tokens=16)
    outs = small.generate(prompts, _scoring(1, max_tokens=40))

    assert small.scheduler.num_preemptions > 0
    hf = load_hf(path)
    for prompt, out in zip(prompts, outs, strict=True):
        _assert_matches(out, next_token_logprobs(hf, prompt), prompt, 1)


def test_a_request_asking_too_many_prompt_entries_is_refused(
    tiny_model_dir, make_engine, monkeypatch
):
    """The bound counts scored positions x (the token + its alternatives)."""
    monkeypatch.setattr("server.engine.prompt_logprobs.MAX_PROMPT_LOGPROB_ENTRIES", 100)
    engine = make_engine(tiny_model_dir("llama"))
    prompt = list(range(3, 14))  # 10 scored positions
    engine.requests.make(prompt, _scoring(9))  # 100 entries
    with pytest.raises(InvalidRequestError, match="at most 100") as info:
        engine.requests.make(prompt, _scoring(10))
    assert info.value.param == "prompt_logprobs"


def test_scoring_steps_never_sync_inside_the_forward(tiny_model_dir, make_engine, monkeypatch):
    run = ModelRunner.run
    guarded: list[int] = []

    def guarded_run(self, step):  # type: ignore[no-untyped-def]
        with forbid_host_sync():
            out = run(self, step)
        guarded.append(0 if step.prompt is None else step.prompt.idx.shape[0])
        return out

    monkeypatch.setattr(ModelRunner, "run", guarded_run)
    engine = make_engine(tiny_model_dir("llama"), max_num_batched_tokens=16, max_num_seqs=2)
    outs = engine.generate(PROMPTS, [_scoring(4), _scoring(0), _scoring(2)])

    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(outs, PROMPTS, strict=True))
    assert sum(guarded) == sum(len(p) - 1 for p in PROMPTS)
