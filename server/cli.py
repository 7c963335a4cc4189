"""`loraplex serve | serve-ray | finetune`; flags also read LORAPLEX_<FLAG> from the env."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from server.config import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    KERNEL_BACKEND_CHOICES,
    LORA_BACKEND_CHOICES,
    QUANTIZE_CHOICES,
    ConfigError,
    EngineConfig,
    ServerConfig,
)

logger = logging.getLogger("loraplex")
KEEP_ALIVE_S = 65  # idle HTTP keep-alive, seconds


def _env_name(flag: str) -> str:
    return "LORAPLEX_" + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, default: Any, help: str, **kw: Any) -> None:
    """A flag whose default comes from LORAPLEX_<FLAG> when set (argparse applies `type`)."""
    env = os.environ.get(_env_name(flag))
    # An empty value counts as unset: compose files pass `LORAPLEX_API_KEY: ${KEY:-}`, and an
    # empty API key would otherwise lock every route.
    if env:
        if kw.get("nargs") == "*":
            default = [v for v in env.split(os.pathsep) if v]
        elif kw.get("action") in ("store_true", argparse.BooleanOptionalAction):
            default = env.lower() in ("1", "true", "yes", "on")
        else:
            default = env
    parser.add_argument(flag, default=default, help=f"{help} (env {_env_name(flag)})", **kw)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    _add(
        g,
        "--model",
        None,
        "Hugging Face model directory, .gguf file or folder holding one; "
        "default: SmolLM2-135M-Instruct (docs/operations.md)",
    )
    _add(
        g,
        "--quantize",
        "auto",
        "base weight format; auto: nf4 when the unquantized weights exceed 1/8 of the "
        "device's memory, else none",
        choices=QUANTIZE_CHOICES,
    )
    _add(g, "--dtype", "auto", "compute dtype", choices=DTYPE_CHOICES)
    _add(g, "--device", "auto", "device", choices=DEVICE_CHOICES)
    _add(g, "--max-model-len", None, "longest prompt + output, in tokens", type=int)
    _add(g, "--max-num-seqs", 64, "sequences per batch", type=int)
    _add(g, "--max-num-batched-tokens", 2048, "tokens per step", type=int)
    _add(g, "--block-size", 16, "minimum tokens per KV block", type=int)
    _add(g, "--pool-mb", None, "device page pool size (KV cache + adapters)", type=int)
    _add(g, "--num-pages", None, "exact page pool size in pages (overrides --pool-mb)", type=int)
    _add(
        g,
        "--gpu-memory-utilization",
        0.9,
        "share of the GPU for weights, the largest step's activations and the page pool",
        type=float,
    )
    _add(
        g,
        "--training-memory-mb",
        0,
        "GPU memory kept out of the page pool for fine-tuning, and the most one job may use "
        "(0: none kept; a job may use what serving leaves free)",
        type=int,
    )
    _add(g, "--enforce-eager", False, "no CUDA graphs for decode steps", action="store_true")
    _add(
        g,
        "--enable-prefix-caching",
        True,
        "reuse the KV of prompt prefixes already computed under the same adapter",
        action=argparse.BooleanOptionalAction,
    )
    _add(g, "--max-lora-rank", 64, "largest adapter rank accepted", type=int)
    _add(g, "--max-loras", 32, "adapters resident on the device at once", type=int)
    _add(g, "--lora-backend", "auto", "batched LoRA implementation", choices=LORA_BACKEND_CHOICES)
    _add(
        g,
        "--kernel-backend",
        "auto",
        "NF4 matmul and paged attention implementation",
        choices=KERNEL_BACKEND_CHOICES,
    )
    _add(g, "--host-cache-mb", 2048, "host memory for cached adapter weights", type=int)
    _add(g, "--seed", 0, "seed for requests that give none", type=int)
    _add(g, "--chat-template", None, "jinja file used instead of the model's own chat template")
    _add(
        g,
        "--generation-config",
        "auto",
        "request defaults: auto (the model's generation_config.json), vllm (none), or a folder",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings of parsed flags, --model resolved to a Hugging Face directory
    (a GGUF file or the default model converted once into the cache)."""
    from server.model.resolve import resolve_model

    config = _engine_settings(args)
    config.model = str(resolve_model(args.model, config.torch_dtype))
    return config


