"""Operating the proxy: admin listener, metrics, inbound key, 401 recovery, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from aoai_auth_proxy.app import TOKEN_SOURCE
from aoai_auth_proxy.credentials import RefreshingTokenSource
from aoai_auth_proxy.errors import TokenAcquisitionError
from aoai_auth_proxy.testing import AzureOpenAIStandIn, ClientCertificate, EntraStandIn
from tests.conftest import CLIENT_ID, ProxyFactory, eventually
from tests.integration.test_relay_edges import Client

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
MESSAGES = {"messages": [{"role": "user", "content": "hello there"}]}


async def _too_many(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"error": {"code": "429", "message": "Rate limit"}},
        status=429,
        headers={"retry-after-ms": "1000"},
    )


@pytest.fixture
def upstream_routes() -> list[tuple[str, str, Any]]:
    return [("POST", "/openai/deployments/busy/chat/completions", _too_many)]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def test_admin_listener_serves_probes_and_metrics_but_never_forwards(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(PROXY_ADMIN_PORT="0", PROXY_ADMIN_HOST="127.0.0.1")
    admin = proxy.server.admin_url
    assert admin
    assert admin != proxy.url
    assert await get_json(admin + "/health") == (200, {"status": "ok"})
    assert await get_json(admin + "/health/ready") == (200, {"status": "ok"})
    assert await get_json(admin + "/health/live") == (200, {"status": "ok"})
    async with aiohttp.ClientSession() as session:
        async with session.get(admin + "/metrics") as response:
            assert response.status == 200
            assert "aoai_proxy_token_refreshes_total" in await response.text()
        async with session.post(admin + CHAT, json=MESSAGES) as response:
            assert response.status in (404, 405)
    assert aoai.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", CHAT), ("GET", "/openai/models"), ("POST", "/health"), ("GET", "/")],
)
async def test_the_admin_port_answers_anything_else_404_json_and_logs_no_access_line(
    make_proxy: ProxyFactory,
    aoai: AzureOpenAIStandIn,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
) -> None:
    proxy = await make_proxy(PROXY_ADMIN_PORT="0", PROXY_ADMIN_HOST="127.0.0.1")
    with caplog.at_level("INFO", logger="aoai_auth_proxy.access"):
        async with aiohttp.ClientSession() as session:
            url = proxy.server.admin_url
            async with session.request(method, url + path, json=MESSAGES) as response:
                assert response.status == 404
                body = await response.json()
            async with session.get(url + "/health/live") as response:
                assert response.status == 200
    assert body["error"]["code"] == "not_found"
    assert "/metrics" in body["error"]["message"]
    assert aoai.requests == []
    assert [r for r in caplog.records if r.name == "aoai_auth_proxy.access"] == []


async def test_metrics_after_known_traffic(
    make_proxy: ProxyFactory, client_certificate: ClientCertificate
) -> None:
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as session:
        for body in (MESSAGES, {**MESSAGES, "stream": True}):
            async with session.post(proxy.url + CHAT, json=body) as response:
                assert response.status == 200
                await response.read()
        async with session.post(
            proxy.url + "/openai/deployments/busy/chat/completions?api-version=1", json=MESSAGES
        ) as response:
            assert response.status == 429
            assert response.headers["retry-after-ms"] == "1000"
        async with session.get(proxy.url + "/health") as response:
            assert response.status == 200
        async with session.get(proxy.url + "/metrics") as response:
            assert response.content_type == "text/plain"
            page = samples(await response.text())

    def value(name: str, **labels: str) -> float:
        return page[(name, tuple(sorted(labels.items())))]

    assert value("aoai_proxy_requests_total", method="POST", code="200", deployment="gpt-4o") == 2
    assert value("aoai_proxy_requests_total", method="POST", code="429", deployment="busy") == 1
    assert value("aoai_proxy_upstream_rate_limited_total", deployment="busy") == 1
    assert value("aoai_proxy_request_duration_seconds_count", deployment="gpt-4o") == 2
    assert value("aoai_proxy_upstream_ttfb_seconds_count", deployment="gpt-4o") == 2
    assert value("aoai_proxy_stream_duration_seconds_count", deployment="gpt-4o") == 1
    assert value("aoai_proxy_in_flight_requests") == 0
    assert value("aoai_proxy_token_refreshes_total", result="success", code="none") == 1
    assert 3000 < value("aoai_proxy_token_expires_in_seconds") <= 3600
    assert value(
        "aoai_proxy_certificate_expiry_timestamp_seconds",
        thumbprint=client_certificate.thumbprint_sha1,
    ) == pytest.approx(client_certificate.certificate.not_valid_after_utc.timestamp())
    # probes and /metrics itself are not counted as traffic
    assert not any(
        name == "aoai_proxy_requests_total" and ("method", "GET") in labels for name, labels in page
    )


async def test_metrics_count_upstream_failures_and_token_failures_by_code(
    make_proxy: ProxyFactory, entra: EntraStandIn
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proxy = await make_proxy(API_BASE_URL=f"http://127.0.0.1:{closed}")
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + CHAT, json=MESSAGES) as response,
    ):
        assert response.status == 502
    entra.fail_next(
        10, status=400, error="invalid_request", code=90002, description="AADSTS90002: Not found."
    )
    source = proxy.app[TOKEN_SOURCE]
    assert isinstance(source, RefreshingTokenSource)
    with pytest.raises(TokenAcquisitionError):
        await source.refresh()
    _, page_text = await _metrics(proxy.url)
    page = samples(page_text)
    assert page[("aoai_proxy_upstream_errors_total", (("kind", "connect"),))] == 1
    request_labels = (("code", "502"), ("deployment", "gpt-4o"), ("method", "POST"))
    assert page[("aoai_proxy_requests_total", request_labels)] == 1
    token_labels = (("code", "AADSTS90002"), ("result", "failure"))
    assert page[("aoai_proxy_token_refreshes_total", token_labels)] == 1


async def _metrics(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return response.status, await response.text()


async def test_inbound_key_is_required_compared_and_stripped(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(PROXY_API_KEY="first-key, second-key")
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
            async with session.post(proxy.url + CHAT, json=MESSAGES, headers=headers) as r:
                assert r.status == 401
                error = (await r.json())["error"]
                assert error["type"] == "proxy_error"
                assert error["code"] == "invalid_proxy_api_key"
        assert aoai.requests == []
        for headers in ({"api-key": "first-key"}, {"Authorization": "Bearer second-key"}):
            async with session.post(proxy.url + CHAT, json=MESSAGES, headers=headers) as r:
                assert r.status == 200
            seen = aoai.requests[-1]
            assert seen.client_id == CLIENT_ID
            assert all("-key" not in value for _, value in seen.headers)
        async with session.get(proxy.url + "/health") as r:
            assert r.status == 200  # probes need no key


# A WebSocket handshake hands the connection to aiohttp's server; when the upstream refuses
# it (404: no such deployment), that server reads on.
HAND_OVER = (
    b"GET /openai/realtime?deployment=nope HTTP/1.1\r\nHost: localhost\r\napi-key: s3cret\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /health?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
        b"DELETE /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /%68ealth HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    ],
)
@pytest.mark.parametrize("server", ["http1", "after-hand-over"])
async def test_only_get_and_head_probes_go_without_the_inbound_key(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn, raw: bytes, server: str
) -> None:
    # Other methods on the probe paths are forwarded with the proxy's token, so they need
    # the key; on a connection aiohttp's server holds (after a hand-over) too.
    proxy = await make_proxy(PROXY_API_KEY="s3cret")
    client = await Client.connect(proxy.url)
    try:
        if server == "after-hand-over":
            assert (await client.request(HAND_OVER)).status == 404
        answer = await client.request(raw)
    finally:
        await client.close()
    assert answer.status == 401
    assert [seen.raw_path for seen in aoai.requests if seen.method != "GET"] == []


async def test_inbound_key_file_is_rotated_without_a_restart(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    key_file = tmp_path / "proxy-api-key"
    key_file.write_text("old-key\n")
    proxy = await make_proxy(PROXY_API_KEY_FILE=str(key_file))

    async def status(key: str) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + CHAT, json=MESSAGES, headers={"api-key": key}) as r,
        ):
            return r.status

    assert await status("old-key") == 200
    key_file.write_text("old-key,new-key\n")  # add the new key first, as a rotation does
    assert await eventually(lambda: status("new-key"), 200)
    assert await status("old-key") == 200
    key_file.write_text("new-key\n")
    assert await eventually(lambda: status("old-key"), 401)


async def test_upstream_401_is_healed_by_one_renewal_and_a_replay(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
            assert r.status == 200
        revoked = _jti(aoai)
        aoai.revoked_token_ids.add(revoked)
        async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
            assert r.status == 200  # refused once upstream, renewed, replayed
            assert (await r.json())["choices"][0]["message"]["content"] == "Echo: hello there"
        assert entra.token_requests == 2
        refused, replayed = aoai.requests[-2:]
        assert refused.body_sha256 == replayed.body_sha256
        assert _jti(aoai) != revoked


async def test_large_bodies_are_streamed_not_kept_so_a_401_passes_through(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(PROXY_REPLAY_MAX_BYTES="16")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
            assert r.status == 200
        aoai.revoked_token_ids.add(_jti(aoai))
        async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
            assert r.status == 401  # the upstream's own answer, unchanged
        assert entra.token_requests == 2  # renewed all the same...
        async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
            assert r.status == 200  # ...so the next request works


async def test_an_upstream_refusing_every_token_does_not_make_the_proxy_hammer_entra(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy()
    original = aoai.revoked_token_ids

    class Everything(set[str]):
        def __contains__(self, item: object) -> bool:
            return True

    aoai.revoked_token_ids = Everything()
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(10):
                async with session.post(proxy.url + CHAT, json=MESSAGES) as r:
                    statuses.append(r.status)
    finally:
        aoai.revoked_token_ids = original
    assert statuses == [401] * 10
    assert entra.token_requests == 2  # the first token, and one renewal within 5 s


def _jti(aoai: AzureOpenAIStandIn) -> str:
    token = (aoai.requests[-1].header("authorization") or "").removeprefix("Bearer ")
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_slow_header_clients_are_closed_after_the_header_timeout(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(PROXY_HEADER_TIMEOUT="0.5")
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    assert time.monotonic() - started < 2.5
    writer.close()


async def test_connections_beyond_the_limit_get_503_while_streams_keep_flowing(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(PROXY_MAX_CONNECTIONS="2")
    aoai.stream_delay = 0.2
    body = {"messages": [{"role": "user", "content": "a b c d e"}], "stream": True}
    async with (
        aiohttp.ClientSession() as first,
        aiohttp.ClientSession() as second,
        first.post(proxy.url + CHAT, json=body) as one,
        second.post(proxy.url + CHAT, json=body) as two,
    ):
        await one.content.readany()
        await two.content.readany()
        started = time.monotonic()
        async with aiohttp.ClientSession() as third, third.get(proxy.url + "/health") as r:
            assert r.status == 503
            error = json.loads(await r.read())["error"]
            assert error["code"] == "too_many_connections"
        assert time.monotonic() - started < 1.0
        assert (await one.content.read()).endswith(b"data: [DONE]\n\n")
        assert (await two.content.read()).endswith(b"data: [DONE]\n\n")
    _, page = await _metrics(proxy.url)
    assert samples(page)[("aoai_proxy_connections_refused_total", ())] == 1
