"""Engine configuration, validated once at start-up and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZE_CHOICES = ("auto", "nf4", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
LORA_BACKEND_CHOICES = ("auto", "torch", "triton")
KERNEL_BACKEND_CHOICES = ("auto", "torch", "triton")
DEFAULT_CPU_POOL_MB = 1024


class ConfigError(ValueError):
    """A setting that cannot work, named with the flag that sets it."""


@dataclass
class EngineConfig:
    model: str | None = None  # a local Hugging Face directory (the CLI converts GGUF files)
    quantize: str = "auto"  # auto: NF4 only where memory is the constraint (model/precision.py)
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16  # minimum tokens per KV block; grown so a page fits an adapter matrix
    pool_mb: int | None = None  # default: the GPU's share left after reserves, 1 GiB on CPU
    # Share of the GPU's memory the server may use: weights + activation reserve + pool.
    gpu_memory_utilization: float = 0.9
    training_memory_mb: int = 0  # reserved on the GPU for a fine-tuning worker
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    enable_prefix_caching: bool = True  # reuse cached KV blocks of shared prompt prefixes
    num_pages: int | None = None  # exact pool size in pages; overrides --pool-mb (tests, bench)
    max_lora_rank: int = 64
    max_loras: int = 32  # adapters resident on the device at once
    lora_backend: str = "auto"  # triton on CUDA, torch on CPU
    kernel_backend: str = "auto"  # NF4 matmul and paged attention: triton on CUDA, torch on CPU
    host_cache_mb: int = 2048
    seed: int = 0
    chat_template: str | None = None  # a jinja file overriding the checkpoint's template
    generation_config: str = "auto"  # auto: the model's sampling defaults; vllm: none; a folder

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
    """HTTP-side settings; the engine's are in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "./data"
    served_model_name: str | None = None  # default: the model directory's name
    api_key: str | None = None  # inference routes
    admin_api_key: str | None = None  # training data, job internals and mutations
    metrics_port: int | None = None  # a second port serving only /metrics, without keys
    metrics_max_adapters: int = 100  # adapters with series of their own (requests, residency)
    metrics_vllm_names: bool = False  # also export router-read metrics under vLLM's names
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted; empty: any
    csrf_trusted_origins: tuple[str, ...] = ()  # other origins whose pages may write here
    preload_adapters: tuple[str, ...] = ()  # directories of adapters, or folders of them
    adapter_roots: tuple[str, ...] = ()  # where /v1/load_lora_adapter may read from
    adapter_store: str | None = None  # a shared store's fsspec URL; None: data_dir's own
    adapter_store_poll_s: float = 2.0  # how often a shared store is re-listed
    s3_endpoint_url: str | None = None  # for s3:// stores and URIs; default: AWS_ENDPOINT_URL
    max_upload_mb: int = 512
    max_request_body_mb: int = 4  # every other route's body
    request_body_timeout_s: float = 60.0  # a whole body must arrive within this
    max_concurrent_requests: int = 512  # in flight before 503 (probes excepted)
    max_waiting: int = 1024  # queued requests before 429
    log_level: str = "info"
    max_concurrent_jobs: int = 1  # fine-tuning jobs training at once
    training_threads: int | None = None  # CPU threads per job; default half the cores
    max_queued_jobs: int = 64  # fine-tuning jobs waiting to train before 429
    training_memory_mb: int | None = None  # device memory one job may use; None: what is free
    max_file_mb: int = 512  # one uploaded file (the body is also held to max_upload_mb)
    data_quota_mb: int | None = None  # files + adapters + job outputs in data_dir; None: no quota

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
        if self.max_waiting < 1:
            raise ConfigError(f"--max-waiting must be >= 1, got {self.max_waiting}")
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
