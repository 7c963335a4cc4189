"""The vectorized sampler: counter-based draws, incremental penalty counts, the logits-processor
hook, one copy to the host per call, and no NaN from any temperature or finite logits."""

from __future__ import annotations

import pytest
import torch

from server.engine.logits_processors import LogitsState
from server.engine.sampler import Sampler, exponential_noise, sample
from server.engine.sampling_params import MIN_TEMPERATURE, SamplingParams
from server.engine.sequence import Sequence

VOCAB = 50


def _seq(rid: str, params: SamplingParams, seed: int = 0, tokens: list[int] | None = None):
    seq = Sequence(rid, [1, 2, 3], params)
    seq.seed = seed
    for t in tokens or []:
        seq.append_token(t)
    return seq


def test_a_seeded_row_draws_the_same_token_whatever_shares_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7)
    logits = torch.randn(1, VOCAB)
    alone = sample(logits.clone(), [_seq("a", params, seed=7)])
    others = [_seq(str(i), SamplingParams(temperature=0.5 + i / 10), seed=i) for i in range(5)]
    crowd = torch.cat([torch.randn(2, VOCAB), logits, torch.randn(3, VOCAB)])
    together = sample(crowd, [*others[:2], _seq("a", params, seed=7), *others[2:]])
    assert together[2][0] == alone[0][0]


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    seqs = [_seq(str(i), SamplingParams(temperature=1.0), seed=i) for i in range(4000)]
    tokens = torch.tensor([t for t, _ in sample(logits, seqs)])
    freq = torch.bincount(tokens, minlength=4).float() / len(seqs)
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_noise_depends_on_seed_and_position_only():
    seeds = torch.tensor([5, 5, 6], dtype=torch.int64)
    positions = torch.tensor([10, 11, 10], dtype=torch.int64)
    noise = exponential_noise(seeds, positions, VOCAB)
    again = exponential_noise(seeds[[2, 0]], positions[[2, 0]], VOCAB)
    assert torch.equal(again, noise[[2, 0]])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert (noise > 0).all()


def test_incremental_penalty_counts_equal_counts_rebuilt_from_the_tokens():
    params = SamplingParams(
        temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7
    )
    sampler = Sampler(4, torch.device("cpu"))
    seq = _seq("p", params)
    torch.manual_seed(0)
    for _ in range(12):
        logits = torch.randn(1, VOCAB)
        fresh = sample(logits.clone(), [seq])[0][0]  # counts rebuilt from the sequence
        kept = sampler(logits.clone(), [seq])[0][0]  # counts kept across steps
        assert kept == fresh
        seq.append_token(kept)
    sampler.release(seq)


def test_a_rows_logits_state_changes_its_row_only():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 10.0
    seqs = [_seq(str(i), SamplingParams(temperature=0)) for i in range(2)]
    # What logit_bias {7: -100} builds: the processors run after the penalties, per row.
    seqs[0].logits = LogitsState(bias_ids=torch.tensor([7]), bias_values=torch.tensor([-100.0]))
    tokens = [t for t, _ in sample(logits, seqs)]
    assert tokens[0] != 7 and tokens[1] == 7


def test_one_copy_to_the_host_per_call(monkeypatch):
    copies: list[str] = []
    cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        copies.append("cpu")
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    params = [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=0.8, top_k=5, seed=1, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, top_p=0.5, frequency_penalty=0.3, logprobs=0),
    ]
    seqs = [_seq(str(i), p, seed=i, tokens=[4, 4]) for i, p in enumerate(params)]
    results = sample(torch.randn(3, VOCAB), seqs)
    assert copies == ["cpu"]
    assert len(results[0][1].top) == 2 and results[2][1].top == []
    assert results[1][1] is None


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_temperatures_below_the_minimum_are_greedy() -> None:
    for temperature in (0.0, 1e-45, MIN_TEMPERATURE / 2):
        assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1e-45, 1e-30, MIN_TEMPERATURE / 2])
def test_a_tiny_temperature_draws_the_argmax_in_any_logits_dtype(
    dtype: torch.dtype, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, VOCAB, generator=gen) * 4).to(dtype)
    seqs = [_seq(str(i), SamplingParams(temperature=temperature), seed=i) for i in range(8)]
    tokens = [t for t, _ in sample(logits.clone(), seqs)]
    assert tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 1e-3, 0.5, 2.0])
def test_no_temperature_makes_nan_of_the_largest_finite_logits(
    dtype: torch.dtype, temperature: float
) -> None:
    # Divided by the temperature unshifted, these overflowed to inf: a NaN distribution, and
    # token 0 drawn whatever the logits.
    top = torch.finfo(dtype).max
    logits = torch.tensor([[-top, top / 2, top, 0.0] + [-top] * (VOCAB - 4)], dtype=dtype)
    params = SamplingParams(temperature=temperature, seed=1)
    for top_k in (0, 3):
        params.top_k = top_k
        [(token, _)] = sample(logits.clone(), [_seq("a", params, seed=1)])
        assert token == 2
