"""An adapter's files on disk: one immutable folder per version, and start-up recovery.

    adapters/<quoted name>/<version>/   adapter_config.json, adapter_model.safetensors, ...

A version folder is written once (staged, validated, fsynced, renamed into place) and never
changed; the index row names the version it serves. An in-place reload adds a new version
folder beside the old one, switches the row in one transaction, and only then removes the old
folder: killed at any instant, the row names a version that is whole on disk, and recovery
removes every other. Data dirs from before versions keep an adapter's files in its own folder
(the version ""), until the adapter is first reloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # adapter names cannot start with ".", so temp dirs never collide
LEGACY_VERSION = ""  # the files lie in the adapter's folder itself


def new_version() -> str:
    """A version folder name never used before (versions are never reused, so a folder being
    removed can never be one a later write of the same name put in place)."""
    return uuid.uuid4().hex[:16]


def version_dir(name_dir: Path, version: str) -> Path:
    """The folder of one version of the adapter whose folder is name_dir."""
    return name_dir / version if version != LEGACY_VERSION else name_dir


def stale_entries(name_dir: Path, version: str) -> list[Path]:
    """What lies in an adapter's folder besides the files of `version`: other versions."""
    if not name_dir.is_dir():
        return []
    if version == LEGACY_VERSION:  # keep the files; a folder is a version never committed
        return sorted(e for e in name_dir.iterdir() if e.is_dir())
    return sorted(e for e in name_dir.iterdir() if e.name != version)


def remove_paths(paths: list[Path]) -> None:
    """Remove files and folders (a crash midway leaves what recovery removes later)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_stale(blobs: Path, versions: Mapping[str, str]) -> list[Path]:
    """Remove what a crash left in the store's folder: temp dirs, folders of unindexed names,
    and every version of an indexed name but the one its row serves (`versions`: name ->
    version). The served version is never touched. Returns what went."""
    removed = []
    for entry in sorted(blobs.iterdir()):
        name = unquote(entry.name)
        if entry.name.startswith(TEMP_PREFIX) or (entry.is_dir() and name not in versions):
            removed.append(entry)
        elif entry.is_dir():
            removed += stale_entries(entry, versions[name])
    remove_paths(removed)
    for path in removed:
        logger.warning("removed leftover %s from an interrupted write", path)
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