def _engine_settings(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        quantize=args.quantize,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        pool_mb=args.pool_mb,
        num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization,
        training_memory_mb=args.training_memory_mb,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        lora_backend=args.lora_backend,
        kernel_backend=args.kernel_backend,
        host_cache_mb=args.host_cache_mb,
        seed=args.seed,
        chat_template=args.chat_template,
        generation_config=args.generation_config,
    )


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP server")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=_serve)


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    _add(g, "--host", "127.0.0.1", "interface to listen on")
    _add(g, "--port", 8000, "port", type=int)
    _add(g, "--data-dir", "./data", "adapter store, files and jobs (SQLite + blobs)")
    _add(g, "--served-model-name", None, "name of the base model in the API")
    _add(g, "--api-key", None, "key for inference routes (docs/api.md, Authentication)")
    _add(g, "--admin-api-key", None, "key for training data, jobs and mutations; opens all")
    _add(g, "--metrics-port", None, "also serve /metrics here, without keys", type=int)
    _add(
        g,
        "--metrics-max-adapters",
        100,
        "adapters with per-adapter series of their own; 0: none (docs/operations.md)",
        type=int,
    )
    _add(
        g,
        "--metrics-vllm-names",
        False,
        "also export the metrics routers read under vLLM's `vllm:` names",
        action="store_true",
    )
    _add(g, "--allowed-hosts", [], "Host header names accepted (default: any)", nargs="*")
    _add(
        g,
        "--csrf-trusted-origins",
        "",
        "comma-separated origins (https://tool.example:8443) whose pages may send writes here",
    )
    _add(g, "--preload-adapters", [], "adapter directories (or folders of them)", nargs="*")
    _add(
        g,
        "--adapter-roots",
        [],
        "directories, s3://bucket/prefix and hf://org entries /v1/load_lora_adapter may read",
        nargs="*",
    )
    _add(g, "--adapter-store", None, "shared adapter store: file:///path or s3://bucket/prefix")
    _add(g, "--adapter-store-poll-s", 2.0, "how often a shared store is re-listed", type=float)
    _add(g, "--s3-endpoint-url", None, "S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    _add(g, "--max-upload-mb", 512, "largest upload (or PUT reload) accepted", type=int)
    _add(g, "--max-request-body-mb", 4, "largest body of any other request", type=int)
    _add(g, "--request-body-timeout-s", 60.0, "time a whole request body may take", type=float)
    _add(
        g,
        "--max-concurrent-requests",
        512,
        "requests in flight before 503 (/health, /ready, /metrics excepted)",
        type=int,
    )
    _add(g, "--max-waiting", 1024, "queued requests before 429", type=int)
    _add(g, "--log-level", "info", "logging level")
    _add(g, "--max-concurrent-jobs", 1, "fine-tuning jobs that train at once", type=int)
    _add(g, "--training-threads", None, "CPU threads per training job", type=int)
    _add(g, "--max-queued-jobs", 64, "fine-tuning jobs waiting to train before 429", type=int)
    _add(g, "--max-file-mb", 512, "largest file accepted by /v1/files", type=int)
    _add(g, "--data-quota-mb", None, "files + adapters + job outputs in --data-dir", type=int)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,  # an empty key is no key
        admin_api_key=args.admin_api_key or None,
        metrics_port=args.metrics_port,
        metrics_max_adapters=args.metrics_max_adapters,
        metrics_vllm_names=args.metrics_vllm_names,
        allowed_hosts=tuple(args.allowed_hosts),
        # Commas, not the path separator other lists use: every origin holds a ':'.
        csrf_trusted_origins=tuple(
            o.strip() for o in args.csrf_trusted_origins.split(",") if o.strip()
        ),
        preload_adapters=tuple(args.preload_adapters),
        adapter_roots=tuple(args.adapter_roots),
        adapter_store=args.adapter_store or None,
        adapter_store_poll_s=args.adapter_store_poll_s,
        s3_endpoint_url=args.s3_endpoint_url or None,
        max_upload_mb=args.max_upload_mb,
        max_request_body_mb=args.max_request_body_mb,
        request_body_timeout_s=args.request_body_timeout_s,
        max_concurrent_requests=args.max_concurrent_requests,
        max_waiting=args.max_waiting,
        log_level=args.log_level,
        max_concurrent_jobs=args.max_concurrent_jobs,
        training_threads=args.training_threads,
        max_queued_jobs=args.max_queued_jobs,
        training_memory_mb=args.training_memory_mb or None,  # the same budget, on the job side
        max_file_mb=args.max_file_mb,
        data_quota_mb=args.data_quota_mb,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import build_state, create_app

    server = server_config(args)
    app = create_app(build_state(server, engine_config(args)))
    logger.info(
        "listening on http://%s:%d (the model loads in the background)", server.host, server.port
    )
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level.lower(),
        # Longer than clients keep idle connections (httpx: 5 s, uvicorn's default too), so the
        # client closes first: a request sent on a connection the server is closing fails.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return 0


def _finetune_parser(sub: Any) -> None:
    from server.training import cli as training_cli

    p = sub.add_parser("finetune", help="train a QLoRA or LongLoRA adapter without the server")
    training_cli.add_arguments(p)
    p.set_defaults(func=training_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from server.ray.cli import add_parser as serve_ray_parser

    for build in (_serve_parser, serve_ray_parser, _finetune_parser):
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
