"""Tokens over real sockets: refresh under traffic, Entra outages, readiness."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt

from aoai_auth_proxy.testing import AzureOpenAIStandIn, EntraStandIn
from tests.conftest import ProxyFactory, wait_ready

ECHO = "/openai/deployments/d/embeddings?api-version=2024-10-21"


async def traffic(url: str, seconds: float, *, concurrency: int = 4) -> list[tuple[int, str]]:
    """Bounded load: `concurrency` loops of requests for `seconds`; (status, body) of each."""
    results: list[tuple[int, str]] = []
    deadline = time.monotonic() + seconds

    async def loop(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            async with session.post(url + ECHO, json={"input": "x"}) as response:
                results.append((response.status, await response.text()))
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
    return results


def forwarded_tokens(aoai: AzureOpenAIStandIn) -> list[str]:
    return [(seen.header("authorization") or "").removeprefix("Bearer ") for seen in aoai.requests]


async def test_90_second_token_is_refreshed_under_traffic_and_never_sent_expired(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    entra.token_lifetime = 90
    proxy = await make_proxy()
    results = await traffic(proxy.url, 72.0, concurrency=2)
    # The upstream stand-in answers 401 to an expired token: all 200 means none was sent.
    assert {status for status, _ in results} == {200}, "a request failed during refresh"
    assert len(results) > 500
    assert entra.token_requests == 2  # refreshed once, at 50-75% of its life, no more
    tokens = forwarded_tokens(aoai)
    assert len(set(tokens)) == 2
    # The switch happened once, well before the first token's expiry.
    switch = tokens.index(tokens[-1])
    assert set(tokens[switch:]) == {tokens[-1]}
    first = jwt.decode(tokens[0], options={"verify_signature": False})
    second = jwt.decode(tokens[-1], options={"verify_signature": False})
    assert 45 <= second["iat"] - first["iat"] <= 68


async def test_entra_outage_during_refresh_keeps_traffic_on_the_valid_token_then_recovers(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    entra.token_lifetime = 8  # refresh due at 4-6 s; never handed out in its last 0.8 s
    proxy = await make_proxy()
    # Time everything from the held token's own `exp`: the stand-in issues whole seconds
    # (as Entra does), so the token can be up to a second older than this test's clock says.
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + ECHO, json={"input": "x"}) as response,
    ):
        assert response.status == 200
    held = jwt.decode(forwarded_tokens(aoai)[-1], options={"verify_signature": False})
    usable_until = held["exp"] - 0.8
    entra.fail_next(
        10_000,
        status=401,
        error="invalid_client",
        code=7000222,
        description="AADSTS7000222: The provided client certificate keys are expired.",
    )
    during = await traffic(proxy.url, usable_until - 0.3 - time.time())
    assert during, "no traffic ran while the token was still valid"
    assert {status for status, _ in during} == {200}
    assert entra.token_requests >= 2  # a refresh was attempted (and failed) meanwhile
    # past the held token's life: a clear 503 naming the Entra error, never an expired token
    await asyncio.sleep(max(0.0, usable_until + 0.2 - time.time()))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + ECHO, json={"input": "x"}) as response:
            assert response.status == 503
            assert "AADSTS7000222" in (await response.json())["error"]["message"]
        async with session.get(proxy.url + "/health") as response:
            assert response.status == 503
            assert "AADSTS7000222" in (await response.json())["reason"]
        entra.fail_next(0)  # Entra is back
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with session.post(proxy.url + ECHO, json={"input": "x"}) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.2)
        assert response.status == 200, "did not recover without a restart"
        async with session.get(proxy.url + "/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}


async def test_health_is_503_until_the_first_token_then_exactly_the_seed_body(
    make_proxy: ProxyFactory, entra: EntraStandIn
) -> None:
    entra.delay = 0.5
    proxy = await make_proxy(ready=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "unavailable"
        async with session.get(proxy.url + "/health/live") as response:
            assert response.status == 200  # liveness does not depend on Entra
        await wait_ready(proxy.url)
        for path in ("/health", "/health/ready"):
            async with session.get(proxy.url + path) as response:
                assert response.status == 200
                assert await response.read() == b'{"status": "ok"}'
                assert response.content_type == "application/json"


async def test_requests_during_start_up_wait_for_the_first_token(
    make_proxy: ProxyFactory, entra: EntraStandIn
) -> None:
    entra.delay = 0.3
    proxy = await make_proxy(ready=False)
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(session.post(proxy.url + ECHO, json={"input": "x"}) for _ in range(20))
        )
    assert [r.status for r in statuses] == [200] * 20
    for r in statuses:
        r.release()
    assert entra.token_requests == 1  # single flight, even for the start-up burst
