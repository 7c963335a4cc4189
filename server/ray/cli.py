"""`loraplex serve-ray --replicas N [every serve flag]`: the same HTTP API through Ray Serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

    from server.config import ServerConfig

logger = logging.getLogger(__name__)
APP_NAME = "loraplex"
SHARED_STORE_DIR = "shared-adapters"


def add_parser(sub: Any) -> None:
    """Register `serve-ray`: every `serve` flag, plus the cluster's."""
    from server.cli import _add, add_engine_args, add_server_args

    p = sub.add_parser("serve-ray", help="run the HTTP server on Ray Serve, over N replicas")
    add_engine_args(p)
    add_server_args(p)
    g = p.add_argument_group("ray")
    _add(g, "--replicas", 1, "engine replicas", type=int)
    _add(g, "--ray-address", None, "join this Ray cluster (default: start a local one)")
    _add(
        g, "--gpus-per-replica", None, "GPUs per replica (default: 1 with CUDA, else 0)", type=float
    )
    _add(g, "--cpus-per-replica", 1.0, "CPUs Ray reserves per replica", type=float)
    p.set_defaults(func=run)


def application(args: argparse.Namespace) -> tuple[Application, ServerConfig]:
    """The Serve application for parsed `serve-ray` flags, and its server settings."""
    import torch

    from server.cli import engine_config, server_config
    from server.config import ConfigError
    from server.ray.deployments import build_app

    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    server = server_config(args)
    data_dir = Path(server.data_dir).resolve()
    # Replicas share adapters only through a shared store: default to one in --data-dir
    # (fine on one node; give s3:// or a shared mount for several nodes).
    store = server.adapter_store or f"file://{data_dir / SHARED_STORE_DIR}"
    server = dataclasses.replace(server, data_dir=str(data_dir), adapter_store=store)
    engine = engine_config(args)
    engine.model = str(Path(str(engine.model)).resolve())
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if engine.device != "cpu" and torch.cuda.is_available() else 0.0
    return build_app(server, engine, args.replicas, gpus, args.cpus_per_replica), server


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app, and serve until SIGTERM or SIGINT."""
    import ray
    from ray import serve

    app, server = application(args)
    ray.init(address=args.ray_address, logging_level=logging.WARNING)
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    logger.info(
        "serving on http://%s:%d through Ray Serve: %d replicas, adapters in %s",
        server.host,
        server.port,
        args.replicas,
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
