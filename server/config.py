"""Engine configuration, validated once at start-up and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

QUANTIZE_CHOICES = ("auto", "nf4", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
LORA_BACKEND_CHOICES = ("auto", "torch", "triton")
KERNEL_BACKEND_CHOICES = ("auto", "torch", "triton")
DEFAULT_CPU_POOL_MB = 1024


class ConfigError(ValueError):
    """A setting that cannot work, named with the flag that sets it."""


def option(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, sep: str | None = None
) -> Any:
    """A config field that is also a command-line flag (`--field-name`, its default read from
    LORAPLEX_FIELD_NAME): server.options builds the flag from this help and the field's type.
    `sep`: a tuple field given as one string split at sep (values that hold the path
    separator, which otherwise splits the variable, e.g. URLs)."""
    return field(default=default, metadata={"help": help, "choices": choices, "sep": sep})


@dataclass
class EngineConfig:
    """The engine's settings; each field with help is a `serve` flag (server.options)."""

    # A local Hugging Face directory: the CLI resolves --model (a GGUF file, the default
    # model) to one.
    model: str | None = option(
        None,
        "Hugging Face model directory, .gguf file or folder holding one; "
        "default: SmolLM2-135M-Instruct (docs/operations.md)",
    )
    # auto: NF4 only where memory is the constraint (model/precision.py).
    quantize: str = option(
        "auto",
        "base weight format; auto: nf4 when the unquantized weights exceed 1/8 of the "
        "device's memory, else none",
        choices=QUANTIZE_CHOICES,
    )
    dtype: str = option("auto", "compute dtype", choices=DTYPE_CHOICES)
    device: str = option("auto", "device", choices=DEVICE_CHOICES)
    # Default: the model's max_position_embeddings.
    max_model_len: int | None = option(None, "longest prompt + output, in tokens")
    max_num_seqs: int = option(64, "sequences per batch")
    max_num_batched_tokens: int = option(2048, "tokens per step")
    # Grown so a page fits the largest matrix of a --max-lora-rank adapter.
    block_size: int = option(16, "minimum tokens per KV block")
    # Default: the GPU's share left after reserves, 1 GiB on CPU.
    pool_mb: int | None = option(None, "device page pool size (KV cache + adapters)")
    num_pages: int | None = option(None, "exact page pool size in pages (overrides --pool-mb)")
    gpu_memory_utilization: float = option(
        0.9, "share of the GPU for weights, the largest step's activations and the page pool"
    )
    training_memory_mb: int = option(
        0,
        "GPU memory kept out of the page pool for fine-tuning, and the most one job may use "
        "(0: none kept; a job may use what serving leaves free)",
    )
    enforce_eager: bool = option(False, "no CUDA graphs for decode steps")
    enable_prefix_caching: bool = option(
        True, "reuse the KV of prompt prefixes already computed under the same adapter"
    )
    max_lora_rank: int = option(64, "largest adapter rank accepted")
    max_loras: int = option(32, "adapters resident on the device at once")
    # Auto: triton on CUDA, torch on CPU.
    lora_backend: str = option("auto", "batched LoRA implementation", choices=LORA_BACKEND_CHOICES)
    kernel_backend: str = option(
        "auto", "NF4 matmul and paged attention implementation", choices=KERNEL_BACKEND_CHOICES
    )
    host_cache_mb: int = option(2048, "host memory for cached adapter weights")
    seed: int = option(0, "seed for requests that give none")
    chat_template: str | None = option(
        None, "jinja file used instead of the model's own chat template"
    )
    generation_config: str = option(
        "auto",
        "request defaults: auto (the model's generation_config.json), vllm (none), or a folder",
    )

    def __post_init__(self) -> None:
        _choice("--quantize", self.quantize, QUANTIZE_CHOICES)
        _choice("--dtype", self.dtype, DTYPE_CHOICES)
        _choice("--device", self.device, DEVICE_CHOICES)
        _choice("--lora-backend", self.lora_backend, LORA_BACKEND_CHOICES)
        _choice("--kernel-backend", self.kernel_backend, KERNEL_BACKEND_CHOICES)
        for flag, value in (
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--block-size", self.block_size),
            ("--max-lora-rank", self.max_lora_rank),
            ("--max-loras", self.max_loras),
            ("--host-cache-mb", self.host_cache_mb),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.pool_mb is not None and self.pool_mb < 1:
            raise ConfigError(f"--pool-mb must be >= 1, got {self.pool_mb}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigError(f"--num-pages must be >= 1, got {self.num_pages}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.training_memory_mb < 0:
            raise ConfigError(f"--training-memory-mb must be >= 0, got {self.training_memory_mb}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class ServerConfig:
    """HTTP-side settings; the engine's are in EngineConfig. Each field with help is a flag."""

    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "port")
    data_dir: str = option("./data", "adapter store, files and jobs (SQLite + blobs)")
    # Default: the model directory's name.
    served_model_name: str | None = option(None, "name of the base model in the API")
    api_key: str | None = option(None, "key for inference routes (docs/api.md, Authentication)")
    admin_api_key: str | None = option(None, "key for training data, jobs and mutations; opens all")
    metrics_port: int | None = option(None, "also serve /metrics here, without keys")
    metrics_max_adapters: int = option(
        100, "adapters with per-adapter series of their own; 0: none (docs/operations.md)"
    )
    metrics_vllm_names: bool = option(
        False, "also export the metrics routers read under vLLM's `vllm:` names"
    )
    allowed_hosts: tuple[str, ...] = option((), "Host header names accepted (default: any)")
    # Commas, not the path separator other lists use: every origin holds a ':'.
    csrf_trusted_origins: tuple[str, ...] = option(
        (),
        "comma-separated origins (https://tool.example:8443) whose pages may send writes here",
        sep=",",
    )
    preload_adapters: tuple[str, ...] = option((), "adapter directories (or folders of them)")
    adapter_roots: tuple[str, ...] = option(
        (), "directories, s3://bucket/prefix and hf://org entries /v1/load_lora_adapter may read"
    )
    # None: data_dir's own.
    adapter_store: str | None = option(
        None, "shared adapter store: file:///path or s3://bucket/prefix"
    )
    adapter_store_poll_s: float = option(2.0, "how often a shared store is re-listed")
    s3_endpoint_url: str | None = option(None, "S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    max_upload_mb: int = option(512, "largest upload (or PUT reload) accepted")
    max_request_body_mb: int = option(4, "largest body of any other request")
    request_body_timeout_s: float = option(60.0, "time a whole request body may take")
    max_concurrent_requests: int = option(
        512, "requests in flight before 503 (/health, /ready, /metrics excepted)"
    )
    # Default: 3/4 of --max-concurrent-requests (rounded up), so other tenants keep a quarter.
    max_key_concurrent_requests: int | None = option(
        None,
        "requests one API key (or keyless client) may have in flight before 429; "
        "default: 3/4 of --max-concurrent-requests",
    )
    send_timeout_s: float = option(
        30.0, "time a response may wait for its client to read before the client is dropped"
    )
    max_waiting: int = option(1024, "queued requests before 429")
    max_key_sequences: int = option(
        512, "sequences (prompts x n) one API key (or keyless client) may have in flight"
    )
    max_key_prompt_tokens: int = option(
        262144, "prompt tokens one API key (or keyless client) may have in flight"
    )
    merge_cache_mb: int = option(
        512, "host memory for merged adapters (merged_adapters); 503 when those in use fill it"
    )
    log_level: str = option("info", "logging level")
    max_concurrent_jobs: int = option(1, "fine-tuning jobs that train at once")
    # Default: half the cores.
    training_threads: int | None = option(None, "CPU threads per training job")
    max_queued_jobs: int = option(64, "fine-tuning jobs waiting to train before 429")
    # Not a flag of its own: EngineConfig.training_memory_mb, on the job side (None for 0).
    training_memory_mb: int | None = None
    max_file_mb: int = option(512, "largest file accepted by /v1/files")
    data_quota_mb: int | None = option(None, "files + adapters + job outputs in --data-dir")

    @property
    def key_concurrent_requests(self) -> int:
        """Requests one tenant may have in flight (--max-key-concurrent-requests resolved)."""
        if self.max_key_concurrent_requests is not None:
            return self.max_key_concurrent_requests
        return -(-self.max_concurrent_requests * 3 // 4)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port must be in 1..65535, got {self.metrics_port}")
        if self.metrics_port == self.port:
            raise ConfigError(f"--metrics-port must differ from --port ({self.port})")
        if self.metrics_max_adapters < 0:
            raise ConfigError(
                f"--metrics-max-adapters must be >= 0, got {self.metrics_max_adapters}"
            )
        if self.api_key is not None and self.api_key == self.admin_api_key:
            raise ConfigError("--api-key and --admin-api-key must differ")
        for host in self.allowed_hosts:
            _host_pattern(host)
        for origin in self.csrf_trusted_origins:
            _origin(origin)
        if not self.adapter_store_poll_s > 0:
            raise ConfigError(
                f"--adapter-store-poll-s must be > 0, got {self.adapter_store_poll_s}"
            )
        if self.adapter_store is not None and not self.adapter_store.startswith(
            ("file://", "s3://")
        ):
            raise ConfigError(
                f"--adapter-store must be a file:// or s3:// URL, got {self.adapter_store!r}"
            )
        if self.max_upload_mb < 1:
            raise ConfigError(f"--max-upload-mb must be >= 1, got {self.max_upload_mb}")
        if self.max_request_body_mb < 1:
            raise ConfigError(f"--max-request-body-mb must be >= 1, got {self.max_request_body_mb}")
        if not self.request_body_timeout_s > 0:
            raise ConfigError(
                f"--request-body-timeout-s must be > 0, got {self.request_body_timeout_s}"
            )
        if self.max_concurrent_requests < 1:
            raise ConfigError(
                f"--max-concurrent-requests must be >= 1, got {self.max_concurrent_requests}"
            )
        if not self.send_timeout_s > 0:
            raise ConfigError(f"--send-timeout-s must be > 0, got {self.send_timeout_s}")
        if self.max_waiting < 1:
            raise ConfigError(f"--max-waiting must be >= 1, got {self.max_waiting}")
        if self.max_key_concurrent_requests is not None and self.max_key_concurrent_requests < 1:
            raise ConfigError(
                "--max-key-concurrent-requests must be >= 1, got "
                f"{self.max_key_concurrent_requests}"
            )
        if self.max_key_sequences < 1:
            raise ConfigError(f"--max-key-sequences must be >= 1, got {self.max_key_sequences}")
        if self.max_key_prompt_tokens < 1:
            raise ConfigError(
                f"--max-key-prompt-tokens must be >= 1, got {self.max_key_prompt_tokens}"
            )
        if self.merge_cache_mb < 1:
            raise ConfigError(f"--merge-cache-mb must be >= 1, got {self.merge_cache_mb}")
        if self.max_queued_jobs < 1:
            raise ConfigError(f"--max-queued-jobs must be >= 1, got {self.max_queued_jobs}")
        if self.training_memory_mb is not None and self.training_memory_mb < 1:
            raise ConfigError(f"--training-memory-mb must be >= 1, got {self.training_memory_mb}")
        if self.max_file_mb < 1:
            raise ConfigError(f"--max-file-mb must be >= 1, got {self.max_file_mb}")
        if self.data_quota_mb is not None and self.data_quota_mb < 1:
            raise ConfigError(f"--data-quota-mb must be >= 1, got {self.data_quota_mb}")


def _origin(origin: str) -> None:
    """A --csrf-trusted-origins entry: scheme://host[:port], as a browser's Origin header."""
    scheme, sep, rest = origin.rstrip("/").partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
        raise ConfigError(
            f"--csrf-trusted-origins entries are origins like https://app.example:8443; "
            f"got {origin!r}"
        )


def _host_pattern(host: str) -> None:
    """A --allowed-hosts entry: a name or address (no port), `*.domain`, or `*` for any."""
    wildcard_ok = "*" not in host or host == "*" or (host.startswith("*.") and host.count("*") == 1)
    port_free = ":" not in host or (host.startswith("[") and host.endswith("]"))  # [::1]
    if not host or not wildcard_ok or not port_free:
        raise ConfigError(
            f"--allowed-hosts entries are names without a port, '*.domain' or '*'; got {host!r}"
        )
