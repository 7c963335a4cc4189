"""The page pool's share of the GPU: what is left after weights and reserves."""

from __future__ import annotations

import pytest

from server.config import ConfigError, EngineConfig
from server.engine.memory_budget import activation_bytes, split_memory
from server.model.config import ModelConfig

GIB = 2**30


def test_pool_gets_the_budget_less_what_is_in_use_and_the_reserves():
    split = split_memory(
        total=80 * GIB, free=74 * GIB, utilization=0.9, activations=2 * GIB, training=10 * GIB
    )
    assert split.budget == int(72 * GIB)
    assert split.in_use == 6 * GIB
    assert split.pool == 72 * GIB - 6 * GIB - 2 * GIB - 10 * GIB
    assert "page pool" in split.describe()


def test_pool_is_empty_rather_than_negative_when_reserves_exceed_the_budget():
    split = split_memory(total=8 * GIB, free=2 * GIB, utilization=0.5, activations=GIB, training=0)
    assert split.pool == 0


def test_activation_reserve_grows_with_the_step_budget(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir("llama"))
    small = activation_bytes(cfg, 256, 8, 16, 2)
    large = activation_bytes(cfg, 4096, 8, 16, 2)
    assert 0 < small < large


def test_utilization_outside_zero_one_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--gpu-memory-utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
