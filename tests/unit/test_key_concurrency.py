"""Per-tenant concurrency slots (--max-key-concurrent-requests): one key's or one keyless
client's requests in flight cannot take every slot of --max-concurrent-requests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from fastapi import FastAPI

from server.api.fairness import slot_tenant
from server.api.limits import ConcurrencyLimit, RequestLimits
from server.config import ServerConfig


def limited_app(config: ServerConfig) -> tuple[FastAPI, asyncio.Event]:
    """An app whose /slow route holds its slot until the event is set."""
    app = FastAPI()
    app.state.server = SimpleNamespace(config=config)
    release = asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    limits = RequestLimits(
        max_body_bytes=2**20,
        max_upload_bytes=2**20,
        body_timeout_s=10.0,
        max_concurrent=config.max_concurrent_requests,
        max_key_concurrent=config.key_concurrent_requests,
        send_timeout_s=10.0,
    )
    app.add_middleware(ConcurrencyLimit, limits=limits, tenant_of=slot_tenant)
    return app, release


def client(app: FastAPI, host: str, key: str | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 1234))
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)


async def hold(app: FastAPI, clients: list[httpx.AsyncClient]) -> list[asyncio.Task]:
    """Start one /slow request per client and wait until each holds a slot."""
    tasks = [asyncio.create_task(c.get("/slow")) for c in clients]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if sum(t.done() for t in tasks) == 0 and _in_flight(app) >= len(clients):
            break
    return tasks


def _in_flight(app: FastAPI) -> int:
    stack = app.middleware_stack
    while stack is not None and not isinstance(stack, ConcurrencyLimit):
        stack = getattr(stack, "app", None)
    return 0 if stack is None else stack.in_flight


def test_the_default_share_is_three_quarters_rounded_up() -> None:
    assert ServerConfig(max_concurrent_requests=4).key_concurrent_requests == 3
    assert ServerConfig(max_concurrent_requests=2).key_concurrent_requests == 2
    assert ServerConfig(max_key_concurrent_requests=7).key_concurrent_requests == 7


def test_a_keyless_client_past_its_share_gets_429_and_another_client_is_still_served() -> None:
    async def run() -> None:
        app, release = limited_app(ServerConfig(max_concurrent_requests=4))
        greedy, other = client(app, "10.0.0.1"), client(app, "10.0.0.2")
        held = await hold(app, [greedy] * 3)
        refused = await asyncio.wait_for(greedy.get("/slow"), 5)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "--max-key-concurrent-requests" in refused.json()["error"]["message"]
        served = asyncio.create_task(other.get("/slow"))
        held += await hold(app, [])
        await asyncio.sleep(0.05)
        assert _in_flight(app) == 4  # the other client took the slot the greedy one could not
        full = await asyncio.wait_for(client(app, "10.0.0.3").get("/slow"), 5)
        assert full.status_code == 503  # every slot taken: the global limit answers
        release.set()
        replies = [await t for t in held] + [await served]
        assert [r.status_code for r in replies] == [200] * 4
        retry = await greedy.get("/slow")  # slots given back when requests end
        assert retry.status_code == 200

    asyncio.run(run())


def test_a_key_is_one_tenant_across_addresses_and_a_wrong_key_does_not_use_its_share() -> None:
    async def run() -> None:
        app, release = limited_app(ServerConfig(api_key="k", max_concurrent_requests=4))
        held = await hold(app, [client(app, f"10.0.1.{i}", "k") for i in range(3)])
        same_key = await asyncio.wait_for(client(app, "10.0.1.9", "k").get("/slow"), 5)
        assert same_key.status_code == 429, same_key.text
        # No route dependency checks keys here: the request gets through to /slow, counted
        # against its address, not the key the others hold.
        wrong_key = asyncio.create_task(client(app, "10.0.1.9", "not-k").get("/slow"))
        await asyncio.sleep(0.05)
        assert _in_flight(app) == 4
        release.set()
        replies = [await t for t in held] + [await wrong_key]
        assert [r.status_code for r in replies] == [200] * 4

    asyncio.run(run())
