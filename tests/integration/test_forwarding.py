"""Forwarding over real sockets: what the upstream receives and what the client gets back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from aoai_auth_proxy.testing import AzureOpenAIStandIn, EntraStandIn
from tests.conftest import CLIENT_ID, RunningProxy

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
GZIPPED = gzip.compress(b'{"hello": "world"}' * 100, mtime=0)


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "body_sha256": hashlib.sha256(body).hexdigest(),
        },
        headers={"X-Echo": "1"},
    )


async def _gzip(request: web.Request) -> web.StreamResponse:
    return web.Response(
        body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def _cookies(request: web.Request) -> web.StreamResponse:
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    response.headers.add("x-ratelimit-remaining-requests", "9")
    response.headers.add("retry-after-ms", "20")
    response.headers.add("apim-request-id", "req-123")
    return response


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("https://elsewhere.example/next")


async def _upload_hash(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"sha256": digest.hexdigest(), "size": size})


async def _head(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"x" * 1234, content_type="application/octet-stream")


ROUTES: list[tuple[str, str, Any]] = [
    ("*", "/echo/{tail:.*}", _echo),
    ("GET", "/gzip", _gzip),
    ("GET", "/cookies", _cookies),
    ("GET", "/redirect", _redirect),
    ("POST", "/upload", _upload_hash),
    ("*", "/sized", _head),
]


@pytest.fixture
def upstream_routes() -> list[tuple[str, str, Any]]:
    return ROUTES


async def test_chat_completion_reaches_upstream_with_a_valid_bearer_and_no_client_key(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, client: aiohttp.ClientSession
) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}]}).encode()
    async with client.post(
        proxy.url + CHAT,
        data=body,
        headers={"api-key": "dummy", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert response.headers["apim-request-id"]
    assert answer["choices"][0]["message"]["content"] == "Echo: hello there"
    seen = aoai.requests[-1]
    assert seen.raw_path == CHAT
    assert seen.client_id == CLIENT_ID
    assert seen.header_values("api-key") == []
    assert len(seen.header_values("authorization")) == 1
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header("host") == aoai.base_url.removeprefix("https://")


@pytest.mark.parametrize("name", ["api-key", "API-KEY", "Api-Key", "Authorization"])
async def test_client_credentials_in_any_case_are_replaced(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, client: aiohttp.ClientSession, name: str
) -> None:
    async with client.get(f"{proxy.url}/echo/x?a=1&api-key=secret", headers={name: "secret"}) as r:
        assert r.status == 200
        assert (await r.json())["raw_path"] == "/echo/x?a=1"
    seen = aoai.requests[-1]
    assert all("secret" not in value for _, value in seen.headers)
    assert seen.client_id == CLIENT_ID


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_path_and_query_is_forwarded_byte_for_byte(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, client: aiohttp.ClientSession, method: str
) -> None:
    target = "/echo/a%20b/C;d?z=%2F&y=&x=1&x=2"
    url = URL(proxy.url + target, encoded=True)
    async with client.request(method, url, data=b"payload") as r:
        assert r.status == 200
        echoed = await r.json()
    assert echoed["method"] == method
    assert echoed["raw_path"] == target
    assert echoed["body_sha256"] == hashlib.sha256(b"payload").hexdigest()


async def test_gzip_bytes_are_passed_through_not_decompressed(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == GZIPPED
        assert r.headers["Content-Length"] == str(len(GZIPPED))


async def test_repeated_response_headers_and_rate_limit_headers_are_kept(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/cookies") as r:
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert r.headers["x-ratelimit-remaining-requests"] == "9"
        assert r.headers["retry-after-ms"] == "20"
        assert r.headers["apim-request-id"] == "req-123"


async def test_redirects_are_passed_back_not_followed(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/redirect", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "https://elsewhere.example/next"
    assert len(aoai.requests) == 1


async def test_head_keeps_content_length_without_a_body(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    async with client.head(f"{proxy.url}/sized") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "1234"
        assert await r.read() == b""


async def test_repeated_request_headers_keep_their_order(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    raw = (
        b"GET /echo/h HTTP/1.1\r\nHost: localhost\r\nX-Multi: 1\r\nx-ms-client-request-id: c1\r\n"
        b"x-multi: 2\r\nConnection: keep-alive, X-Private\r\nX-Private: hop\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\r\n"
    )
    status, _ = await raw_request(proxy.url, raw)
    assert status == 200
    seen = aoai.requests[-1]
    names = [name.lower() for name, _ in seen.headers]
    assert seen.header_values("X-Multi") == ["1", "2"]  # names differing only in case too
    assert seen.header("x-ms-client-request-id") == "c1"
    for hop in ("x-private", "keep-alive", "te", "proxy-authorization"):
        assert hop not in names


async def test_large_upload_streams_with_its_hash_intact(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    chunk = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    digest = hashlib.sha256()

    async def body() -> Any:
        for _ in range(80):  # 5 MiB, chunked (no Content-Length)
            digest.update(chunk)
            yield chunk

    async with client.post(f"{proxy.url}/upload", data=body()) as r:
        assert r.status == 200
        result = await r.json()
    assert result == {"sha256": digest.hexdigest(), "size": 80 * len(chunk)}


async def test_sse_chunks_arrive_while_the_upstream_is_still_writing(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, client: aiohttp.ClientSession
) -> None:
    aoai.stream_delay = 0.25
    words = " ".join(f"w{i}" for i in range(6))
    body = {"messages": [{"role": "user", "content": words}], "stream": True}
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals: list[float] = []
    received = b""
    async with client.post(proxy.url + CHAT, json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            arrivals.append(loop.time() - started)
            received += chunk
    assert received.endswith(b"data: [DONE]\n\n")
    total = arrivals[-1]
    assert total >= 6 * 0.25
    # the first event was in the client's hands long before the upstream finished
    assert arrivals[0] < total - 1.0
    assert len(arrivals) >= 6


async def test_token_is_reused_across_requests(
    proxy: RunningProxy, entra: EntraStandIn, client: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        async with client.get(f"{proxy.url}/echo/t") as r:
            assert r.status == 200
    assert entra.token_requests == 1


async def raw_request(url: str, raw: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes exactly as given; return the status and the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = b""
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None:
                rest = await reader.readexactly(length)
        return int(head.split(b" ")[1]), head + rest
    finally:
        writer.close()
