"""Decode CUDA graphs: the bucket and padding logic (CPU), capture and replay (GPU only)."""

from __future__ import annotations

import pytest
import torch

from server.engine.cuda_graphs import DecodePadding, batch_buckets, bucket_for
from server.engine.sampling_params import SamplingParams
from server.engine.step_inputs import StepBuffers


def test_buckets_are_powers_of_two_up_to_max_num_seqs():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]


def test_a_batch_takes_the_smallest_bucket_that_holds_it():
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 3, 8, 9, 33, 48)] == [1, 4, 8, 16, 48, 48]
    assert bucket_for(49, buckets) is None


def test_padding_rows_decode_nothing_and_write_only_the_scratch_page():
    buffers = StepBuffers(max_tokens=16, max_seqs=8, max_blocks=4, device=torch.device("cpu"))
    buffers.tokens.fill_(7)
    buffers.seqs.fill_(7)
    buffers.sample_idx.fill_(15)  # stale indices from an earlier, larger step

    DecodePadding(num_seqs=3, bucket=8, scratch_page=5).fill(buffers)

    pad = buffers.tokens[:, 3:8]
    assert pad[StepBuffers.SLOT_PAGES].eq(5).all() and pad[StepBuffers.SLOT_OFFSETS].eq(0).all()
    assert pad[StepBuffers.INPUT_IDS].eq(0).all() and pad[StepBuffers.POSITIONS].eq(0).all()
    assert buffers.seqs[StepBuffers.Q_LENS, 3:8].eq(0).all()
    assert buffers.seqs[StepBuffers.CTX_LENS, 3:8].eq(0).all()
    assert buffers.sample_idx[3:8].eq(0).all()
    assert buffers.tokens[:, :3].eq(7).all() and buffers.sample_idx[:3].eq(15).all()


def test_decode_steps_are_marked_for_replay_and_others_are_not(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir("llama"))
    engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=3, temperature=0))
    engine.add_request([1, 5], SamplingParams(max_tokens=3, temperature=0))
    sched = engine.scheduler.schedule()
    assert engine.runner.prepare(sched.scheduled).num_decode_only is None  # prefill
    engine.scheduler.advance(sched)
    for s in sched.scheduled:
        s.seq.append_token(9)
    sched = engine.scheduler.schedule()
    assert engine.runner.prepare(sched.scheduled).num_decode_only == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_gives_the_tokens_of_eager_decoding(tiny_model_dir, make_engine):
    prompts = [[1, *range(10 + i, 20 + 3 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        engine = make_engine(
            tiny_model_dir("llama"),
            device="cuda",
            dtype="float16",
            kernel_backend="triton",
            enforce_eager=eager,
        )
        assert (engine.runner.graphs is None) == eager
        outs[eager] = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs[False] == outs[True]
