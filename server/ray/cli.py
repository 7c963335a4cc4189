"""`loraplex serve-ray --replicas N [every serve flag]`: the same HTTP API through Ray Serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import ConfigError, ServerConfig, option
from server.options import add_config_flags, add_serve_flags, config_from_args, serve_configs

if TYPE_CHECKING:
    from ray.serve import Application

logger = logging.getLogger(__name__)
APP_NAME = "loraplex"
SHARED_STORE_DIR = "shared-adapters"


@dataclass(frozen=True)
class RayConfig:
    """The cluster's settings, beside every `serve` flag."""

    replicas: int = option(1, "engine replicas")
    ray_address: str | None = option(None, "join this Ray cluster (default: start a local one)")
    gpus_per_replica: float | None = option(None, "GPUs per replica (default: 1 with CUDA, else 0)")
    cpus_per_replica: float = option(1.0, "CPUs Ray reserves per replica")

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every `serve` flag, plus the cluster's."""
    add_serve_flags(parser)
    add_config_flags(parser.add_argument_group("ray"), RayConfig)


def application(args: argparse.Namespace) -> tuple[Application, ServerConfig, RayConfig]:
    """The Serve application for parsed `serve-ray` flags, its server and cluster settings."""
    import torch

    from server.ray.deployments import build_app

    ray_config = config_from_args(RayConfig, args)
    server, engine = serve_configs(args)
    model = str(Path(str(engine.model)).resolve())
    data_dir = Path(server.data_dir).resolve()
    # Replicas share adapters only through a shared store: default to one in --data-dir
    # (fine on one node; give s3:// or a shared mount for several nodes).
    store = server.adapter_store or f"file://{data_dir / SHARED_STORE_DIR}"
    server = dataclasses.replace(server, data_dir=str(data_dir), adapter_store=store)
    engine = dataclasses.replace(engine, model=model)
    gpus = ray_config.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if engine.device != "cpu" and torch.cuda.is_available() else 0.0
    app = build_app(server, engine, ray_config.replicas, gpus, ray_config.cpus_per_replica)
    return app, server, ray_config


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app, and serve until SIGTERM or SIGINT."""
    import ray
    from ray import serve

    app, server, cluster = application(args)
    ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    logger.info(
        "serving on http://%s:%d through Ray Serve: %d replicas, adapters in %s",
        server.host,
        server.port,
        cluster.replicas,
        server.adapter_store,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down")
    serve.shutdown()
    ray.shutdown()
    return 0
