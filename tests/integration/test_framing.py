"""Byte-level framing against a raw upstream that still checks the bearer token for real."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from aoai_auth_proxy.testing import AzureOpenAIStandIn, EntraStandIn
from tests.conftest import CLIENT_ID, ProxyFactory
from tests.integration.test_forwarding import raw_request

AUDIENCE = "https://cognitiveservices.azure.com"


class RawUpstream:
    """Answers every request with `answer` (raw bytes), after verifying its bearer token with
    the Entra stand-in; what it received is kept in `heads`."""

    def __init__(self, entra: EntraStandIn) -> None:
        self.entra = entra
        self.answer = b"HTTP/1.1 204 No Content\r\n\r\n"
        self.close_after = False
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                token = next(
                    line.split(b" ", 2)[2]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"authorization: bearer ")
                ).decode()
                claims = self.entra.verify_access_token(token, audience=AUDIENCE)
                assert claims["appid"] == CLIENT_ID
                writer.write(self.answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def raw(entra: EntraStandIn) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(entra)
    yield upstream
    await upstream.close()


async def proxy_to(make_proxy: ProxyFactory, raw: RawUpstream) -> str:
    base = await raw.start()
    return (await make_proxy(API_BASE_URL=base)).url


async def test_upstream_header_with_a_control_character_is_a_502_json(
    make_proxy: ProxyFactory, raw: RawUpstream
) -> None:
    url = await proxy_to(make_proxy, raw)
    raw.answer = b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok"
    async with aiohttp.ClientSession() as client, client.get(url + "/x") as r:
        assert r.status == 502
        assert json.loads(await r.read())["error"]["type"] == "proxy_error"


async def test_upstream_closing_before_its_headers_is_a_502_json(
    make_proxy: ProxyFactory, raw: RawUpstream
) -> None:
    url = await proxy_to(make_proxy, raw)
    raw.answer = b""
    raw.close_after = True
    async with aiohttp.ClientSession() as client, client.get(url + "/x") as r:
        assert r.status == 502
        assert json.loads(await r.read())["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", 204, b""),
        (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 304, b""),
        # close-delimited: no length, no chunking; the body ends when the upstream closes
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
            200,
            b"until the end",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            b"hello",
        ),
    ],
)
async def test_response_framing_is_carried_over(
    make_proxy: ProxyFactory, raw: RawUpstream, answer: bytes, status: int, body: bytes
) -> None:
    url = await proxy_to(make_proxy, raw)
    raw.answer = answer
    raw.close_after = b"Content-Length" not in answer and b"chunked" not in answer
    async with aiohttp.ClientSession() as client, client.get(url + "/x") as r:
        assert r.status == status
        assert await r.read() == body


async def test_http10_client_gets_a_close_delimited_answer(
    make_proxy: ProxyFactory, raw: RawUpstream
) -> None:
    url = await proxy_to(make_proxy, raw)
    raw.answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.0\r\nHost: localhost\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert body == b"abc"


async def test_expect_100_continue_is_answered_by_the_proxy_and_the_body_forwarded(
    make_proxy: ProxyFactory, raw: RawUpstream
) -> None:
    url = await proxy_to(make_proxy, raw)
    raw.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"body")
    final = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert b"expect:" not in raw.heads[-1].lower()


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"POST /a/%2e%2e/b HTTP/1.1", 400), (b"TRACE /x HTTP/1.1", 501)],
    ids=["dot-segment", "trace"],
)
async def test_a_request_refused_for_its_line_never_gets_100_continue(
    make_proxy: ProxyFactory, raw: RawUpstream, line: bytes, status: int
) -> None:
    # The client waits for 100 before it sends the body; the refusal must come instead.
    url = await proxy_to(make_proxy, raw)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(line + b"\r\nHost: localhost\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert raw.heads == []


async def test_base_path_prefix_is_prepended_at_the_socket(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(API_BASE_URL=aoai.base_url + "/openai")
    status, _ = await raw_request(
        proxy.url,
        b"POST /deployments/d/embeddings?api-version=2024-10-21 HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 14\r\n\r\n"
        b'{"input": "x"}',
    )
    assert status == 200
    assert aoai.requests[-1].raw_path == "/openai/deployments/d/embeddings?api-version=2024-10-21"
