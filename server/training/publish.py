"""Kept checkpoints as servable adapters, named as OpenAI names them, while a job runs.

The worker writes a checkpoint (with a PEFT adapter inside) and records it; the server's
JobManager calls `CheckpointPublisher.sync` about once a second for each running job (and once
when the job ends). Each recorded checkpoint not yet published is copied into the adapter store
under `<fine_tuned_model>:ckpt-step-<step>` (its `fine_tuned_model_checkpoint`), so it serves
at once and does not depend on the trainer's directory; each published one whose checkpoint the
trainer removed (keep_checkpoints) is unregistered, on the engine's step thread, once no
request uses it. After the job ends its kept checkpoints stay published, as the final model is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from adapters.errors import AdapterError, AdapterExistsError
from server.training.checkpoint import ADAPTER_DIR
from server.training.jobs import Checkpoint, Job, JobStore

if TYPE_CHECKING:
    from adapters import AdapterRegistry, BaseModelInfo, RegisteredAdapter

logger = logging.getLogger(__name__)

RemoveAdapter = Callable[[str], Awaitable[None]]  # raises while requests use the adapter


class ServedAdapters(Protocol):
    """What fine-tuning needs of the served adapters: the server's AdapterService (jobs never
    touch the registry or the engine themselves), or a bare AdapterRegistry without one."""

    @property
    def max_lora_rank(self) -> int: ...

    @property
    def base(self) -> BaseModelInfo: ...

    def list(self) -> list[RegisteredAdapter]: ...

    def register_dir(self, name: str, path: Path, source: str = ...) -> RegisteredAdapter:
        """Validate, store and register a PEFT directory (blocking)."""
        ...


def fine_tuned_name(job: Job) -> str:
    """The final adapter's name: ft:<model>[:<suffix>]:<first 8 of the job id>."""
    short = job.id.removeprefix("ftjob-")[:8]
    return f"ft:{job.model}:{job.suffix}:{short}" if job.suffix else f"ft:{job.model}:{short}"


def checkpoint_prefix(job: Job) -> str:
    return f"{fine_tuned_name(job)}:ckpt-step-"


def checkpoint_name(job: Job, step: int) -> str:
    """OpenAI's fine_tuned_model_checkpoint: the final name plus :ckpt-step-<step>."""
    return f"{checkpoint_prefix(job)}{step}"


class CheckpointPublisher:
    """Keeps a job's published checkpoint adapters equal to its kept checkpoints."""

    def __init__(
        self, store: JobStore, adapters: ServedAdapters, remove: RemoveAdapter | None
    ) -> None:
        self.store = store
        self.adapters = adapters
        # Without an engine (tests of the manager alone) nothing can be using an adapter.
        self._remove = remove or self._unregister

    async def sync(self, job: Job) -> None:
        """Publish new checkpoints, then unpublish those the trainer removed."""
        kept = await asyncio.to_thread(self._publish_new, job)
        live = {c.fine_tuned_model_checkpoint for c in kept}
        prefix = checkpoint_prefix(job)
        for reg in self.adapters.list():
            if reg.name.startswith(prefix) and reg.name not in live:
                try:
                    await self._remove(reg.name)
                except Exception as exc:  # busy: retried at the next sync
                    logger.info("checkpoint adapter %s not removed yet: %s", reg.name, exc)
                    continue
                self.store.add_event(job.id, f"Removed checkpoint model {reg.name} (pruned)")

    def _publish_new(self, job: Job) -> list[Checkpoint]:
        """Register unpublished checkpoints (a thread: copies files); the kept checkpoints."""
        self.store.prune_checkpoints(job.id)
        kept = self.store.checkpoints(job.id)
        for ckpt in kept:
            if ckpt.fine_tuned_model_checkpoint is not None:
                continue
            name = checkpoint_name(job, ckpt.step)
            try:
                self.adapters.register_dir(name, Path(ckpt.path) / ADAPTER_DIR, "training")
            except AdapterExistsError:
                logger.info("checkpoint adapter %s was registered before a restart", name)
            except (AdapterError, OSError) as exc:
                # Most often the trainer removed it meanwhile (keep_checkpoints); a full disk
                # or a bad adapter leaves the checkpoint unpublished, and the job training.
                logger.warning("checkpoint %s of %s not published: %s", ckpt.step, job.id, exc)
                continue
            self.store.set_checkpoint_model(ckpt.id, name)
            ckpt.fine_tuned_model_checkpoint = name
            self.store.add_event(job.id, f"Checkpoint at step {ckpt.step} is servable as {name}")
        return kept

    async def _unregister(self, name: str) -> None:
        registry = cast("AdapterRegistry", self.adapters)  # no engine: a bare registry
        await asyncio.to_thread(registry.unregister, name)
