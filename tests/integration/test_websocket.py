"""WebSocket pass-through over real sockets: handshake, frames, closes, vanishing peers."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol

from aoai_auth_proxy.testing import AzureOpenAIStandIn, EntraStandIn
from tests.conftest import CLIENT_ID, ProxyFactory, RunningProxy
from tests.integration.test_egress import ScriptedProxy, use_proxy, values_of


class Upstream:
    """What the scripted upstream WebSocket endpoints saw."""

    def __init__(self) -> None:
        self.close_codes: list[tuple[int | None, str]] = []
        self.closed = asyncio.Event()
        self.sessions = 0


@pytest.fixture
def seen() -> Upstream:
    return Upstream()


@pytest.fixture
def upstream_routes(seen: Upstream) -> list[tuple[str, str, Any]]:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("echo",), max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        seen.sessions += 1
        reason = ""
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.CLOSE:
                reason = str(message.extra or "")
                break
            if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            if message.type is WSMsgType.TEXT:
                if message.data.startswith("close:"):
                    _, code, reason = message.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                elif message.data == "vanish":
                    assert request.transport is not None
                    request.transport.abort()
                else:
                    await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        seen.close_codes.append((ws.close_code, reason))
        seen.closed.set()
        return ws

    return [("GET", "/openai/realtime", echo), ("GET", "/openai/v1/realtime", echo)]


def ws_url(
    proxy: RunningProxy,
    path: str = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-realtime",
) -> str:
    return "ws" + proxy.url.removeprefix("http") + path


def open_session(proxy: RunningProxy, **options: Any) -> Any:
    return connect(
        ws_url(proxy, options.pop("path", "/openai/realtime?api-version=1&deployment=d")),
        subprotocols=[Subprotocol(p) for p in options.pop("subprotocols", ["echo"])],
        max_size=None,
        **options,
    )


async def test_handshake_carries_the_bearer_and_never_the_client_key(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    async with open_session(
        proxy,
        path="/openai/realtime?api-version=1&deployment=d&api-key=query-secret",
        subprotocols=["openai-insecure-api-key.sk-secret", "realtime", "echo"],
        additional_headers={"api-key": "header-secret", "X-Custom": "kept", "Origin": "http://app"},
    ) as ws:
        assert ws.subprotocol == "echo"  # the upstream's choice reaches the client
        await ws.send("hello")
        assert await ws.recv() == "hello"
    seen = aoai.requests[-1]
    assert seen.raw_path == "/openai/realtime?api-version=1&deployment=d"  # api-key removed
    assert seen.client_id == CLIENT_ID
    assert seen.header("X-Custom") == "kept"
    assert seen.header("Origin") == "http://app"
    assert seen.header("Sec-WebSocket-Protocol") == "realtime, echo"
    assert all("secret" not in value for _, value in seen.headers)


async def test_text_binary_and_a_1_mb_frame_are_relayed_in_order(proxy: RunningProxy) -> None:
    big = os.urandom(1024 * 1024)
    async with open_session(proxy) as ws:
        await ws.send("one")
        await ws.send(b"\x00\x01two")
        await ws.send(big)
        await ws.send("three")
        assert await ws.recv() == "one"
        assert await ws.recv() == b"\x00\x01two"
        assert await ws.recv() == big
        assert await ws.recv() == "three"
        pong = await ws.ping()
        await asyncio.wait_for(pong, 2)  # pings are answered hop by hop


async def test_a_frame_sent_with_the_handshake_is_relayed(proxy: RunningProxy) -> None:
    # The upgrade request and the first frame in one write: the frame is read with the head by
    # the proxy port's own parser, and must reach aiohttp's WebSocket handler after it.
    frame = Frame(Opcode.TEXT, b"early").serialize(mask=True, extensions=[])
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET /openai/realtime?api-version=1&deployment=d HTTP/1.1\r\nHost: localhost\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + frame
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            echoed = await reader.readexactly(7)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101 ")
    assert echoed == b"\x81\x05early"  # FIN + text, unmasked, 5 bytes (RFC 6455 5.2)


async def test_a_fragmented_message_reaches_the_upstream_as_one_message(
    proxy: RunningProxy,
) -> None:
    async with open_session(proxy) as ws:
        await ws.send(["frag", "mented"])  # a text message in two frames (RFC 6455 5.4)
        await ws.send([b"\x00", b"\x01\x02"])
        await ws.send("after")
        # the upstream echoes each message it got: one per message, not per frame
        assert [await ws.recv() for _ in range(3)] == ["fragmented", b"\x00\x01\x02", "after"]


async def test_text_that_is_not_utf8_closes_the_session_with_1007_and_is_not_relayed(
    proxy: RunningProxy, seen: Upstream
) -> None:
    async with open_session(proxy) as ws:
        await ws.send("fine")
        assert await ws.recv() == "fine"
        await ws.send(b"\xff\xfe", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007  # invalid frame payload data (RFC 6455 7.4.1)
    await asyncio.wait_for(seen.closed.wait(), 2)  # the upstream session ended with it


async def test_a_close_from_the_client_reaches_the_upstream_with_its_code(
    proxy: RunningProxy, seen: Upstream
) -> None:
    async with open_session(proxy) as ws:
        await ws.send("x")
        await ws.recv()
        await ws.close(4001, "client done")
    await asyncio.wait_for(seen.closed.wait(), 2)
    assert seen.close_codes == [(4001, "client done")]


async def test_a_close_from_the_upstream_reaches_the_client_with_code_and_reason(
    proxy: RunningProxy,
) -> None:
    async with open_session(proxy) as ws:
        await ws.send("close:4002:upstream says bye")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4002
    assert closed.value.rcvd.reason == "upstream says bye"


async def test_a_refused_upgrade_gives_the_client_the_upstreams_status_and_body(
    proxy: RunningProxy,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with open_session(proxy, path="/openai/no-such-realtime"):
            pass
    assert refused.value.response.status_code == 404
    assert b"Resource not found" in refused.value.response.body


async def test_a_vanished_upstream_closes_the_client_within_a_second(proxy: RunningProxy) -> None:
    async with open_session(proxy) as ws:
        await ws.send("vanish")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 1.0)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1014  # bad gateway


async def test_a_vanished_client_closes_the_upstream_within_a_second(
    proxy: RunningProxy, seen: Upstream
) -> None:
    ws: ClientConnection = await open_session(proxy)
    await ws.send("x")
    await ws.recv()
    ws.transport.abort()  # no close frame, no FIN: the client is simply gone
    await asyncio.wait_for(seen.closed.wait(), 1.0)
    assert seen.close_codes[-1][0] == 1001  # going away


async def test_a_session_outlives_its_token(make_proxy: ProxyFactory, entra: EntraStandIn) -> None:
    entra.token_lifetime = 2  # the token only matters at the handshake
    proxy = await make_proxy()
    async with open_session(proxy) as ws:
        await asyncio.sleep(2.5)
        await ws.send("still here")
        assert await ws.recv() == "still here"


async def test_shutdown_closes_sessions_with_1001_after_the_grace_period(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(PROXY_SHUTDOWN_TIMEOUT="0.5")
    async with open_session(proxy) as ws:
        await ws.send("x")
        await ws.recv()
        stopping = asyncio.create_task(proxy.stop())
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3)
        await stopping
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


async def test_sessions_are_logged_and_counted(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aoai_auth_proxy.access"):
        async with open_session(proxy) as ws:
            for text in ("a", "b", "c"):
                await ws.send(text)
                await ws.recv()
            await ws.close(1000)
        await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "aoai_auth_proxy.access"]
    assert any(
        "status=101" in line
        and "frames_in=3" in line
        and "frames_out=3" in line
        and "close_code=1000" in line
        for line in lines
    ), lines
    metrics = await _metrics_text(proxy)
    assert 'aoai_proxy_websocket_sessions_total{close_code="1000"} 1.0' in metrics
    assert 'aoai_proxy_websocket_frames_total{direction="in"} 3.0' in metrics


async def _metrics_text(proxy: RunningProxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as r:
        return await r.text()


async def test_a_session_goes_through_the_egress_proxy_with_its_credentials(
    make_proxy: ProxyFactory,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedProxy() as egress:
        use_proxy(monkeypatch, egress.url("svc:ws-secret@"), no_proxy="127.0.0.1")  # Entra direct
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        async with open_session(proxy) as ws:
            await ws.send("through the tunnel")
            assert await ws.recv() == "through the tunnel"
    [head] = egress.heads
    assert head.startswith(f"CONNECT localhost:{aoai.port} HTTP/1.1\r\n".encode())
    assert values_of(head, b"proxy-authorization") == [
        b"Basic " + base64.b64encode(b"svc:ws-secret")
    ]
    assert aoai.requests[-1].client_id == CLIENT_ID
    assert all(name.lower() != "proxy-authorization" for name, _ in aoai.requests[-1].headers)
    assert "ws-secret" not in caplog.text


async def test_no_proxy_applies_to_sessions_as_to_requests(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Matched per host, as for HTTP (egress): websockets alone would match "host:port" too.
    async with ScriptedProxy() as egress:
        use_proxy(monkeypatch, egress.url(), no_proxy=f"127.0.0.1,localhost:{aoai.port}")
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        async with open_session(proxy) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        async with aiohttp.ClientSession() as session:
            url = proxy.url + "/openai/deployments/e/embeddings?api-version=1"
            async with session.post(url, json={"input": "x"}) as response:
                assert response.status == 200
    assert len(egress.heads) == 2  # both through the proxy: the port does not match


async def test_an_egress_proxy_refusing_the_session_is_a_502_without_its_credentials(
    make_proxy: ProxyFactory,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedProxy("refuse") as egress:
        use_proxy(monkeypatch, egress.url("svc:ws-secret@"), no_proxy="127.0.0.1")
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        with pytest.raises(InvalidStatus) as refused:
            async with open_session(proxy):
                pass
    assert refused.value.response.status_code == 502
    body = refused.value.response.body.decode()
    assert (
        f"through the egress proxy 127.0.0.1:{egress.port} (HTTPS_PROXY): it answered 407 Proxy "
        "Authentication Required; give its credentials in the proxy URL"
    ) in body
    assert "ws-secret" not in body + caplog.text
    assert not any(r.raw_path.startswith("/openai/realtime") for r in aoai.requests)
