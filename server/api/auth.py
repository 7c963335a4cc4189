"""Optional API keys: one for inference routes, one for mutations (adapters, files, jobs).

Keys arrive as `Authorization: Bearer <key>` (what the openai SDK sends) or `X-API-Key`, and are
compared in constant time. The admin key also opens inference routes. With no admin key
configured, mutations fall back to the inference key; with neither configured, the server is open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import Unauthorized


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def _check(request: Request, expected: str | None, what: str, also: str | None = None) -> None:
    if expected is None:
        return
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized(f"missing API key: send 'Authorization: Bearer <{what}>'")
    # Both comparisons always run, so the time taken does not tell which key was close.
    ok = hmac.compare_digest(presented.encode(), expected.encode())
    ok_also = also is not None and hmac.compare_digest(presented.encode(), also.encode())
    if not (ok or ok_also):
        raise Unauthorized(f"invalid API key: this route needs the {what}")


async def require_api_key(request: Request) -> None:
    """Dependency for inference routes; the admin key is accepted here too."""
    config = request.app.state.server.config
    _check(request, config.api_key, "API key", also=config.admin_api_key)


async def require_admin_key(request: Request) -> None:
    """Dependency for routes that change the server's adapters, files or jobs."""
    config = request.app.state.server.config
    if config.admin_api_key is not None:
        _check(request, config.admin_api_key, "admin API key")
    else:
        _check(request, config.api_key, "API key")
