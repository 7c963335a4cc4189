"""The auth policy: every route belongs to one access class, each class is one dependency.

Classes (docs/api.md, "Authentication", has the route-by-route table):
- probes (/health, /ready): always open, no dependency; they show no secrets or paths.
- pages (/, /console/...): the landing page and the console's static files, always open (a
  browser cannot send a key to load a page); they hold no data.
- inference (`require_api_key`): generation, model and adapter listings, /v1/stats, /info,
  /metrics and the API description (/openapi.json, /docs).
- admin (`require_admin_key`): training data (file contents, listings, metadata), job
  internals (jobs, events, checkpoints) and every mutation of adapters, files or jobs.

Which key opens a class depends on the keys configured:
- none: everything is open (a local development server).
- --api-key only: that one key opens everything.
- --admin-api-key only: that one key opens everything. Inference needs it too: an operator who
  sets a key has asked for a closed server, and an open inference API would still hand out
  compute, adapter names and /metrics. To let clients infer without admin rights, set both.
- both: the inference key opens inference; the admin key opens everything.

Keys arrive as `Authorization: Bearer <key>` (what the openai SDK sends) or `X-API-Key`, and are
compared in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import Unauthorized
from server.config import ServerConfig

PROBE_PATHS = ("/health", "/ready")


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def _inference_keys(config: ServerConfig) -> dict[str, str]:
    """The keys that open inference routes, by the name a 401 uses for them; empty: open."""
    keys = {"API key": config.api_key, "admin API key": config.admin_api_key}
    return {what: key for what, key in keys.items() if key is not None}


def _admin_keys(config: ServerConfig) -> dict[str, str]:
    """The one key that opens admin routes (the admin key, else the only key); empty: open."""
    if config.admin_api_key is not None:
        return {"admin API key": config.admin_api_key}
    if config.api_key is not None:
        return {"API key": config.api_key}
    return {}


def _matches(presented: str | None, keys: dict[str, str]) -> bool:
    if presented is None:
        return False
    # Every comparison runs, so the time taken does not tell which key was close.
    results = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys.values()]
    return any(results)


def _check(request: Request, keys: dict[str, str]) -> None:
    if not keys:
        return
    # Name the key that opens the route: the first listed is the least privileged.
    what = next(iter(keys))
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized(f"missing API key: send 'Authorization: Bearer <{what}>'")
    if not _matches(presented, keys):
        raise Unauthorized(f"invalid API key: this route needs the {what}")


async def require_api_key(request: Request) -> None:
    """Dependency for the inference class; any configured key opens it."""
    _check(request, _inference_keys(request.app.state.server.config))


async def require_admin_key(request: Request) -> None:
    """Dependency for the admin class: training data, job internals and all mutations."""
    _check(request, _admin_keys(request.app.state.server.config))


def tenant(request: Request) -> str:
    """Which configured key authenticated the request ("admin", "inference"; "" on a keyless
    server): the tenant whose cached prompt prefixes it may share (docs/api.md, cache_salt)."""
    config = request.app.state.server.config
    presented = _presented_key(request)
    if config.admin_api_key is not None and _matches(presented, _admin_keys(config)):
        return "admin"
    return "inference" if _inference_keys(config) else ""


def presents_a_key(request: Request) -> bool:
    """Whether the request presents one of the configured keys (False on a keyless server)."""
    keys = _inference_keys(request.app.state.server.config)
    return bool(keys) and _matches(_presented_key(request), keys)


def has_admin_rights(request: Request) -> bool:
    """Whether this request would pass `require_admin_key` (for replies that redact)."""
    keys = _admin_keys(request.app.state.server.config)
    return not keys or _matches(_presented_key(request), keys)
