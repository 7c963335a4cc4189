"""The web console: its static files under /console, a landing page at GET /, and /v1/stats.

The console's files are public (a browser cannot send a key to load a page); everything they
show comes from the API, with the key the user enters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from server import __version__
from server.api.auth import require_api_key
from server.api.errors import NotFound
from server.api.stats_history import StatsHistory

router = APIRouter(tags=["console"])

STATIC_DIR = Path(__file__).resolve().parents[2] / "console" / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Scripts and styles from this origin only: no inline script, no eval, no inline style sheet.
CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
LANDING = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraplex</title></head>
<body><h1>loraplex {__version__}</h1>
<ul><li><a href="/console/">Web console</a></li><li><a href="/docs">API docs</a></li>
<li><a href="/openapi.json">OpenAPI schema</a></li></ul></body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def landing() -> HTMLResponse:
    """A landing page that links to the console and the API docs."""
    return HTMLResponse(LANDING, headers=CONSOLE_HEADERS)


@router.get("/console", include_in_schema=False)
async def console_root() -> RedirectResponse:
    # The page's relative module imports resolve against /console/.
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/{path:path}", include_in_schema=False)
async def console_file(path: str) -> Response:
    """A static file of the console; any other path is the single page itself."""
    try:
        target = (STATIC_DIR / (path or "index.html")).resolve()
        found = target.is_relative_to(STATIC_DIR) and target.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long
        found = False
    if not found:
        if "." in Path(path).name:
            raise NotFound(f"the console has no file {path!r}")
        target = STATIC_DIR / "index.html"  # a client-side route, e.g. /console/adapters
    media_type = MEDIA_TYPES.get(target.suffix)
    if media_type is None:
        raise NotFound(f"the console has no file {path!r}")
    return FileResponse(target, media_type=media_type, headers=CONSOLE_HEADERS)


@router.get("/v1/stats", dependencies=[Depends(require_api_key)])
async def stats(
    request: Request,
    seconds: Annotated[float, Query(gt=0, le=3600)] = 300,
) -> dict:
    """Serving stats of the last `seconds`, one point per sampling interval, oldest first."""
    history: StatsHistory = request.app.state.stats_history
    return {
        "object": "stats",
        "interval_s": history.interval_s,
        "history_s": history.history_s,
        "data": history.since(seconds),
        "hot_adapters": history.hot_adapters(seconds),
    }
