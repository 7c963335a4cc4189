"""Adapter management over HTTP: uploads (files or an archive), info, listing, deletion,
persistence across a restart, and vLLM's load/unload routes confined to --adapter-roots."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, Oracle, adapter_name, serve_flags
from tests.integration.live_server import LiveServer, wait_until

PROMPT = "The quick brown fox"


def upload_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f, (adapter_dir / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]


def upload(server: LiveServer, name: str, adapter_dir: Path) -> httpx.Response:
    with server.client(admin=True) as http:
        return http.post("/v1/adapters", data={"name": name}, files=upload_files(adapter_dir))


def complete(server: LiveServer, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    with server.client() as http:
        return http.post("/v1/completions", json=body)


def stored_entries(server: LiveServer) -> list[str]:
    """What the adapter store holds on disk (temp dirs of unfinished adds included)."""
    return sorted(p.name for p in (server.data_dir / "adapters").iterdir())


def test_an_uploaded_adapter_serves_what_the_engine_gives_it_alone(
    server: LiveServer, spare_adapters: Path, oracle: Oracle
) -> None:
    response = upload(server, "uploaded-files", spare_adapters / "spare-0")
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "uploaded-files"
    oracle.register("uploaded-files", spare_adapters / "spare-0")
    reply = complete(server, "uploaded-files")
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == oracle.complete(
        "uploaded-files", PROMPT, max_tokens=8
    )


def test_adapter_info_reports_rank_alpha_targets_size_hash_and_residency(
    server: LiveServer, adapter_dirs: dict[str, Path]
) -> None:
    name = adapter_name(1)  # r=8, alpha 16 on the MLP
    files = [adapter_dirs[name] / f for f in (CONFIG_FILE, WEIGHTS_FILE)]
    assert complete(server, name).status_code == 200  # now resident
    with server.client() as http:
        info = http.get(f"/v1/adapters/{name}").json()
    assert (info["id"], info["object"], info["parent"]) == (name, "adapter", MODEL_NAME)
    assert (info["rank"], info["alpha"], info["use_rslora"]) == (8, 16, False)
    assert sorted(info["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert info["size_bytes"] == sum(f.stat().st_size for f in files)
    assert info["sha256"] == hashlib.sha256(files[1].read_bytes()).hexdigest()
    assert abs(info["created"] - time.time()) < 3600
    assert info["source"] == "preload"
    assert info["residency"] == {"host": True, "device": True, "active_requests": 0}


def test_the_listing_holds_preloaded_adapters_with_their_details(server: LiveServer) -> None:
    with server.client() as http:
        listing = http.get("/v1/adapters").json()
    assert listing["object"] == "list"
    by_name = {a["id"]: a for a in listing["data"]}
    assert {adapter_name(i) for i in range(32)} <= set(by_name)
    assert by_name[adapter_name(2)]["rank"] == 2


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_an_archive_upload_registers_the_adapter(
    server: LiveServer, spare_adapters: Path, oracle: Oracle, suffix: str
) -> None:
    source = spare_adapters / "spare-1"
    buffer = io.BytesIO()
    if suffix == ".zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                archive.write(source / f, f"my-adapter/{f}")
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                archive.add(source / f, f"my-adapter/{f}")
    name = f"archive{suffix.replace('.', '-')}"
    with server.client(admin=True) as http:
        response = http.post(
            "/v1/adapters",
            data={"name": name},
            files={"files": (f"adapter{suffix}", buffer.getvalue())},
        )
    assert response.status_code == 201, response.text
    assert response.json()["rank"] == 8
    oracle.register(name, source)
    assert complete(server, name).json()["choices"][0]["text"] == oracle.complete(
        name, PROMPT, max_tokens=8
    )


def test_an_upload_under_a_taken_name_is_409(
    server: LiveServer, adapter_dirs: dict[str, Path]
) -> None:
    name = adapter_name(0)
    response = upload(server, name, adapter_dirs[name])
    assert response.status_code == 409
    err = response.json()["error"]
    assert (err["message"], err["param"]) == (f"adapter {name!r} already exists", "name")


def test_an_upload_that_fails_validation_is_400_and_stores_nothing(
    server: LiveServer, spare_adapters: Path
) -> None:
    before = stored_entries(server)
    response = upload(server, "rank-too-big", spare_adapters / "too-big-rank")
    assert response.status_code == 400
    assert "16" in response.json()["error"]["message"]
    assert "--max-lora-rank" in response.json()["error"]["message"]
    with server.client() as http:
        assert http.get("/v1/adapters/rank-too-big").status_code == 404
    assert stored_entries(server) == before


def test_an_upload_without_weights_is_400_naming_the_missing_file(
    server: LiveServer, spare_adapters: Path
) -> None:
    config = (spare_adapters / "spare-2" / CONFIG_FILE).read_bytes()
    with server.client(admin=True) as http:
        response = http.post(
            "/v1/adapters", data={"name": "no-weights"}, files={"files": (CONFIG_FILE, config)}
        )
    assert response.status_code == 400
    assert WEIGHTS_FILE in response.json()["error"]["message"]


def test_pickled_weights_are_refused(server: LiveServer, spare_adapters: Path) -> None:
    config = (spare_adapters / "spare-2" / CONFIG_FILE).read_bytes()
    files = [("files", (CONFIG_FILE, config)), ("files", ("adapter_model.bin", b"\x80\x04K."))]
    with server.client(admin=True) as http:
        response = http.post("/v1/adapters", data={"name": "pickled"}, files=files)
    assert response.status_code == 400
    assert "pickle" in response.json()["error"]["message"]


def test_an_upload_without_a_name_is_400(server: LiveServer, spare_adapters: Path) -> None:
    with server.client(admin=True) as http:
        response = http.post("/v1/adapters", files=upload_files(spare_adapters / "spare-2"))
    assert response.status_code == 400
    err = response.json()["error"]
    assert (err["message"], err["param"]) == ("the form field 'name' is required", "name")


def test_an_adapter_name_with_forbidden_characters_is_400(
    server: LiveServer, spare_adapters: Path
) -> None:
    response = upload(server, "bad name!", spare_adapters / "spare-2")
    assert response.status_code == 400
    assert "may only contain letters, digits" in response.json()["error"]["message"]


def test_an_interrupted_upload_registers_nothing(server: LiveServer, spare_adapters: Path) -> None:
    before = stored_entries(server)
    request = httpx.Request(
        "POST",
        f"{server.url}/v1/adapters",
        headers=server.headers(admin=True),
        data={"name": "interrupted"},
        files=upload_files(spare_adapters / "spare-3"),
    )
    body = request.read()
    head = ["POST /v1/adapters HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body[: len(body) // 2])
        time.sleep(0.3)  # the server is now reading the body
    with server.client() as http:
        assert http.get("/v1/adapters/interrupted").status_code == 404
    assert wait_until(lambda: stored_entries(server) == before, timeout=5)


def test_delete_unknown_adapter_is_404(server: LiveServer) -> None:
    with server.client(admin=True) as http:
        response = http.delete("/v1/adapters/never-was")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "adapter 'never-was' does not exist"


def test_deleting_an_adapter_in_use_is_409_then_succeeds_once_it_is_idle(
    slow_server: LiveServer, spare_adapters: Path
) -> None:
    assert upload(slow_server, "busy", spare_adapters / "spare-2").status_code == 201
    body = {**_endless(), "model": "busy"}
    with slow_server.client(admin=True) as http:
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()  # kept: dropping the iterator closes the connection
            assert next(line for line in lines if line.startswith("data:"))
            refused = http.delete("/v1/adapters/busy")
            assert refused.status_code == 409
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["message"] == (
                "adapter 'busy' is in use by 1 request(s); retry when they finish"
            )
            assert http.get("/v1/adapters/busy").json()["residency"]["active_requests"] == 1
        # The stream is closed, so its request ends and the delete goes through.
        assert wait_until(lambda: http.delete("/v1/adapters/busy").status_code == 200, 10)
        assert http.get("/v1/adapters/busy").status_code == 404
    assert complete(slow_server, "busy").status_code == 404


def _endless() -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True}


def test_an_uploaded_adapter_survives_a_restart_until_it_is_deleted(
    model_dir: Path, spare_adapters: Path, tmp_path: Path
) -> None:
    live = LiveServer(model_dir, tmp_path / "data", serve_flags(**ENGINE_FLAGS)).start()
    try:
        assert upload(live, "keeper", spare_adapters / "spare-3").status_code == 201
        first = complete(live, "keeper").json()["choices"][0]["text"]
        live.restart()
        with live.client() as http:
            assert "keeper" in [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert http.get("/v1/adapters/keeper").json()["source"] == "upload"
        assert complete(live, "keeper").json()["choices"][0]["text"] == first
        with live.client(admin=True) as http:
            deleted = http.delete("/v1/adapters/keeper")
            assert deleted.json() == {"id": "keeper", "object": "adapter", "deleted": True}
            assert http.get("/v1/adapters/keeper").status_code == 404
        assert complete(live, "keeper").status_code == 404
        live.restart()
        assert complete(live, "keeper").status_code == 404
    finally:
        live.stop()


# ---- vLLM's load/unload routes --------------------------------------------------------------


def load(server: LiveServer, name: str, path: Path | str) -> httpx.Response:
    with server.client(admin=True) as http:
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(server: LiveServer, name: str) -> httpx.Response:
    with server.client(admin=True) as http:
        return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_load_lora_adapter_from_an_allowed_root_serves_it(
    server: LiveServer, adapter_roots: Path, oracle: Oracle
) -> None:
    response = load(server, "vllm-loaded", adapter_roots / "loadable-0")
    assert response.status_code == 200
    assert response.text == "Success: LoRA adapter 'vllm-loaded' added successfully."
    oracle.register("vllm-loaded", adapter_roots / "loadable-0")
    assert complete(server, "vllm-loaded").json()["choices"][0]["text"] == oracle.complete(
        "vllm-loaded", PROMPT, max_tokens=8
    )


def test_loading_a_name_that_exists_is_400(server: LiveServer, adapter_roots: Path) -> None:
    response = load(server, adapter_name(0), adapter_roots / "loadable-1")
    assert response.status_code == 400
    assert "has already been loaded" in response.json()["error"]["message"]


def test_load_lora_adapter_outside_the_roots_is_refused(
    server: LiveServer, spare_adapters: Path
) -> None:
    response = load(server, "outsider", spare_adapters / "spare-0")
    assert response.status_code == 403
    err = response.json()["error"]
    assert err["message"].endswith("is outside the allowed --adapter-roots")
    assert err["param"] == "lora_path"
    assert unload(server, "outsider").status_code == 404


def test_load_lora_adapter_through_dotdot_out_of_the_roots_is_refused(
    server: LiveServer, adapter_roots: Path, spare_adapters: Path
) -> None:
    sneaky = adapter_roots / ".." / spare_adapters.name / "spare-0"
    assert sneaky.is_dir()
    assert load(server, "sneaky", sneaky).status_code == 403


def test_load_lora_adapter_through_a_symlink_out_of_the_roots_is_refused(
    server: LiveServer, adapter_roots: Path, spare_adapters: Path
) -> None:
    link = adapter_roots / "link-out"
    link.symlink_to(spare_adapters / "spare-0", target_is_directory=True)
    assert load(server, "linked-dir", link).status_code == 403


def test_load_lora_adapter_with_a_file_linked_out_of_the_roots_is_refused(
    server: LiveServer, adapter_roots: Path, spare_adapters: Path
) -> None:
    inside = adapter_roots / "file-link"
    inside.mkdir()
    (inside / CONFIG_FILE).write_bytes((spare_adapters / "spare-0" / CONFIG_FILE).read_bytes())
    (inside / WEIGHTS_FILE).symlink_to(spare_adapters / "spare-0" / WEIGHTS_FILE)
    response = load(server, "linked-file", inside)
    assert response.status_code == 403
    assert response.json()["error"]["param"] == "lora_path"


def test_load_lora_adapter_with_a_nul_byte_in_the_path_is_400(
    server: LiveServer, adapter_roots: Path
) -> None:
    response = load(server, "nul", f"{adapter_roots}/loadable-0\x00")
    assert response.status_code == 400
    err = response.json()["error"]
    assert err["param"] == "lora_path"
    assert "is not usable: embedded null byte" in err["message"]


def test_unload_lora_adapter_removes_it(server: LiveServer, adapter_roots: Path) -> None:
    assert load(server, "short-lived", adapter_roots / "loadable-1").status_code == 200
    response = unload(server, "short-lived")
    assert response.status_code == 200
    assert response.text == "Success: LoRA adapter 'short-lived' removed successfully."
    assert complete(server, "short-lived").status_code == 404


def test_unloading_an_unknown_adapter_is_404(server: LiveServer) -> None:
    response = unload(server, "never-loaded")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "the lora adapter 'never-loaded' cannot be found"
