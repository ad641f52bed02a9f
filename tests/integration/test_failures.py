"""What clients see when something is wrong: OpenAI-shaped errors, never a hang or a fake 200."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from aoai_auth_proxy.testing import AzureOpenAIStandIn, EntraStandIn
from tests.conftest import ProxyFactory, RunningProxy
from tests.integration.test_forwarding import raw_request

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


class Probe:
    """Lets a scripted upstream endpoint tell the test that its request was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def upstream_routes(probe: Probe) -> list[tuple[str, str, Any]]:
    async def slow(request: web.Request) -> web.StreamResponse:
        probe.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return web.Response(text="late")

    async def broken_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"partial": true}\n\n')
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()  # the upstream dies mid-stream
        return response

    return [("GET", "/slow", slow), ("POST", "/slow", slow), ("GET", "/broken", broken_stream)]


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["type"] == "proxy_error"
    return error


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_upstream_unreachable_is_502_json(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(API_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    async with client.post(proxy.url + CHAT, json={}) as r:
        assert r.status == 502
        assert r.content_type == "application/json"
        error = error_of(await r.read())
    assert error["code"] == "upstream_unreachable"
    assert "Cannot connect to upstream" in error["message"]


async def test_upstream_that_never_completes_the_tls_handshake_is_a_connect_timeout(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts the TCP connection, never answers the TLS hello

    silent = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(
            API_BASE_URL=f"https://127.0.0.1:{port}", PROXY_CONNECT_TIMEOUT="0.3"
        )
        started = asyncio.get_running_loop().time()
        async with client.get(proxy.url + "/x") as r:
            assert r.status == 504
            error = error_of(await r.read())
        assert error["code"] == "upstream_timeout"
        assert "Cannot connect" in error["message"]
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_upstream_idle_beyond_the_read_timeout_is_504_json(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(PROXY_READ_TIMEOUT="0.3")
    async with client.get(proxy.url + "/slow") as r:
        assert r.status == 504
        assert error_of(await r.read())["code"] == "upstream_timeout"


async def test_upstream_dying_mid_stream_aborts_the_client_connection(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/broken") as r:
        assert r.status == 200
        first = await r.content.readany()
        assert first == b'data: {"partial": true}\n\n'
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.content.read()  # never a clean end of a truncated stream


async def test_client_that_goes_away_cancels_the_upstream_request(
    proxy: RunningProxy, probe: Probe, client: aiohttp.ClientSession
) -> None:
    request = asyncio.ensure_future(client.get(proxy.url + "/slow"))
    await asyncio.wait_for(probe.started.wait(), 5)
    request.cancel()  # closes the client's connection
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(probe.cancelled.wait(), 1.0)


async def test_no_token_gives_503_with_the_entra_error_and_health_says_why(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn, entra: EntraStandIn
) -> None:
    proxy = await make_proxy(ready=False, AZURE_CLIENT_ID="99999999-0000-0000-0000-000000000000")
    async with aiohttp.ClientSession() as client:
        for _ in range(100):
            async with client.get(proxy.url + "/health") as r:
                body = await r.json()
            if "AADSTS" in body.get("reason", ""):
                break
            await asyncio.sleep(0.05)
        assert r.status == 503
        assert body["status"] == "unavailable"
        assert "AADSTS700016" in body["reason"]
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=proxy.url, api_key="dummy", api_version="2024-10-21", max_retries=0
    ) as sdk:
        with pytest.raises(openai.APIStatusError) as raised:
            await sdk.chat.completions.create(model="gpt-4o", messages=[])
    assert raised.value.status_code == 503
    assert "AADSTS700016" in raised.value.message
    assert aoai.requests == []


@pytest.mark.parametrize(
    "target",
    [
        b"http://user:s3cret@evil.example/openai/models?sig=s3cret",
        b"//evil.example/openai/models",
        b"/openai/../admin",
        b"/openai/%2e%2e/admin",
        b"/openai/..%2Fadmin",
        b"/openai\\..\\admin",
        b"evil.example:443",
    ],
)
async def test_targets_that_could_reach_another_host_are_400_and_not_forwarded(
    proxy: RunningProxy,
    aoai: AzureOpenAIStandIn,
    target: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        status, answer = await raw_request(
            proxy.url, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
    assert status == 400, answer
    if target != b"evil.example:443":  # aiohttp's own parser refuses authority-form first
        assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "invalid_request_target"
    assert aoai.requests == []
    assert "s3cret" not in caplog.text  # a foreign URL's credentials never reach the log


async def test_a_client_that_goes_away_still_gets_an_access_line(
    proxy: RunningProxy,
    probe: Probe,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="aoai_auth_proxy.access"):
        request = asyncio.ensure_future(client.get(proxy.url + "/slow"))
        await asyncio.wait_for(probe.started.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(probe.cancelled.wait(), 1.0)
        await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "aoai_auth_proxy.access"]
    assert any(line.startswith("GET /slow status=499") for line in lines), lines


@pytest.mark.parametrize(
    "host",
    # DNS names that merely start like a loopback address are names an attacker can rebind
    [b"evil.example:8080", b"127.attacker.example:8080", b"127.0.0.1.nip.io", b"127.0.0.1x"],
)
async def test_a_host_header_naming_another_site_is_refused_on_a_loopback_proxy(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, host: bytes
) -> None:
    # DNS rebinding: a page on evil.example, its name rebound to 127.0.0.1, calls the sidecar
    status, answer = await raw_request(
        proxy.url, b"GET /openai/models HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    )
    assert status == 400
    assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "host_not_allowed"
    for host in (b"localhost:8080", b"127.0.0.1", b"[::1]:8080", b"127.1.2.3:8080"):
        status, _ = await raw_request(
            proxy.url, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        )
        assert status == 200
    assert aoai.requests == []


async def test_allowed_host_names_can_be_configured(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(PROXY_ALLOWED_HOSTS="aoai-gateway.ai.svc.cluster.local")
    status, _ = await raw_request(
        proxy.url,
        b"GET /health HTTP/1.1\r\nHost: aoai-gateway.ai.svc.cluster.local:8080\r\n\r\n",
    )
    assert status == 200


@pytest.mark.parametrize("protocol", [b"h2c", b"tls/1.2", b"foo"])
async def test_upgrades_other_than_websocket_are_refused(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, protocol: bytes
) -> None:
    status, answer = await raw_request(
        proxy.url,
        b"GET /openai/models HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: " + protocol + b"\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    assert status == 400
    assert b"is not supported" in answer
    assert aoai.requests == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"\r\n",
    ],
    ids=["one header too large", "too many headers"],
)
async def test_oversized_request_headers_get_431_and_nothing_is_forwarded(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, head: bytes
) -> None:
    status, _ = await raw_request(proxy.url, head)
    assert status == 431
    assert aoai.requests == []
    status, _ = await raw_request(proxy.url, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200  # and the proxy carries on
