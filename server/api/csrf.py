"""Cross-site writes refused: a web page on another origin may not change anything here.

A server without keys trusts whoever reaches it, and any web page can make its visitor's
browser reach a local server: a form post (multipart, urlencoded or text/plain) is a "simple"
request, sent without a CORS preflight. The page cannot read the answer, but the adapter it
uploaded or the training file it sent is stored. --allowed-hosts does not help: the request
carries this server's own Host. Browsers say where a request comes from, so the rule (the one
of Go's net/http CrossOriginProtection) is:

- GET, HEAD and OPTIONS pass: no route changes anything on them.
- An Origin listed in --csrf-trusted-origins passes.
- With a Sec-Fetch-Site header (every current browser sends one), only `same-origin` and `none`
  (the user's own navigation) pass; `same-site` is refused too, since another port of
  localhost is the same site.
- Without it, an Origin header must name this server (its host and port equal the Host).
- A request with neither is not from a browser (curl, the SDKs): it passes, keys decide.

Applied whether or not keys are set: with keys a browser could not send one cross-site without
a preflight this server never answers, so it changes nothing there but the error.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import Forbidden, error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_ORIGIN = frozenset({b"same-origin", b"none"})


class CrossSiteRefused(Forbidden):
    code = "cross_site_request"


def origin_host(origin: str) -> str | None:
    """The host[:port] of an Origin header (`http://a.b:8000` -> `a.b:8000`); None when it
    names no host (`null`, from a sandboxed page or a file)."""
    parts = urlsplit(origin.strip())
    return parts.netloc.lower() or None


def cross_site(scope: Scope, trusted: frozenset[str]) -> str | None:
    """Why this request is a cross-site write to refuse, or None when it may pass."""
    if scope["method"] in SAFE_METHODS:
        return None
    headers = dict(scope["headers"])
    origin = headers.get(b"origin", b"").decode("latin-1")
    if origin and origin.rstrip("/").lower() in trusted:
        return None
    fetch_site = headers.get(b"sec-fetch-site")
    if fetch_site is not None:
        if fetch_site.lower() in _SAME_ORIGIN:
            return None
        return f"the browser says it comes from a {fetch_site.decode('latin-1')!r} page"
    if not origin:
        return None
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if origin_host(origin) == host:
        return None
    return f"its Origin {origin[:100]!r} is not this server"


class CrossSiteProtection:
    """ASGI middleware: 403 for a state-changing request a browser sent from another site."""

    def __init__(self, app: ASGIApp, trusted_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.trusted = frozenset(o.rstrip("/").lower() for o in trusted_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (why := cross_site(scope, self.trusted)):
            error = CrossSiteRefused(
                f"cross-site {scope['method']} refused: {why}. Send it from this server's own "
                f"pages or without a browser, or list the page's origin in "
                f"--csrf-trusted-origins"
            )
            await error_response(Request(scope), error)(scope, receive, send)
            return
        await self.app(scope, receive, send)
