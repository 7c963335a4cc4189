"""Prefix caching: cached KV blocks are reused only under the same adapter version, change no
token, and give way to running requests and needed adapters under one eviction policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.setup import open_registry
from server.memory.page_pool import KV, PageGeometry, PagePool
from server.memory.prefix_cache import PrefixCache, block_hash
from server.memory.reclaim import EvictionClock, PoolReclaimer
from tests.peft_reference import save_peft_adapter

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
ATTN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
MLP = dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])
SYSTEM = [1, *range(20, 120)]  # a shared 101-token "system prompt"


def _turn(i: int) -> list[int]:
    return [*SYSTEM, *range(130 + 3 * i, 136 + 3 * i)]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {
        "attn": save_peft_adapter(base, root / "attn", seed=1, **ATTN),
        "mlp": save_peft_adapter(base, root / "mlp", seed=2, **MLP),
        "attn2": save_peft_adapter(base, root / "attn2", seed=3, **ATTN),
    }


@pytest.fixture
def engines(tiny_model_dir, make_engine, adapter_dirs, tmp_path):
    """build(caching, arch="llama", **overrides): an engine with three adapters registered."""

    def build(caching: bool, arch: str = "llama", model_overrides=None, **overrides):  # type: ignore[no-untyped-def]
        base = tiny_model_dir(arch, **(model_overrides or {}))
        data = tmp_path / f"data-{len(list(tmp_path.iterdir()))}"
        config = make_engine(base, **overrides).config
        registry = open_registry(data, config)
        registry.register_dir("attn", adapter_dirs["attn"])
        registry.register_dir("mlp", adapter_dirs["mlp"])
        registry.register_dir("third", adapter_dirs["attn2"])
        return make_engine(base, registry=registry, enable_prefix_caching=caching, **overrides)

    return build


def _full_blocks_before_last(engine, prompt: list[int]) -> int:  # type: ignore[no-untyped-def]
    bs = engine.pool.geometry.block_size
    return (len(prompt) - 1) // bs * bs


def _texts(engine, prompts, adapters, params=GREEDY) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [o.token_ids for o in engine.generate(prompts, params, adapters)]


# ---- the hash chain -------------------------------------------------------------------------


def test_a_blocks_hash_covers_its_parent_adapter_rope_factor_and_tokens():
    tokens = list(range(16))
    root = b"\0" * 16
    h = block_hash(root, -1, 1.0, tokens)
    assert block_hash(root, -1, 1.0, list(tokens)) == h
    assert block_hash(root, 3, 1.0, tokens) != h
    assert block_hash(root, -1, 2.0, tokens) != h
    assert block_hash(root, -1, 1.0, [*tokens[:-1], 99]) != h
    assert block_hash(h, -1, 1.0, tokens) != h


# ---- the engine -----------------------------------------------------------------------------


def test_mixed_batches_sharing_a_prompt_give_each_adapter_its_own_text(engines):
    names = [None, "attn", "mlp"]
    prompts = [_turn(0)] * 3
    off = engines(False)
    expected = _texts(off, prompts, names)
    assert len({tuple(t) for t in expected}) == 3  # three different texts to tell apart

    on = engines(True)
    # First round: one batch, nothing cached yet.
    assert _texts(on, prompts, names) == expected
    assert on.prefix_cache.stats.hit_tokens == 0
    # Second round: each adapter finds its own prefix, and gives its own text again.
    assert _texts(on, prompts, names) == expected
    assert on.prefix_cache.stats.hit_tokens == 3 * _full_blocks_before_last(on, prompts[0])
    # New user turns after the shared system prompt, mixed again.
    turns = [_turn(i) for i in range(1, 7)]
    mixed = [None, "attn", "mlp", "mlp", None, "attn"]
    assert _texts(on, turns, mixed) == _texts(off, turns, mixed)


def test_a_prefix_cached_under_one_adapter_is_not_reused_by_another_or_the_base(engines):
    on, off = engines(True), engines(False)
    prompt = _turn(0)
    on.generate([prompt], GREEDY, ["attn"])
    for name in (None, "mlp"):
        hits = on.prefix_cache.stats.hit_tokens
        assert _texts(on, [prompt], [name]) == _texts(off, [prompt], [name])
        assert on.prefix_cache.stats.hit_tokens == hits
    out = on.generate([prompt], GREEDY, ["attn"])[0]
    assert out.num_cached_tokens == _full_blocks_before_last(on, prompt)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block(engines):
    on, off = engines(True), engines(False)
    bs = on.pool.geometry.block_size
    prompt = [1, *range(20, 20 + 4 * bs - 1)]  # exactly four blocks
    first = on.generate([prompt], GREEDY)[0]
    again = on.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 3 * bs
    assert first.token_ids == again.token_ids == _texts(off, [prompt], [None])[0]


def test_sampled_requests_with_a_seed_are_unchanged_by_caching(engines):
    on, off = engines(True), engines(False)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    prompts = [_turn(0), _turn(1), _turn(0)]
    names = ["attn", "attn", "mlp"]
    expected = _texts(off, prompts, names, params)
    on.generate(prompts, params, names)
    assert _texts(on, prompts, names, params) == expected
    assert on.prefix_cache.stats.hit_tokens > 0


def test_deleting_an_adapter_drops_its_cached_blocks(engines):
    on = engines(True)
    on.generate([_turn(0), _turn(0)], GREEDY, ["attn", "mlp"])
    attn = on.registry.get("attn").adapter_id
    cached = on.prefix_cache.num_cached_blocks
    assert cached > 0
    on.remove_adapter("attn")
    assert on.prefix_cache.stats.dropped_blocks == cached // 2
    assert on.prefix_cache.num_cached_blocks == cached // 2
    assert attn not in on.prefix_cache._by_adapter


def test_a_reload_in_place_never_reuses_the_old_versions_blocks(engines, adapter_dirs, tmp_path):
    on = engines(True)
    prompt = _turn(0)
    on.generate([prompt], GREEDY, ["attn"])
    _, old = on.registry.reload_dir("attn", adapter_dirs["attn2"])
    on.retire_adapter(old.adapter_id)
    assert old.adapter_id not in on.prefix_cache._by_adapter
    out = on.generate([prompt], GREEDY, ["attn"])[0]
    assert out.num_cached_tokens == 0

    fresh = engines(False)
    fresh.registry.reload_dir("attn", adapter_dirs["attn2"])
    assert out.token_ids == _texts(fresh, [prompt], ["attn"])[0]


def test_preemption_and_recompute_reuse_blocks_and_change_nothing(engines):
    prompts = [[1, *range(10 + i, 40 + i)] for i in range(6)]
    off = engines(False, num_pages=12, max_model_len=128)
    on = engines(True, num_pages=12, max_model_len=128)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    names = [None, "attn", "mlp"] * 2
    assert _texts(on, prompts, names, params) == _texts(off, prompts, names, params)
    assert on.scheduler.num_preemptions > 0
    assert on.kv.usage == 0


def test_under_pool_pressure_cached_prefixes_give_way_and_nothing_fails(engines):
    """A pool too small for every prefix at once: cached blocks are reclaimed for running
    requests and for adapters that must be loaded, and every request still completes."""
    kw = dict(num_pages=20, max_model_len=160, max_loras=2, max_num_seqs=4)
    off, on = engines(False, **kw), engines(True, **kw)
    prompts = [[1, *range(10 + 7 * i, 110 + 7 * i)] for i in range(8)]
    names = ["attn", "mlp", None, "third", "mlp", "attn", "third", None]
    expected = _texts(off, prompts, names)
    for _ in range(2):
        outs = on.generate(prompts, GREEDY, names)
        assert [o.token_ids for o in outs] == expected
        assert all(o.finish_reason == "length" for o in outs)
    assert on.prefix_cache.stats.reclaimed_blocks > 0
    assert on.adapter_cache.stats.evictions > 0
    assert on.pool.available(on.reclaimer) == on.pool.num_pages


def test_sliding_window_models_give_the_same_text_with_caching(engines):
    model = dict(sliding_window=24)
    on = engines(True, arch="mistral", model_overrides=model)
    off = engines(False, arch="mistral", model_overrides=model)
    prompts = [_turn(0), _turn(1), _turn(0)]
    names = [None, "attn", None]
    expected = _texts(off, prompts, names)
    assert _texts(on, prompts, names) == expected
    assert _texts(on, prompts, names) == expected
    assert on.prefix_cache.stats.hit_tokens > 0


# ---- the eviction policy --------------------------------------------------------------------


def _cache(num_pages: int = 8) -> tuple[PagePool, PrefixCache, EvictionClock]:
    import torch

    pool = PagePool(num_pages, PageGeometry(1, 1, 2, 4), torch.float32, torch.device("cpu"))
    clock = EvictionClock()
    return pool, PrefixCache(pool, clock), clock


def _filled(pool: PagePool, cache: PrefixCache, tokens: list[int], adapter_id: int = -1):  # type: ignore[no-untyped-def]
    seq = Sequence("r", tokens, GREEDY, adapter_id=adapter_id)
    seq.block_table = pool.allocate(len(tokens) // 4, KV)
    seq.num_computed_tokens = len(tokens)
    cache.insert(seq, 0, len(tokens) // 4)
    return seq


def test_a_prefix_loses_its_tail_first_and_keeps_its_head_findable():
    pool, cache, _ = _cache()
    seq = _filled(pool, cache, list(range(12)))  # three blocks
    pages = list(seq.block_table)
    assert cache.release(pages) == []
    assert cache.num_evictable == 3
    assert cache.evict_one() == 1
    again = Sequence("r2", [*range(12), 50], GREEDY)
    assert cache.acquire(again) == pages[:2]
    assert cache.num_evictable == 0


def test_the_cheaper_item_to_rebuild_goes_first_among_items_idle_since_the_same_time():
    pool, cache, clock = _cache()

    class Adapters:  # an idle adapter of two pages with a given rebuild cost
        def __init__(self, cost: float) -> None:
            self.key: tuple[float, int] | None = clock.stamp(cost)

        def reclaimable_pages(self) -> int:
            return 2 if self.key else 0

        def peek(self) -> tuple[float, int] | None:
            return self.key

        def evict_one(self) -> int:
            self.key = None
            return 2

    clock.prefill_seconds_per_token.add(1.0)  # a block costs 4 s per page to recompute
    cheap = Adapters(cost=0.5)
    seq = _filled(pool, cache, list(range(4)))
    cache.release(seq.block_table)
    dear = Adapters(cost=10.0)
    reclaimer = PoolReclaimer(clock, [cheap, cache, dear])
    assert reclaimer.reclaimable_pages() == 5
    assert reclaimer.reclaim(1) == 2 and cheap.key is None
    assert clock.value == 0.5
    assert reclaimer.reclaim(1) == 1 and cache.num_evictable == 0
    assert clock.value == 4.0
    # Touched now, the cheap item still goes before the dear one idle since the start...
    cheap.key = clock.stamp(0.5)
    assert reclaimer.reclaim(1) == 2 and cheap.key is None and dear.key is not None
    # ...but once evictions have raised the clock past the dear one's priority, it goes
    # before anything touched since, however cheap: nothing idle stays forever.
    clock.value = 12.0
    cheap.key = clock.stamp(0.5)
    assert reclaimer.reclaim(1) == 2 and dear.key is None and cheap.key is not None


def test_a_block_two_sequences_share_stays_theirs_when_its_adapter_version_is_dropped():
    pool, cache, _ = _cache()
    first = _filled(pool, cache, list(range(8)))  # two blocks, cached, held by `first`
    second = Sequence("r2", [*range(8), 50], GREEDY)
    shared = cache.acquire(second)
    assert shared == first.block_table  # both hold both blocks
    free_before = pool.num_free
    assert cache.drop_adapter(first.adapter_id) == 0  # held: nothing freed yet
    assert cache.acquire(Sequence("r3", [*range(8), 60], GREEDY)) == []  # not findable
    assert cache.release(first.block_table) == []  # `second` still reads these pages
    assert pool.num_free == free_before
    assert cache.release(shared) == shared  # the last holder: the caller frees them
    pool.free(shared, KV)
    assert pool.num_free == free_before + 2 and cache.num_evictable == 0
