"""A server killed (SIGKILL) at the steps of an upload, an in-place reload and a delete where
the most is left to recover restarts with every adapter absent or one whole version: the one
the step had committed to, with its listing, its files on disk, their sha256 and the text it
serves agreeing, that text being what the same version served before the crash. On the local
store and on a shared (file://) store, where a replica that never crashed agrees too.

Every step of each path, on the local store and on file:// and S3 shared stores, is killed in
tests/unit/test_store_crashes.py; this checks what a client then sees."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from adapters.faults import FAULT_POINTS_ENV
from tests.integration.conftest import MODEL_NAME, serve_flags
from tests.integration.live_server import LiveServer
from tests.integration.test_adapters_api import PROMPT, upload, upload_files

NUM_TOKENS = 12
OLD, NEW = "spare-0", "spare-1"  # spare adapters of different ranks and targets
# (operation, adapter, the files it sends, fault point, what the adapter is after the restart)
LOCAL_STEPS = [
    ("reload", "a", NEW, "store.reload.before_index", OLD),  # new version in place, no row
    ("reload", "a", NEW, "store.reload.after_index", NEW),  # row switched, old version kept
    ("upload", "b", NEW, "store.before_index", None),  # in place, no row
    ("delete", "a", None, "store.delete", None),  # row gone, files not
]
# A shared store's manifest is its commit point: once written, the version is the new one.
SHARED_STEPS = [
    ("reload", "a", NEW, "store.shared.published", NEW),  # manifest switched, nothing local
    ("reload", "a", OLD, "store.reload.before_index", OLD),  # and the local row not switched
    ("upload", "b", NEW, "store.shared.manifest", None),  # blobs uploaded, no manifest
    ("delete", "a", None, "store.shared.deleted", None),  # manifest removed, nothing local
]


def served_text(live: LiveServer, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0}
    with live.client() as http:
        response = http.post("/v1/completions", json={**body, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def listed(live: LiveServer) -> dict[str, dict]:
    with live.client() as http:
        return {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}


def weights_on_disk(live: LiveServer, name: str) -> list[str]:
    """The sha256 of every weights file stored under name (one per version kept)."""
    folder = live.data_dir / "adapters" / name
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.safetensors")]


def assert_consistent(live: LiveServer, versions: dict[str, tuple[dict, str]]) -> dict:
    """Each listed adapter is a known version (by sha256: its listing and text before the
    crash), holds exactly that version's weights on disk and serves that text; the adapters
    on disk are those listed, and no temp dir is left. The listing, by name."""
    adapters = listed(live)
    for name, info in adapters.items():
        assert info["sha256"] in versions, f"{name}'s listing matches no version"
        before, text = versions[info["sha256"]]
        assert (info["rank"], info["size_bytes"]) == (before["rank"], before["size_bytes"])
        assert served_text(live, name) == text, name  # a shared store fetches the files here
        assert weights_on_disk(live, name) == [info["sha256"]], name
    stored = live.data_dir / "adapters"
    assert {unquote(p.name) for p in stored.iterdir()} == set(adapters)
    assert not list(live.data_dir.rglob(".tmp-*"))
    return adapters


def start_with(live: LiveServer, points: str = "") -> LiveServer:
    live.env = {**live.env, FAULT_POINTS_ENV: points}
    return live.start()


def run(live: LiveServer, operation: str, name: str, adapter_dir: Path | None) -> None:
    """Send the request; the server dies on the way (a fault point), so no answer comes."""
    with pytest.raises(httpx.TransportError), live.client(admin=True) as http:
        if operation == "upload":
            assert adapter_dir is not None
            http.post("/v1/adapters", data={"name": name}, files=upload_files(adapter_dir))
        elif operation == "reload":
            assert adapter_dir is not None
            http.put(f"/v1/adapters/{name}", files=upload_files(adapter_dir))
        else:
            http.delete(f"/v1/adapters/{name}")
    assert live.wait_killed() == -signal.SIGKILL


def kill_at_each_step(live: LiveServer, spare_adapters: Path, steps: list) -> dict:
    """Store "a" (OLD), learn each version's listing and text, then run the steps, each
    killed at its point and checked after the restart; the final listing."""
    live.start()
    for name, version in (("a", OLD), (OLD, OLD), (NEW, NEW)):
        assert upload(live, name, spare_adapters / version).status_code == 201
    infos = listed(live)
    versions = {infos[v]["sha256"]: (infos[v], served_text(live, v)) for v in (OLD, NEW)}
    by_version = {v: infos[v]["sha256"] for v in (OLD, NEW)}
    live.stop()
    start_with(live, steps[0][3])
    for i, (operation, name, sent, point, expected) in enumerate(steps):
        run(live, operation, name, sent and spare_adapters / sent)
        # Restarted with the next step's point armed (one start per step): the checks below
        # never reach it.
        start_with(live, steps[i + 1][3] if i + 1 < len(steps) else "")
        adapters = assert_consistent(live, versions)
        if expected is None:
            assert name not in adapters, (point, name)
            with live.client(admin=True) as http:  # the name is free again, not stuck
                assert http.get(f"/v1/adapters/{name}").status_code == 404
            assert upload(live, name, spare_adapters / OLD).status_code == 201
        else:
            assert adapters[name]["sha256"] == by_version[expected], point
    return assert_consistent(live, versions)


@pytest.fixture
def local(model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(model_dir, tmp_path / "data", args=["--max-lora-rank", "8"])
    yield server
    server.stop()


@pytest.fixture
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers on one file:// shared store; the first is killed, the second never."""
    args = serve_flags(max_lora_rank=8, served_model_name=MODEL_NAME)
    args += ["--adapter-store", f"file://{tmp_path / 'shared'}"]
    servers = (
        LiveServer(model_dir, tmp_path / "killed", args),
        LiveServer(model_dir, tmp_path / "other", args),
    )
    yield servers
    for server in servers:
        server.stop()


def test_a_local_store_killed_at_each_step_serves_every_adapter_whole(
    local: LiveServer, spare_adapters: Path
) -> None:
    kill_at_each_step(local, spare_adapters, LOCAL_STEPS)


def test_a_shared_store_replica_killed_at_each_step_agrees_with_one_that_never_was(
    replicas: tuple[LiveServer, LiveServer], spare_adapters: Path
) -> None:
    killed, other = replicas
    final = kill_at_each_step(killed, spare_adapters, SHARED_STEPS)
    other.start()
    versions = {info["sha256"]: (info, served_text(killed, name)) for name, info in final.items()}
    assert assert_consistent(other, versions) == final
