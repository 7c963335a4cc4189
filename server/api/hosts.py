"""--allowed-hosts: 400 for a Host header the operator did not list.

Against DNS rebinding: a web page whose name re-resolves to 127.0.0.1 can reach a keyless local
server from the browser, but its requests still carry the page's own Host name. The probes
(/health, /ready) are exempt: orchestrators probe by address, and they show nothing secret.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import PROBE_PATHS


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `a.b:80` -> `a.b`, `[::1]:80` -> `[::1]`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.split(":", 1)[0]


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether `name` matches an --allowed-hosts entry (`*`, `*.domain`, or exactly)."""
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class AllowedHosts:
    """ASGI middleware: HTTP requests whose Host is not allowed get an OpenAI-shaped 400."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host_name(header)
        if host_allowed(name, self.allowed):
            await self.app(scope, receive, send)
            return
        body = {
            "error": {
                "message": f"the Host header {name!r} is not one of --allowed-hosts",
                "type": "invalid_request_error",
                "param": None,
                "code": "host_not_allowed",
            }
        }
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
