"""On a GPU: a step's forward never syncs (torch.cuda.set_sync_debug_mode), and decode steps
replayed from CUDA graphs, with adapters, give the tokens of eager decoding. Skipped without
CUDA (tests/unit/test_no_host_sync.py and test_decode_graphs.py cover the CPU side)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.peft_reference import save_peft_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU = dict(device="cuda", dtype="float16", kernel_backend="triton", lora_backend="triton")
PROMPTS = [[1, *range(10 + i, 20 + 3 * i)] for i in range(6)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture
def engine_with_adapters(tiny_model_dir, make_engine, tmp_path):
    base = tiny_model_dir("llama")

    builds = itertools.count()

    def build(**overrides):  # type: ignore[no-untyped-def]
        data = tmp_path / f"data-{next(builds)}"
        registry = open_registry(data, make_engine(base).config)
        for i, targets in enumerate((["q_proj", "v_proj"], ["gate_proj", "down_proj"])):
            path = tmp_path / f"a{i}"
            if not path.exists():
                save_peft_adapter(base, path, seed=i, r=4, lora_alpha=8, target_modules=targets)
            registry.register_dir(f"a{i}", path)
        return make_engine(base, registry=registry, **GPU, **overrides)

    return build


def test_the_forward_never_syncs_on_cuda(engine_with_adapters, monkeypatch):
    run = ModelRunner.run

    def guarded(self, step):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ModelRunner, "run", guarded)
    engine = engine_with_adapters(enforce_eager=True)
    outs = engine.generate(PROMPTS, GREEDY, [None, "a0", "a1"] * 2)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)


def test_graph_replay_with_adapters_gives_the_tokens_of_eager_decoding(engine_with_adapters):
    adapters = [None, "a0", "a1", "a0", None, "a1"]
    outs = {}
    for eager in (True, False):
        engine = engine_with_adapters(enforce_eager=eager)
        assert (engine.runner.graphs is None) == eager
        outs[eager] = [o.token_ids for o in engine.generate(PROMPTS, GREEDY, adapters)]
    assert outs[False] == outs[True]
