"""Engine start-up: on CUDA it runs a request through itself before serving (kernel compiles,
decode graph captures), which needs everything else built first."""

from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine


def test_the_start_up_warm_up_runs_once_the_engine_is_whole(
    tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LLMEngine, "warms_up", property(lambda self: True))  # CUDA's path, here
    config = EngineConfig(
        model=str(tiny_model_dir("llama")), quantize="none", dtype="float32", pool_mb=16
    )
    engine = LLMEngine(config)
    assert not engine.has_unfinished_requests() and engine.num_requests == 0
