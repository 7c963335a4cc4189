"""Training checkpoints on disk, written atomically so a restarted job resumes from the last one.

A checkpoint is a directory `step-NNNNNN` holding the trainable tensors (safetensors), the
optimizer, scheduler and RNG states (torch.save, read back with weights_only=True), a servable
PEFT adapter, and meta.json (step, losses, hyperparameters, data fingerprint). It is assembled
under a temporary name and renamed into place, so a crash never leaves a half-written one;
a full disk is a DiskFullError and removes the partial copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.faults import disk_full_as_error, fault_point
from adapters.format import AdapterWeights, write_adapter
from adapters.versions import fsync_path

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
ADAPTER_DIR = "adapter"
_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"  # what is being written; a crash leaves it for JobStore.recover


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint: where it is, its step, and the losses recorded with it."""

    path: Path
    step: int
    train_loss: float | None
    valid_loss: float | None
    meta: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under root, oldest first (temporary directories are ignored)."""
    found = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if not path.name.startswith(_PREFIX) or not (path / META_FILE).is_file():
            continue
        meta = json.loads((path / META_FILE).read_text())
        found.append(
            CheckpointInfo(path, meta["step"], meta.get("train_loss"), meta.get("valid_loss"), meta)
        )
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> CheckpointInfo | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    root: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    state: dict[str, Any],
    adapter: tuple[dict[str, Any], AdapterWeights],
    meta: dict[str, Any],
    keep: int,
) -> CheckpointInfo:
    """Write a checkpoint atomically, then drop all but the newest `keep`."""
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    meta = {**meta, "step": step, "created_at": time.time()}
    try:
        with disk_full_as_error("writing a training checkpoint"):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in trainable.items()}
            save_file(tensors, str(tmp / TRAINABLE_FILE))
            fault_point("checkpoint.write")
            torch.save(state, tmp / STATE_FILE)
            write_adapter(tmp / ADAPTER_DIR, *adapter)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            fsync_tree(tmp)
            if final.exists():  # a rerun of the same step after a crash that followed the rename
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fault_point("checkpoint.renamed")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    logger.info("checkpoint at step %d written to %s", step, final)
    return CheckpointInfo(final, step, meta.get("train_loss"), meta.get("valid_loss"), meta)


def load_checkpoint(
    info: CheckpointInfo, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, optimizer/scheduler/RNG state) of a checkpoint, on `device`."""
    trainable = load_file(str(info.path / TRAINABLE_FILE), device=str(device))
    state = torch.load(info.path / STATE_FILE, map_location=device, weights_only=True)
    return trainable, state


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device): dropout replays exactly on resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_adapter_atomically(
    adapter_dir: Path, config: dict[str, Any], weights: AdapterWeights
) -> None:
    """Write a PEFT adapter directory under a temporary name, then rename it into place."""
    tmp = adapter_dir.parent / f"{TEMP_PREFIX}{adapter_dir.name}-{os.getpid()}"
    try:
        with disk_full_as_error("writing the trained adapter"):
            adapter_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            write_adapter(tmp, config, weights)
            fsync_tree(tmp)
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            os.rename(tmp, adapter_dir)
            fsync_path(adapter_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    """Flush every file under directory: the rename is atomic, durable only after this."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
