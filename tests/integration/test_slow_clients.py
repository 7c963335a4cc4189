"""Clients that never read cannot hold the server's request slots: past --send-timeout-s a
response that waits on its client is dropped, its slot freed and its engine work aborted."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, sequences_in_engine, serve_flags
from tests.integration.live_server import LiveServer

MAX_CONCURRENT = 10
SEND_TIMEOUT_S = 2.0
# Each stream outgrows the socket buffers (16 samples x 480 tokens with 20 logprobs each:
# ~4.7 MB of SSE, past Linux's largest autotuned send buffer, 4 MB), so writes block once
# the unread buffers fill.
SAMPLES = 16
STREAM = {"n": SAMPLES, "max_tokens": 480, "logprobs": 20, "ignore_eos": True, "stream": True}
# Served within this long of the ten streams being sent: their generation (a few seconds on
# the tiny model), then the send timeout, with room for a loaded 2-core machine.
SERVED_WITHIN_S = 45.0


@pytest.fixture(scope="module")
def slot_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    args = serve_flags(
        **{**ENGINE_FLAGS, "max_model_len": 512, "max_num_seqs": 160, "pool_mb": 96},
        served_model_name=MODEL_NAME,
        max_concurrent_requests=MAX_CONCURRENT,
        # All the test's clients share one address (one tenant): the global slots are tested.
        max_key_concurrent_requests=MAX_CONCURRENT,
        send_timeout_s=SEND_TIMEOUT_S,
    )
    data = tmp_path_factory.mktemp("slow-clients") / "data"
    live = LiveServer(model_dir, data, args, api_key=None, admin_key=None).start()
    yield live
    live.stop()


def never_reading_stream(server: LiveServer) -> socket.socket:
    """A socket that sends one streaming completion and then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps({"model": MODEL_NAME, "prompt": "Once upon a time", **STREAM}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_ten_clients_that_never_read_free_their_slots_after_the_send_timeout(
    slot_server: LiveServer,
) -> None:
    """Issue 22: ten never-reading streams (--max-concurrent-requests 10) made every other
    request a 503 until they hung up. Now another client is served within the bound, and
    the engine holds none of their sequences."""
    socks = [never_reading_stream(slot_server) for _ in range(MAX_CONCURRENT)]
    try:
        start = time.monotonic()
        while sequences_in_engine(slot_server) < MAX_CONCURRENT * SAMPLES:  # every stream admitted
            assert time.monotonic() - start < SERVED_WITHIN_S, "the streams were not admitted"
            time.sleep(0.1)
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}
        with httpx.Client(base_url=slot_server.url, timeout=30) as http:
            assert http.post("/v1/completions", json=body).status_code == 503  # all slots held
            while (status := http.post("/v1/completions", json=body).status_code) != 200:
                assert status == 503
                waited = time.monotonic() - start
                assert waited < SERVED_WITHIN_S, f"still refused after {waited:.0f} s"
                time.sleep(0.5)
        # The first dropped stream frees the slot just served; each of the others is dropped
        # when its own send times out (their buffers fill at slightly different moments), and
        # all within the bound.
        while True:
            metrics = slot_server.metrics()
            running = metrics.value("loraplex_num_requests_running", model_name=MODEL_NAME)
            waiting = metrics.value("loraplex_num_requests_waiting", model_name=MODEL_NAME)
            if running == waiting == 0:
                break
            waited = time.monotonic() - start
            assert waited < SERVED_WITHIN_S, f"{running} running, {waiting} waiting, {waited:.0f} s"
            time.sleep(0.2)
        # Each stream had started (its first bytes sat unread in the socket) before the drop.
        for sock in socks:
            assert sock.recv(12) == b"HTTP/1.1 200"
    finally:
        for sock in socks:
            sock.close()
