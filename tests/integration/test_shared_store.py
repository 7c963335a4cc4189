"""Two `loraplex serve` processes on one shared adapter store (file:// and an S3-compatible
server started here): what one uploads or trains the other serves, a delete through one is
seen by the other within a poll, and a writer killed mid-upload leaves nothing listed."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import httpx
import pytest

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import (
    ENGINE_FLAGS,
    LONG_MODEL_LEN,
    MODEL_NAME,
    Oracle,
    serve_flags,
)
from tests.integration.fine_tuning_data import jsonl, ordering_task, wait_for_job
from tests.integration.fine_tuning_data import upload as upload_file
from tests.integration.live_server import LiveServer, wait_until
from tests.integration.test_adapter_reload import (
    NUM_TOKENS,
    oracle_text,
    oracle_tokens,
    reload,
    stream_tokens,
)
from tests.integration.test_adapters_api import complete as complete_alone
from tests.s3_server import CREDENTIALS, moto_s3, new_bucket

POLL_S = 0.5
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, list[str], dict[str, str]]:
    """A fresh shared store: its URL, the serve flags and the environment that reach it."""
    if request.param == "file":
        return f"file://{tmp_path / 'shared'}", [], {}
    endpoint = request.getfixturevalue("s3_endpoint")
    url = f"s3://{new_bucket(endpoint)}/loraplex"
    return url, ["--s3-endpoint-url", endpoint], dict(CREDENTIALS)


def replica(
    model_dir: Path, data_dir: Path, store: tuple, engine: dict | None = None, **env: str
) -> LiveServer:
    url, flags, store_env = store
    args = serve_flags(**{**ENGINE_FLAGS, **(engine or {})}, served_model_name=MODEL_NAME)
    args += ["--adapter-store", url, "--adapter-store-poll-s", str(POLL_S), *flags]
    return LiveServer(model_dir, data_dir, args, env={**store_env, **env})


def upload(server: LiveServer, name: str, adapter_dir: Path) -> httpx.Response:
    files = [("files", (f, (adapter_dir / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    with server.client(admin=True) as http:
        return http.post("/v1/adapters", data={"name": name}, files=files)


def listed(server: LiveServer) -> list[str]:
    with server.client() as http:
        return [a["id"] for a in http.get("/v1/adapters").json()["data"]]


def complete(server: LiveServer, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with server.client() as http:
        response = http.post("/v1/completions", json=body)
    return {"status": response.status_code, "body": response.json()}


def test_two_servers_share_uploads_and_deletes_and_never_list_a_killed_write(
    model_dir: Path, spare_adapters: Path, tmp_path: Path, store_url: tuple
) -> None:
    a = replica(model_dir, tmp_path / "a", store_url).start()
    b = replica(model_dir, tmp_path / "b", store_url).start()
    try:
        assert upload(a, "shared-one", spare_adapters / "spare-0").status_code == 201
        assert wait_until(lambda: "shared-one" in listed(b), timeout=10 * POLL_S + 5)
        on_a, on_b = complete(a, "shared-one"), complete(b, "shared-one")
        assert on_b["status"] == 200, on_b
        assert on_b["body"]["choices"][0]["text"] == on_a["body"]["choices"][0]["text"]
        assert (
            on_b["body"]["choices"][0]["text"]
            != complete(b, MODEL_NAME)["body"]["choices"][0]["text"]
        )

        with a.client(admin=True) as http:
            assert http.delete("/v1/adapters/shared-one").status_code == 200
        # Seen within a few polls (the bound leaves room for a loaded machine: the s3 store
        # is moto, a thread of this process).
        seen = wait_until(lambda: "shared-one" not in listed(b), timeout=10 * POLL_S + 5)
        assert seen, "the other server still lists the deleted adapter"
        assert complete(b, "shared-one")["status"] == 404

        # A writer killed after its blobs, before its manifest: nothing is ever listed.
        writer = replica(
            model_dir, tmp_path / "w", store_url, LORAPLEX_FAULT_POINTS="store.shared.manifest"
        ).start()
        with pytest.raises(httpx.TransportError):
            upload(writer, "half-written", spare_adapters / "spare-1")
        assert writer.wait_killed() == -9
        deadline = time.monotonic() + 3 * POLL_S
        while time.monotonic() < deadline:
            assert "half-written" not in listed(a) + listed(b)
            time.sleep(POLL_S / 2)
        url, _, _ = store_url
        options = {"client_kwargs": {"endpoint_url": store_url[1][1]}} if store_url[1] else {}
        fs, root = fsspec.core.url_to_fs(url, **options)
        fs.invalidate_cache()
        assert fs.ls(f"{root}/blobs"), "the killed writer got as far as its blobs"
        assert not [p for p in fs.find(f"{root}/manifests") if "half-written" in p]
        # The name is free: the same adapter uploads through another replica.
        assert upload(b, "half-written", spare_adapters / "spare-1").status_code == 201
        assert wait_until(lambda: "half-written" in listed(a), timeout=10 * POLL_S + 5)
    finally:
        a.stop()
        b.stop()


def test_adapters_load_and_preload_by_uri_and_the_roots_hold(
    model_dir: Path, spare_adapters: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    bucket = new_bucket(s3_endpoint)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        fs.put_file(str(spare_adapters / "spare-2" / file), f"{bucket}/allowed/two/{file}")
        fs.put_file(str(spare_adapters / "spare-2" / file), f"{bucket}/other/two/{file}")
        fs.put_file(str(spare_adapters / "spare-1" / file), f"{bucket}/preload/pre/{file}")
    local_root = tmp_path / "roots"
    shutil.copytree(spare_adapters / "spare-3", local_root / "three")
    args = serve_flags(**ENGINE_FLAGS, served_model_name=MODEL_NAME)
    args += ["--s3-endpoint-url", s3_endpoint, "--adapter-roots", str(local_root)]
    args += [f"s3://{bucket}/allowed", "--preload-adapters", f"s3://{bucket}/preload/pre"]
    server = LiveServer(model_dir, tmp_path / "data", args, env=dict(CREDENTIALS)).start()
    try:
        with server.client(admin=True) as http:

            def load(name: str, path: str) -> httpx.Response:
                return http.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
                )

            assert load("two", f"s3://{bucket}/allowed/two").status_code == 200
            assert load("three", f"file://{local_root / 'three'}").status_code == 200
            refused = load("other", f"s3://{bucket}/other/two")
            assert refused.status_code == 403
            assert "not under an allowed s3://" in refused.json()["error"]["message"]
            assert load("up", f"s3://{bucket}/allowed/../other/two").status_code == 403
            missing = load("gone", f"s3://{bucket}/allowed/nothing")
            assert missing.status_code == 400 and "does not hold" in missing.text
            assert load("ftp", "ftp://host/x").status_code == 400
        assert {"two", "three", "pre"} <= set(listed(server))
        assert complete(server, "two")["status"] == 200
    finally:
        server.stop()


def test_an_adapter_trained_on_one_server_serves_from_the_other(
    model_dir: Path, tmp_path: Path
) -> None:
    store = (f"file://{tmp_path / 'shared'}", [], {})
    a = replica(model_dir, tmp_path / "a", store).start()
    b = replica(model_dir, tmp_path / "b", store).start()
    try:
        with a.client(admin=True) as admin:
            file_id = upload_file(admin, "train.jsonl", jsonl(ordering_task(16, seed=0)))
            hyper = {"r": 4, "batch_size": 2, "max_steps": 3, "quantize": "none"}
            created = admin.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": MODEL_NAME,
                    "training_file": file_id,
                    "method": {"type": "qlora", "hyperparameters": hyper},
                },
            )
            assert created.status_code == 200, created.text
            job = wait_for_job(admin, created.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
        name = job["fine_tuned_model"]
        assert wait_until(lambda: name in listed(b), timeout=10 * POLL_S + 5)
        on_a, on_b = complete(a, name), complete(b, name)
        assert on_b["status"] == 200, on_b
        assert on_b["body"]["choices"][0]["text"] == on_a["body"]["choices"][0]["text"]
    finally:
        a.stop()
        b.stop()


def test_a_reload_through_one_server_reaches_the_other_while_its_running_requests_keep_the_old(
    model_dir: Path, spare_adapters: Path, oracle: Oracle, tmp_path: Path, store_url: tuple
) -> None:
    old_tokens = oracle_tokens(oracle, "reload-old", spare_adapters / "spare-0")
    new_text = oracle_text(oracle, "reload-new", spare_adapters / "spare-1")
    a = replica(model_dir, tmp_path / "a", store_url).start()
    b = replica(model_dir, tmp_path / "b", store_url, {"max_model_len": LONG_MODEL_LEN}).start()

    def version_on_b() -> int:
        with b.client() as http:
            return int(http.get("/v1/adapters/shared-hot").json()["version"])

    def text(server: LiveServer) -> str:
        reply = complete_alone(server, "shared-hot", max_tokens=NUM_TOKENS, ignore_eos=True)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["text"])

    try:
        assert upload(a, "shared-hot", spare_adapters / "spare-0").status_code == 201
        assert wait_until(lambda: "shared-hot" in listed(b), timeout=10 * POLL_S + 5)
        endless = {"max_new_tokens": LONG_MODEL_LEN - 16, "ignore_eos_token": True}
        body = {"inputs": PROMPT, "parameters": {**endless, "adapter_id": "shared-hot"}}
        with b.client() as http, http.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()
            first = stream_tokens(lines, 1)
            reloaded = reload(a, "shared-hot", spare_adapters / "spare-1")
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["version"] == 2
            assert text(a) == new_text
            assert wait_until(lambda: version_on_b() == 2, timeout=10 * POLL_S + 5)
            assert text(b) == new_text  # new requests there get the new weights
            # The request B was running when it took the reload goes on with the old weights.
            assert first + stream_tokens(lines, NUM_TOKENS - 1) == old_tokens
    finally:
        a.stop()
        b.stop()
