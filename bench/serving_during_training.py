"""Serving latency with and without a fine-tuning job training in the same server.

    python -m bench.serving_during_training --requests 20

Starts `loraplex serve` on the default model (SmolLM2-135M-Instruct), times sequential
completions while idle, starts a QLoRA job, times the same completions while it trains, cancels
it, and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from bench.common import mean, percentile


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def _latencies(client: httpx.Client, model: str, n: int, max_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        r = client.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": f"The {['for', 'while', 'try', 'with'][i % 4]} statement",
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        r.raise_for_status()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--training-threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from server.model.resolve import resolve_model

    model_dir = resolve_model(None, torch.float32)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--data-dir",
            data,
            "--log-level",
            "warning",
            "--training-threads",
            str(args.training_threads),
        ]
        proc = subprocess.Popen(cmd, env=env)
        try:
            _wait_ready(url, proc)
            client = httpx.Client(base_url=url, timeout=120)
            model = client.get("/v1/models").json()["data"][0]["id"]
            _latencies(client, model, 2, args.max_tokens)  # warm-up
            idle = _latencies(client, model, args.requests, args.max_tokens)
            rows = [
                json.dumps(
                    {"prompt": f"Order: {i} {i + 1}\nAnswer:", "completion": f" {i} {i + 1}"}
                )
                for i in range(64)
            ]
            file_id = client.post(
                "/v1/files",
                files={"file": ("t.jsonl", "\n".join(rows))},
                data={"purpose": "fine-tune"},
            ).json()["id"]
            job = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": model,
                    "training_file": file_id,
                    "method": {"type": "qlora", "hyperparameters": {"max_steps": 100000}},
                },
            ).json()
            while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
                time.sleep(0.2)
            time.sleep(5)  # past the worker's start-up, into its steps
            busy = _latencies(client, model, args.requests, args.max_tokens)
            events = client.get(
                f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}
            ).json()["data"]
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    tps = [
        e["data"]["tokens_per_second"]
        for e in events
        if e["data"] and "tokens_per_second" in e["data"]
    ]
    print(
        f"SmolLM2-135M-Instruct, {args.requests} sequential completions of "
        f"{args.max_tokens} tokens, "
        f"server {args.server_threads} thread(s), training {args.training_threads} thread(s)"
    )
    for label, lat in (("idle", idle), ("during training", busy)):
        print(
            f"  {label:>16}: mean {mean(lat):.3f}s  p50 {percentile(lat, 50):.3f}s  "
            f"p95 {percentile(lat, 95):.3f}s"
        )
    print(
        f"  latency ratio (mean): {mean(busy) / mean(idle):.2f}x; training ran at "
        f"{mean(tps):.0f} tokens/s meanwhile ({len(tps)} steps sampled)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
