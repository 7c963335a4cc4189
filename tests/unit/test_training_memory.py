"""The training memory budget: the estimate, and how a job that cannot fit waits or fails,
checked against a fake device (no GPU needed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server.model.config import ModelConfig
from server.training.hparams import hparams_for
from server.training.jobs import JobStore
from server.training.lora import adapter_spec
from server.training.manager import JobManager, JobRequestError
from server.training.memory import (
    CUDA_CONTEXT_BYTES,
    MIB,
    SERVING_HEADROOM,
    MemoryBudget,
    MemoryBudgetError,
    MemoryEstimate,
    estimate,
)
from tests.tiny_models import hf_config
from tests.unit.adapter_fixtures import tiny_base

GIB = 1024 * MIB


def _tiny_config() -> dict:
    """The tiny Llama's config.json (tests.tiny_models), as a checkpoint carries it."""
    return {**hf_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]}


class FakeDevice:
    """(free, total) bytes, changed by the test."""

    def __init__(self, free: int, total: int = 16 * GIB) -> None:
        self.free, self.total = free, total

    def __call__(self) -> tuple[int, int]:
        return self.free, self.total


def _estimate(cuda: bool = False, **overrides) -> MemoryEstimate:  # type: ignore[no-untyped-def]
    cfg = ModelConfig.from_dict(_tiny_config())
    hp = hparams_for("qlora", overrides)
    return estimate(cfg, hp, adapter_spec(hp, tiny_base()), 128, cuda)


def _need(total_mib: int) -> MemoryEstimate:
    return MemoryEstimate(total_mib * MIB, 0, 0, 0)


def test_nf4_weights_take_about_an_eighth_of_float32():
    nf4, dense = _estimate(quantize="nf4"), _estimate(quantize="none")
    assert nf4.weights < dense.weights / 2
    assert nf4.trainable == dense.trainable


def test_trainable_state_is_16_bytes_per_trainable_parameter():
    hp = hparams_for("qlora", {"r": 8})
    assert _estimate(r=8).trainable == 16 * adapter_spec(hp, tiny_base()).num_params


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing():
    assert _estimate(batch_size=8).activations > 1.9 * _estimate(batch_size=4).activations
    checkpointed = _estimate(gradient_checkpointing=True).activations
    assert checkpointed < _estimate(gradient_checkpointing=False).activations


def test_a_gpu_worker_pays_for_its_own_cuda_context():
    assert _estimate(cuda=True).overhead == CUDA_CONTEXT_BYTES
    assert _estimate(cuda=False).overhead == 0


def test_a_job_over_the_fixed_cap_can_never_fit():
    budget = MemoryBudget(100 * MIB, FakeDevice(free=8 * GIB))
    with pytest.raises(MemoryBudgetError, match="--training-memory-mb allows 100 MiB"):
        budget.grant(_need(200))


def test_a_job_that_fits_is_granted_what_is_free_beside_serving_up_to_the_cap():
    device = FakeDevice(free=4 * GIB)
    headroom = int(SERVING_HEADROOM * device.total)
    assert MemoryBudget(None, device).grant(_need(1000)) == (4 * GIB - headroom, None)
    assert MemoryBudget(2 * GIB, device).grant(_need(1000)) == (2 * GIB, None)


def test_memory_granted_to_running_workers_counts_as_taken():
    device = FakeDevice(free=4 * GIB)
    headroom = int(SERVING_HEADROOM * device.total)
    budget = MemoryBudget(None, device)
    assert budget.grant(_need(1000), granted=2 * GIB) == (2 * GIB - headroom, None)
    assert budget.grant(_need(1000), granted=4 * GIB)[0] is None


def test_a_job_waits_while_serving_leaves_too_little_free():
    device = FakeDevice(free=1 * GIB)
    grant, wait = MemoryBudget(None, device).grant(_need(1000))
    assert grant is None
    assert wait is not None and "waiting for device memory" in wait and "1000 MiB" in wait


def test_a_job_larger_than_what_serving_left_free_at_start_can_never_fit():
    device = FakeDevice(free=2 * GIB)
    budget = MemoryBudget.at_start(None, device)
    device.free = 16 * GIB  # even if more frees later: serving's pool holds the rest for good
    with pytest.raises(MemoryBudgetError, match="free beside the serving pool"):
        budget.grant(_need(3000))
    assert budget.grant(_need(1000))[1] is None


def test_on_cpu_only_the_fixed_cap_is_checked():
    assert MemoryBudget(None, lambda: None).grant(_need(10**6)) == (None, None)
    assert MemoryBudget(500 * MIB, lambda: None).grant(_need(100)) == (500 * MIB, None)


# ---- in the job manager -------------------------------------------------------------------


def _manager(tmp_path: Path, budget: MemoryBudget) -> JobManager:
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config()))
    store = JobStore(tmp_path / "data")
    line = json.dumps({"prompt": "a", "completion": "b"}).encode()
    store.add_file("train.jsonl", "fine-tune", line, 1)
    registry = _Registry()
    return JobManager(store, registry, "base", tmp_path, "cpu", 1, memory=budget)  # type: ignore[arg-type]


class _Registry:
    max_lora_rank = 64
    base = tiny_base()

    def list(self) -> list:
        return []


def _body(manager: JobManager, **hyperparameters: int) -> dict:
    file_id = manager.store.list_files()[0][0].id
    method = {"type": "qlora", "hyperparameters": hyperparameters}
    return {"model": "base", "training_file": file_id, "method": method}


def test_a_job_that_can_never_fit_is_refused_when_created(tmp_path):
    manager = _manager(tmp_path, MemoryBudget(1 * MIB, lambda: None))
    with pytest.raises(JobRequestError, match="--training-memory-mb allows 1 MiB") as info:
        manager.create(_body(manager))
    assert info.value.param == "method.hyperparameters"
    assert manager.store.list_jobs()[0] == []


def test_a_queued_job_waits_for_device_memory_then_starts(tmp_path, monkeypatch):
    device = FakeDevice(free=0)
    manager = _manager(tmp_path, MemoryBudget(None, device))
    launched: list[tuple[str, int | None]] = []
    monkeypatch.setattr(manager, "_launch", lambda job, grant: launched.append((job.id, grant)))
    job = manager.create(_body(manager))

    async def ticks(n: int) -> None:
        for _ in range(n):
            await manager._tick()

    asyncio.run(ticks(3))
    assert launched == [] and manager.get(job.id).status == "queued"
    events, _ = manager.store.events(job.id)
    assert sum("waiting for device memory" in e.message for e in events) == 1  # said once
    device.free = 8 * GIB
    asyncio.run(ticks(1))
    assert launched == [(job.id, 8 * GIB - int(SERVING_HEADROOM * device.total))]
