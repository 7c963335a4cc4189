"""Thousands of adapters through a device pool that holds a few: loads, evictions, exact output."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterWeights, write_adapter
from adapters.format import lora_config_dict
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import peft_greedy

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
NUM_ADAPTERS = 1000


def _write_adapters(root, cfg, count):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        rank = (1, 2, 4, 8)[i % 4]
        modules = (("q_proj", "v_proj"), ("o_proj", "down_proj"))[i % 2]
        lora = {}
        for layer in range(cfg.num_layers):
            for m in modules:
                fan_in, fan_out = cfg.linear_shapes()[m]
                lora[layer, m] = (
                    torch.randn(rank, fan_in, generator=gen) * 0.3,
                    torch.randn(fan_out, rank, generator=gen) * 0.3,
                )
        path = root / f"a{i}"
        write_adapter(path, lora_config_dict(rank, 2.0 * rank, modules), AdapterWeights(lora=lora))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def thousand(tiny_model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    from server.model.config import ModelConfig

    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("many")
    return base, _write_adapters(root, ModelConfig.from_dir(base), NUM_ADAPTERS)


def _serve_all(make_engine, base, paths, data_dir, **engine_args):  # type: ignore[no-untyped-def]
    engine = make_engine(base, max_lora_rank=8, **engine_args)
    registry = open_registry(data_dir, engine.config)
    for i, path in enumerate(paths):
        registry.register_dir(f"a{i}", path)
    engine = make_engine(base, registry=registry, max_lora_rank=8, **engine_args)
    prompts = [[1, 7 + i % 50, 3, 11 + i % 30] for i in range(len(paths))]
    names = [f"a{i}" for i in range(len(paths))]
    return engine, prompts, engine.generate(prompts, GREEDY, names)


@pytest.mark.slow
def test_thousand_adapters_through_a_pool_of_a_few(thousand, make_engine, tmp_path):
    base, paths = thousand
    engine, prompts, outs = _serve_all(
        make_engine, base, paths, tmp_path / "small", num_pages=24, max_loras=4, max_num_seqs=8
    )
    stats = engine.adapter_cache.stats
    assert len(engine.registry) == NUM_ADAPTERS
    assert engine.adapter_cache.num_resident <= 4
    assert stats.loads >= NUM_ADAPTERS
    assert stats.evictions >= NUM_ADAPTERS - 4
    assert engine.pool.used_by_kind["kv"] == engine.kv.num_cached_idle  # nothing in use

    # Every output equals a run where every adapter stays resident; a sample equals PEFT.
    _, _, roomy = _serve_all(
        make_engine, base, paths, tmp_path / "roomy", max_loras=NUM_ADAPTERS, max_num_seqs=64
    )
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    for i in (0, 1, 2, 3, 501, 998):
        assert outs[i].token_ids == peft_greedy(base, paths[i], prompts[i], GREEDY.max_tokens)


def test_a_request_that_could_never_fit_beside_its_adapter_is_refused(
    tiny_model_dir, make_engine, tmp_path
):  # type: ignore[no-untyped-def]
    from server.engine.errors import InvalidRequestError
    from server.model.config import ModelConfig

    base = tiny_model_dir("llama")
    (path,) = _write_adapters(tmp_path / "one", ModelConfig.from_dir(base), 1)
    probe = make_engine(base, max_lora_rank=8, max_model_len=64)
    # Room for one sequence's KV at max_model_len, and nothing more.
    pages = probe.kv.max_blocks_per_seq(64)
    engine, _, _ = _serve_all(
        make_engine, base, [path], tmp_path / "data", num_pages=pages, max_model_len=64
    )
    adapter_pages = engine.adapter_cache.pages_needed(engine.registry.get("a0").adapter_id)
    assert adapter_pages >= 1
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="page pool has") as info:
        engine.add_request([1, 7, 3, 11], long, adapter_name="a0")
    assert info.value.param == "max_tokens"
    assert engine.num_requests == 0
    # The base model needs no adapter pages: the same request fits.
    assert engine.generate([[1, 7, 3, 11]], long)[0].finish_reason == "length"
