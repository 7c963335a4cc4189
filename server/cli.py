"""`loraplex serve | serve-ray | finetune`; flags also read LORAPLEX_<FLAG> from the env."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from server.config import ConfigError
from server.options import add_serve_flags, serve_configs

logger = logging.getLogger("loraplex")
KEEP_ALIVE_S = 65  # idle HTTP keep-alive, seconds


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP server")
    add_serve_flags(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import build_state, create_app
    from server.model.cpu_runtime import tune_allocator

    tune_allocator()
    server, engine = serve_configs(args)
    app = create_app(build_state(server, engine))
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


def _serve_ray_parser(sub: Any) -> None:
    from server.ray import cli as ray_cli

    p = sub.add_parser("serve-ray", help="run the HTTP server on Ray Serve, over N replicas")
    ray_cli.add_flags(p)
    p.set_defaults(func=ray_cli.run)


def _finetune_parser(sub: Any) -> None:
    from server.training import cli as training_cli

    p = sub.add_parser("finetune", help="train a QLoRA or LongLoRA adapter without the server")
    training_cli.add_arguments(p)
    p.set_defaults(func=training_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for build in (_serve_parser, _serve_ray_parser, _finetune_parser):
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
