"""One request's numbers never reach another's: stale or non-finite values left in reused pages
are never read, and a request whose adapter produces inf or NaN fails alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.sampler import NON_FINITE, sample
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.setup import open_registry
from server.memory.kv_cache import KVCacheManager
from server.memory.page_pool import ADAPTER, PageGeometry, PagePool
from tests.peft_reference import save_peft_adapter

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
ATTN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
MLP = dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])
# Prompts of different lengths, so the padded attention layout has short rows and padding
# blocks; with 40 new tokens every sequence crosses a block boundary.
PROMPTS = [[1, *range(10 + i, 16 + 9 * i)] for i in range(6)]
ADAPTERS = [None, "attn", "mlp", None, "attn", "mlp"]


def _huge(src: Path, out: Path) -> Path:
    """A copy of a PEFT adapter at the edge of what registration accepts: every weight 6e4
    (float16 range) and scaling 1000 (the bound is 1024). Each is finite, but through an MLP
    (gate and up deltas multiplied, then down's) the product overflows float32 to inf, then
    NaN downstream."""
    out.mkdir()
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file(
        {k: torch.full_like(v, 6e4) for k, v in state.items()}, out / "adapter_model.safetensors"
    )
    config = json.loads((src / "adapter_config.json").read_text())
    config["lora_alpha"] = config["r"] * 1000
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("numeric-adapters")
    dirs = {
        "attn": save_peft_adapter(base, root / "attn", seed=1, **ATTN),
        "mlp": save_peft_adapter(base, root / "mlp", seed=2, **MLP),
    }
    dirs["huge"] = _huge(dirs["mlp"], root / "huge")
    return dirs


@pytest.fixture
def engine_with_adapters(tiny_model_dir, make_engine, adapter_dirs, tmp_path):
    """Builds engines over the tiny llama with every adapter registered."""
    base = tiny_model_dir("llama")

    def build(**overrides):  # type: ignore[no-untyped-def]
        data = tmp_path / f"data-{len(list(tmp_path.iterdir()))}"
        engine = make_engine(base, **overrides)
        registry = open_registry(data, engine.config)
        for name, path in adapter_dirs.items():
            registry.register_dir(name, path)
        return make_engine(base, registry=registry, **overrides)

    return build


def _solo_runs(engine, prompts, adapters) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [
        engine.generate([p], GREEDY, [a])[0].token_ids
        for p, a in zip(prompts, adapters, strict=True)
    ]


def test_nan_filled_pool_gives_the_outputs_of_a_clean_pool(engine_with_adapters):
    clean = engine_with_adapters()
    expected = _solo_runs(clean, PROMPTS, ADAPTERS)

    # Few pages: requests are preempted and pages pass between KV blocks and adapters.
    poisoned = engine_with_adapters(num_pages=10, max_model_len=128)
    poisoned.pool.buffer.fill_(float("nan"))
    outs = poisoned.generate(PROMPTS, GREEDY, ADAPTERS)

    assert poisoned.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected


def test_padded_attention_never_reads_a_page_the_sequence_does_not_own(engine_with_adapters):
    clean = engine_with_adapters()
    expected = _solo_runs(clean, PROMPTS[:3], ADAPTERS[:3])

    poisoned = engine_with_adapters()
    poisoned.pool.buffer.fill_(float("nan"))
    # Held by someone else and never cleared: what a batch's padding blocks used to point at.
    held = poisoned.pool.allocate(2, ADAPTER)
    outs = poisoned.generate(PROMPTS[:3], GREEDY, ADAPTERS[:3])

    assert held == [0, 1]
    assert [o.token_ids for o in outs] == expected


def test_kv_blocks_are_handed_out_zeroed():
    pool = PagePool(4, PageGeometry(2, 2, 8, 4), torch.float32, torch.device("cpu"))
    pool.buffer.fill_(float("nan"))
    kv = KVCacheManager(pool)
    seq = Sequence("r", [1, 2, 3], GREEDY)

    kv.allocate(seq, 3 * kv.block_size)

    assert len(seq.block_table) == 3
    assert pool.buffer[seq.block_table].eq(0).all()
    assert pool.buffer[pool.num_pages - 1].isnan().all()  # pages not handed out: untouched


def test_sampler_flags_rows_with_non_finite_logits():
    logits = torch.randn(4, 10)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    params = [GREEDY, GREEDY, SamplingParams(temperature=0.8, seed=1, logprobs=2), GREEDY]
    seqs = [Sequence(str(i), [1], p) for i, p in enumerate(params)]
    seqs[2].seed = 1

    results = sample(logits.clone(), seqs)

    assert [t == NON_FINITE for t, _ in results] == [False, True, True, False]
    assert results[0][0] == int(logits[0].argmax())
    assert results[2][1] is None


def test_sampler_tells_huge_finite_logits_from_non_finite_ones():
    """The check is one float64 sum per row: logits near float32's largest, whose float32 sum
    would overflow, are still finite; a lone -inf is not."""
    logits = torch.full((3, 1000), 3.0e38)
    logits[0, 5] = 3.3e38
    logits[1, 7] = float("-inf")
    logits[2, 9] = float("nan")
    seqs = [Sequence(str(i), [1], GREEDY) for i in range(3)]

    results = sample(logits.clone(), seqs)

    assert [t == NON_FINITE for t, _ in results] == [False, True, True]
    assert results[0][0] == 5


def test_adapter_overflowing_to_inf_fails_alone_and_later_requests_are_unaffected(
    engine_with_adapters,
):
    solo = engine_with_adapters()
    expected = _solo_runs(solo, PROMPTS, ADAPTERS)

    engine = engine_with_adapters()
    for name in {*ADAPTERS, "huge"} - {None}:  # in host memory: all admitted at the first step
        engine.registry.warm(engine.registry.get(name).adapter_id)
    ids = [
        engine.add_request(p, GREEDY, adapter_name=a)
        for p, a in zip(PROMPTS, ADAPTERS, strict=True)
    ]
    # A long prompt: its NaN keys and values reach past where the others' keys end.
    bad_id = engine.add_request(list(range(3, 100)), GREEDY, adapter_name="huge")
    first = {o.request_id: o for o in engine.step()}
    final: dict = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)

    assert set(first) == {*ids, bad_id}  # one batch
    bad = first[bad_id]
    assert bad.finished and bad.finish_reason == "error"
    assert bad.error == "adapter 'huge' produced non-finite values (inf or NaN) for this request"
    assert bad.token_ids == []
    assert [final[i].token_ids for i in ids] == expected
    # What it held went back; its pages, full of NaN, now serve other requests.
    assert engine.pool.available(engine.reclaimer) == engine.pool.num_pages
    later = engine.generate(PROMPTS, GREEDY, ADAPTERS)
    assert [o.token_ids for o in later] == expected


def test_an_idle_adapters_pages_are_no_room_for_the_kv_of_the_request_that_pins_it(
    engine_with_adapters,
):
    engine = engine_with_adapters(num_pages=10, max_model_len=128)
    engine.generate([PROMPTS[0]], GREEDY, ["mlp"])  # now resident, idle, reclaimable
    cache = engine.adapter_cache
    seq = engine.requests.make(PROMPTS[1], GREEDY, adapter_name="mlp")
    # Room for KV blocks other than the adapter's own pages: free and cached-idle pages.
    free = engine.pool.available(engine.reclaimer) - cache.reclaimable_pages()

    assert cache.reclaimable_pages() > 0
    assert cache.can_admit(seq.adapter_id, free)
    assert not cache.can_admit(seq.adapter_id, free + 1)
