"""The metrics routers read: per-adapter residency, the cache-config info gauge, bounded
per-adapter request counters and the opt-in vLLM names, over a real engine on the tiny model."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest

from adapters import AdapterWeights, write_adapter
from adapters.format import lora_config_dict
from server.config import ConfigError, ServerConfig
from server.engine.llm_engine import LLMEngine
from server.engine.observe import adapter_levels, engine_facts, snapshot
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from server.metrics import OTHER_ADAPTERS, Metrics
from server.metrics_vllm import VLLM_NAMES
from server.model.config import ModelConfig
from tests.integration.live_server import Metrics as Scrape

GREEDY = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
NUM_ADAPTERS = 5


@pytest.fixture
def engine(tiny_model_dir, make_engine, tmp_path) -> LLMEngine:  # type: ignore[no-untyped-def]
    """The tiny model with NUM_ADAPTERS adapters a0.. registered and none loaded yet."""
    base = tiny_model_dir("llama")
    cfg = ModelConfig.from_dir(base)
    gen = torch.Generator().manual_seed(0)
    registry = open_registry(tmp_path / "data", make_engine(base, max_lora_rank=8).config)
    for i in range(NUM_ADAPTERS):
        fan_in, fan_out = cfg.linear_shapes()["q_proj"]
        lora = {
            (layer, "q_proj"): (torch.randn(2, fan_in, generator=gen), torch.randn(fan_out, 2))
            for layer in range(cfg.num_layers)
        }
        path = tmp_path / f"a{i}"
        write_adapter(path, lora_config_dict(2, 4.0, ("q_proj",)), AdapterWeights(lora=lora))
        registry.register_dir(f"a{i}", path)
    return make_engine(base, registry=registry, max_lora_rank=8)


def observe_scrape(metrics: Metrics, engine: LLMEngine) -> None:
    """What a scrape does (server/api/routes/ops.py), on this thread."""
    now = snapshot(engine, engine_facts(engine))
    metrics.observe_scrape(now, adapter_levels(engine) if metrics.wants_levels(now) else None)


def scrape(metrics: Metrics) -> Scrape:
    return Scrape(generate_latest(metrics.registry).decode())


def residency(metrics: Metrics) -> dict[str, str]:
    return {
        s["adapter"]: s["level"] for s in scrape(metrics).labels("loraplex_lora_adapter_residency")
    }


def test_residency_names_each_adapters_level(engine: LLMEngine) -> None:
    engine.generate([[1, 7, 3]], GREEDY, ["a1"])
    metrics = Metrics("m")
    observe_scrape(metrics, engine)
    levels = residency(metrics)
    assert levels["a1"] == "gpu"
    assert set(levels) == {f"a{i}" for i in range(NUM_ADAPTERS)}
    assert set(levels.values()) <= {"gpu", "cpu", "disk"}
    assert all(level != "gpu" for name, level in levels.items() if name != "a1")


def test_residency_follows_an_eviction_without_stale_series(engine: LLMEngine) -> None:
    engine.generate([[1, 7, 3]], GREEDY, ["a2"])
    metrics = Metrics("m")
    observe_scrape(metrics, engine)
    assert residency(metrics)["a2"] == "gpu"
    engine.remove_adapter("a2")
    observe_scrape(metrics, engine)
    assert "a2" not in residency(metrics)
    assert len(scrape(metrics).labels("loraplex_lora_adapter_residency")) == NUM_ADAPTERS - 1


def test_residency_series_are_bounded_with_device_adapters_first(engine: LLMEngine) -> None:
    engine.generate([[1, 7, 3]], GREEDY, ["a4"])
    metrics = Metrics("m", max_adapters=2)
    observe_scrape(metrics, engine)
    levels = residency(metrics)
    assert len(levels) == 2
    assert levels["a4"] == "gpu"


def test_request_counters_past_the_bound_go_under_other(engine: LLMEngine) -> None:
    metrics = Metrics("m", max_adapters=2)
    for name in ("a0", "a1", "a2", "a3", "a0"):
        engine.generate([[1, 7, 3]], GREEDY, [name])
        metrics.observe_step(engine.take_stats(), snapshot(engine, engine_facts(engine)))
    s = scrape(metrics)
    counts = {
        labels["adapter"]: s.value("loraplex_adapter_requests_total", **labels)
        for labels in s.labels("loraplex_adapter_requests_total")
    }
    assert counts == {"a0": 2, "a1": 1, OTHER_ADAPTERS: 2}


def test_no_per_adapter_series_with_a_bound_of_zero(engine: LLMEngine) -> None:
    metrics = Metrics("m", max_adapters=0)
    engine.generate([[1, 7, 3]], GREEDY, ["a0"])
    metrics.observe_step(engine.take_stats(), snapshot(engine, engine_facts(engine)))
    observe_scrape(metrics, engine)
    s = scrape(metrics)
    assert s.labels("loraplex_lora_adapter_residency") == []
    assert [x["adapter"] for x in s.labels("loraplex_adapter_requests_total")] == [OTHER_ADAPTERS]


def test_cache_config_info_describes_the_pool(engine: LLMEngine) -> None:
    metrics = Metrics("m")
    observe_scrape(metrics, engine)
    (labels,) = scrape(metrics).labels("loraplex_cache_config_info")
    assert int(labels["block_size"]) == engine.pool.geometry.block_size
    assert int(labels["num_gpu_blocks"]) == engine.pool.num_pages
    assert int(labels["page_bytes"]) == engine.pool.page_bytes
    assert labels["cache_dtype"] == "float32"
    assert int(labels["max_loras"]) == engine.config.max_loras
    assert int(labels["max_lora_rank"]) == 8


def test_vllm_names_repeat_the_router_metrics_with_the_same_values(engine: LLMEngine) -> None:
    metrics = Metrics("m", vllm_names=True)
    engine.generate([[1, 7, 3]], GREEDY, ["a0"])
    metrics.observe_step(engine.take_stats(), snapshot(engine, engine_facts(engine)))
    observe_scrape(metrics, engine)
    s = scrape(metrics)
    for ours, theirs in VLLM_NAMES.items():
        for name in theirs:
            assert name in s.families, name
            assert s.families[name].type == s.families[f"loraplex_{ours}"].type
    assert s.value("vllm:generation_tokens_total", model_name="m") == 2
    assert s.value("vllm:generation_tokens_total", model_name="m") == s.value(
        "loraplex_generation_tokens_total", model_name="m"
    )
    assert s.value("vllm:request_prompt_tokens_count", model_name="m") == 1
    assert s.labels("vllm:lora_requests_info") == s.labels("loraplex_lora_requests_info")
    assert s.labels("vllm:cache_config_info") == s.labels("loraplex_cache_config_info")


def test_vllm_names_are_off_by_default(engine: LLMEngine) -> None:
    metrics = Metrics("m")
    observe_scrape(metrics, engine)
    assert all(name.startswith("loraplex_") for name in scrape(metrics).families)


def test_a_negative_adapter_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="--metrics-max-adapters"):
        ServerConfig(metrics_max_adapters=-1)
