"""The adapter stores killed (SIGKILL, in a forked child) at each step of an upload, an in-place
reload and a delete: reopened, the local store and every replica of a shared store (file://
and S3) hold each adapter absent or as one whole version, the one the step had committed to,
with its record, files and sha256 agreeing, and no leftovers beside it."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters import AdapterSpec, AdapterStore, read_adapter_spec
from adapters.faults import set_fault_points
from adapters.format import WEIGHTS_FILE
from adapters.shared_store import SharedAdapterStore, storage_options
from adapters.store import sha256_file
from tests.s3_server import moto_s3, new_bucket
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

BASE = tiny_base()
OLD = tiny_files(rank=2, seed=1)
NEW = tiny_files(rank=4, seed=2)
Files = dict[str, bytes]

# (operation, fault point, what "a" must be after the restart). Each point is where a kill
# leaves the most to recover: a write staged, renamed but not indexed, indexed but the old
# version not yet removed, a row gone but its files not.
LOCAL_STEPS: list[tuple[str, str, Files | None]] = [
    ("upload", "store.write", None),
    ("upload", "store.before_index", None),
    ("reload", "store.write", OLD),
    ("reload", "store.reload.before_index", OLD),
    ("reload", "store.reload.after_index", NEW),
    ("delete", "store.delete", None),
]
# The shared manifest is the commit point: once it is written, every replica serves it.
SHARED_STEPS: list[tuple[str, str, Files | None]] = [
    ("upload", "store.shared.blob", None),
    ("upload", "store.shared.manifest", None),
    ("upload", "store.shared.published", NEW),
    ("upload", "store.before_index", NEW),
    ("reload", "store.write", OLD),
    ("reload", "store.shared.manifest", OLD),
    ("reload", "store.shared.published", NEW),
    ("reload", "store.reload.before_index", NEW),
    ("reload", "store.reload.after_index", NEW),
    ("delete", "store.shared.deleted", None),
    ("delete", "store.delete", None),
]


def validate(path: Path) -> AdapterSpec:
    return read_adapter_spec(path, BASE, MAX_RANK)


def killed_at(point: str, action: Callable[[], object]) -> None:
    """Run action in a forked child with `point` armed: it must die there by SIGKILL."""

    def child() -> None:
        set_fault_points(point)
        action()
        os._exit(0)  # the point was never reached

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL, f"{point} was not reached"


def run(store: Any, operation: str) -> None:
    """The operation under test, on adapter "a" (stored as OLD beforehand unless uploaded)."""
    if operation == "upload":
        store.add("a", "upload", validate, files=NEW)
    elif operation == "reload":
        store.replace("a", "upload", validate, files=NEW)
    else:
        store.delete("a")


def assert_holds(store: Any, name: str, files: Files | None) -> None:
    """name is absent (files None), or indexed with a record, files and digest that agree."""
    record = store.get(name)
    if files is None:
        assert record is None, f"{name} should be absent"
        return
    assert record is not None, f"{name} was lost"
    path = store.path(name)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert record.sha256 == sha256_file(path / WEIGHTS_FILE)
    assert record.size_bytes == sum(len(b) for b in files.values())
    assert record.spec == validate(path)


def assert_no_leftovers(data_dir: Path) -> None:
    """No temp dirs, and one version folder in each adapter's folder."""
    blobs = data_dir / "adapters"
    assert not list(blobs.glob(".tmp-*"))
    for name_dir in blobs.iterdir():
        assert len(list(name_dir.iterdir())) == 1, sorted(name_dir.iterdir())


@pytest.mark.parametrize(("operation", "point", "expected"), LOCAL_STEPS)
def test_the_local_store_killed_at_any_step_keeps_each_adapter_whole(
    tmp_path: Path, operation: str, point: str, expected: Files | None
) -> None:
    store = AdapterStore(tmp_path)
    store.add("kept", "upload", validate, files=OLD)
    if operation != "upload":
        store.add("a", "upload", validate, files=OLD)
    store.close()
    killed_at(point, lambda: run(AdapterStore(tmp_path), operation))
    reopened = AdapterStore(tmp_path)
    assert_holds(reopened, "kept", OLD)
    assert_holds(reopened, "a", expected)
    assert_no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """A fresh shared location and its fsspec options."""
    if request.param == "file":
        return f"file://{tmp_path / 'shared'}", {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{new_bucket(endpoint)}/prefix", storage_options("s3://x", endpoint)


@pytest.mark.parametrize(("operation", "point", "expected"), SHARED_STEPS)
def test_a_shared_store_replica_killed_at_any_step_keeps_each_adapter_whole_everywhere(
    tmp_path: Path,
    shared_url: tuple[str, dict],
    operation: str,
    point: str,
    expected: Files | None,
) -> None:
    url, options = shared_url

    def replica(name: str) -> SharedAdapterStore:
        return SharedAdapterStore(url, tmp_path / name, options=options)

    writer = replica("writer")
    writer.add("kept", "upload", validate, files=OLD)
    if operation != "upload":
        writer.add("a", "upload", validate, files=OLD)
        writer.path("a")  # the writer holds the files of the version being replaced
    writer.close()
    killed_at(point, lambda: run(replica("writer"), operation))
    for name in ("writer", "other"):  # restarted, and a replica that never saw the crash
        store = replica(name)
        assert_holds(store, "kept", OLD)
        assert_holds(store, "a", expected)
        assert_no_leftovers(tmp_path / name)
