"""With too few pages for every request at once, requests are preempted and recomputed."""

from __future__ import annotations

from server.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_small_pool_preempts_and_every_request_matches_its_solo_run(tiny_model_dir, make_engine):
    path = tiny_model_dir("llama")
    prompts = [[1, *range(10 + i, 40 + i)] for i in range(6)]
    solo = make_engine(path)
    expected = [solo.generate([p], GREEDY)[0].token_ids for p in prompts]

    # 16-token blocks: together the requests need 30 pages; 8 exist.
    small = make_engine(path, num_pages=8, max_model_len=128)
    outs = small.generate(prompts, GREEDY)

    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert small.pool.available(small.reclaimer) == small.pool.num_pages
    assert small.kv.usage == 0
