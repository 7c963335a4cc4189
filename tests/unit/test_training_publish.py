"""Publishing checkpoints as adapters: new ones registered under OpenAI's checkpoint names,
pruned ones unregistered once no request uses them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from server.training.jobs import Job, JobStore
from server.training.publish import CheckpointPublisher, checkpoint_name


class FakeRegistry:
    def __init__(self) -> None:
        self.names: dict[str, Path] = {}

    def register_dir(self, name: str, path: Path, source: str) -> None:
        assert source == "training"
        self.names[name] = path

    def list(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.names]

    def unregister(self, name: str) -> bool:
        return self.names.pop(name, None) is not None


def _job(store: JobStore) -> Job:
    job = Job(
        "ftjob-0123456789abcdef", 0, "base", "qlora", {}, "file-x", None, "s", None, "running"
    )
    return store.add_job(job)


def _checkpoint(store: JobStore, job: Job, step: int) -> Path:
    path = store.job_dir(job.id) / "checkpoints" / f"step-{step:06d}"
    (path / "adapter").mkdir(parents=True)
    store.add_checkpoint(job.id, step, {"step": step}, str(path))
    return path


def test_a_new_checkpoint_is_published_under_its_openai_name(tmp_path):
    store, registry = JobStore(tmp_path), FakeRegistry()
    job = _job(store)
    path = _checkpoint(store, job, 10)
    asyncio.run(CheckpointPublisher(store, registry, None).sync(job))  # type: ignore[arg-type]
    assert checkpoint_name(job, 10) == "ft:base:s:01234567:ckpt-step-10"
    assert registry.names == {"ft:base:s:01234567:ckpt-step-10": path / "adapter"}
    assert store.checkpoints(job.id)[0].fine_tuned_model_checkpoint == checkpoint_name(job, 10)


def test_a_pruned_checkpoint_is_unpublished_once_no_request_uses_it(tmp_path):
    store, registry = JobStore(tmp_path), FakeRegistry()
    job = _job(store)
    old = _checkpoint(store, job, 10)
    busy = [True]

    async def remove(name: str) -> None:
        if busy[0]:
            raise RuntimeError(f"adapter {name!r} is in use")
        registry.unregister(name)

    publisher = CheckpointPublisher(store, registry, remove)  # type: ignore[arg-type]
    asyncio.run(publisher.sync(job))
    _checkpoint(store, job, 20)
    for child in old.rglob("*"):  # the trainer's keep_checkpoints removes the old directory
        child.rmdir()
    old.rmdir()
    asyncio.run(publisher.sync(job))
    assert set(registry.names) == {checkpoint_name(job, 10), checkpoint_name(job, 20)}
    busy[0] = False
    asyncio.run(publisher.sync(job))
    assert set(registry.names) == {checkpoint_name(job, 20)}
    assert [c.step for c in store.checkpoints(job.id)] == [20]


def test_a_checkpoint_removed_before_it_was_copied_is_skipped(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)
    _checkpoint(store, job, 10)

    class Vanishing(FakeRegistry):
        def register_dir(self, name: str, path: Path, source: str) -> None:
            raise FileNotFoundError(path)

    registry = Vanishing()
    asyncio.run(CheckpointPublisher(store, registry, None).sync(job))  # type: ignore[arg-type]
    assert registry.names == {}
    assert store.checkpoints(job.id)[0].fine_tuned_model_checkpoint is None
