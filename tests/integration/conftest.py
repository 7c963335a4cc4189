"""Fixtures for tests against the real HTTP server: a chat-capable tiny model, 32 PEFT
adapters, the servers themselves, and the engine run offline as the oracle."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.setup import open_registry
from tests.integration.live_server import LiveServer
from tests.peft_reference import save_peft_adapter

MODEL_NAME = "tiny-chat"
MAX_LORA_RANK = 8
MAX_MODEL_LEN = 128
LONG_MODEL_LEN = 16384  # past the tiny model's 256 positions: fine for random weights
NUM_ADAPTERS = 32
# A minimal template in the usual shape; the tiny checkpoints ship none.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# LoraConfig arguments, cycled over the preloaded adapters so ranks and targets mix.
LORA_CONFIGS: list[dict[str, Any]] = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    dict(r=2, lora_alpha=4, target_modules="all-linear"),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
]
# Engine flags the main server and the offline oracle share.
ENGINE_FLAGS = dict(
    quantize="none",
    dtype="float32",
    device="cpu",
    max_lora_rank=MAX_LORA_RANK,
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=64,
    max_loras=NUM_ADAPTERS,
    pool_mb=16,
)


def adapter_name(i: int) -> str:
    return f"lora-{i:02d}"


def sequences_in_engine(server: LiveServer, model_name: str = MODEL_NAME) -> float:
    """Sequences running or waiting in the engine (from /metrics, which is never refused)."""
    metrics = server.metrics()
    return sum(
        metrics.value(f"loraplex_num_requests_{state}", model_name=model_name)
        for state in ("running", "waiting")
    )


def serve_flags(**flags: Any) -> list[str]:
    """`serve` command-line flags from keyword arguments (max_lora_rank -> --max-lora-rank)."""
    args: list[str] = []
    for key, value in flags.items():
        if key in ("quantize", "dtype", "device"):
            continue  # LiveServer always passes these
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="session")
def model_dir(
    tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny Llama, copied under MODEL_NAME with a chat template added."""
    path = tmp_path_factory.mktemp("models") / MODEL_NAME
    shutil.copytree(tiny_model_dir("llama"), path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """NUM_ADAPTERS PEFT adapters on the tiny model (mixed ranks and targets), by name."""
    root = tmp_path_factory.mktemp("preload")
    return {
        adapter_name(i): save_peft_adapter(
            model_dir, root / adapter_name(i), seed=i, **LORA_CONFIGS[i % len(LORA_CONFIGS)]
        )
        for i in range(NUM_ADAPTERS)
    }


@pytest.fixture(scope="session")
def spare_adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of adapters not preloaded: for uploads and vLLM-style loads."""
    root = tmp_path_factory.mktemp("spare")
    for i, cfg in enumerate(LORA_CONFIGS):
        save_peft_adapter(model_dir, root / f"spare-{i}", seed=100 + i, **cfg)
    save_peft_adapter(model_dir, root / "too-big-rank", seed=200, r=16, lora_alpha=16)
    return root


@pytest.fixture(scope="session")
def adapter_roots(spare_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory the main server's /v1/load_lora_adapter may read."""
    root = tmp_path_factory.mktemp("roots")
    for i in range(2):
        shutil.copytree(spare_adapters / f"spare-{i}", root / f"loadable-{i}")
    return root


@pytest.fixture(scope="session")
def server(
    model_dir: Path,
    adapter_dirs: dict[str, Path],
    adapter_roots: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The main server: every adapter preloaded, both API keys, a 1 MB upload limit."""
    preload = next(iter(adapter_dirs.values())).parent
    args = serve_flags(**ENGINE_FLAGS, max_upload_mb=1, served_model_name=MODEL_NAME)
    args += ["--preload-adapters", str(preload), "--adapter-roots", str(adapter_roots)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("main") / "data", args).start()
    yield live
    live.stop()


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    """The openai SDK on the main server, with the inference key and no retries."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


class Oracle:
    """The engine run offline, one request at a time: what each adapter gives alone."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cache: dict[tuple, str] = {}

    def complete(self, adapter: str | None, prompt: str | list[int], **params: Any) -> str:
        """The text of one greedy (unless told otherwise) request, run alone."""
        params.setdefault("temperature", 0.0)
        key = (adapter, str(prompt), tuple(sorted(params.items())))
        if key not in self._cache:
            out = self.engine.generate([prompt], SamplingParams(**params), [adapter])
            self._cache[key] = out[0].text
        return self._cache[key]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids the server builds from chat messages."""
        tok = self.engine.tokenizer
        return tok.encode(tok.apply_chat_template(messages, True), add_special_tokens=False)

    def chat(self, adapter: str | None, messages: list[dict[str, str]], **params: Any) -> str:
        return self.complete(adapter, self.chat_prompt(messages), **params)

    def tokens(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def register(self, name: str, path: Path) -> None:
        """Make another adapter known to the oracle (as uploads make it known to the server)."""
        assert self.engine.registry is not None
        if self.engine.registry.get(name) is None:
            self.engine.registry.register_dir(name, path, source="path")


@pytest.fixture(scope="session")
def oracle(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Oracle:
    config = EngineConfig(model=str(model_dir), **ENGINE_FLAGS)  # type: ignore[arg-type]
    registry = open_registry(tmp_path_factory.mktemp("oracle"), config)
    for name, path in adapter_dirs.items():
        registry.register_dir(name, path, source="preload")
    return Oracle(LLMEngine(config, registry=registry))


@pytest.fixture(scope="session")
def slow_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One sequence at a time, one waiting at most, and room for very long outputs: a request
    stays in flight as long as a test needs (it ends when its client goes away)."""
    args = serve_flags(
        **{**ENGINE_FLAGS, "max_model_len": LONG_MODEL_LEN, "max_num_seqs": 1},
        max_waiting=1,
        served_model_name=MODEL_NAME,
    )
    live = LiveServer(model_dir, tmp_path_factory.mktemp("slow") / "data", args).start()
    yield live
    live.stop()
