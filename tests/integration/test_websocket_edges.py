"""WebSocket edges of the proxy's own server side (http1.py + websocket.ClientSide): close
ordering under load, failures, and what happens to the connection when a handshake is
refused. Over real sockets, against scripted aiohttp upstreams. (ClientSide's flow control,
which the kernel's loopback buffers would hide here, is tested against a fake transport in
tests/unit/test_websocket_client_side.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol

from aoai_auth_proxy.testing import AzureOpenAIStandIn
from tests.conftest import ProxyFactory, RunningProxy, eventually
from tests.integration.test_relay_edges import Client

QUERY = "?api-version=1&deployment=d"
CLOSE_LATER = "/openai/close-later"  # reads nothing for 1 s, then closes 4003 "bye"
COUNT = "/openai/count"  # answers "n=<messages so far>" after each message


@pytest.fixture
def upstream_routes() -> list[tuple[str, str, Any]]:
    async def close_later(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await asyncio.sleep(1)
        await ws.close(code=4003, message=b"bye")
        return ws

    async def count(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0, protocols=("count",))
        await ws.prepare(request)
        seen = 0
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                seen += 1
                await ws.send_str(f"n={seen}")
        return ws

    return [("GET", CLOSE_LATER, close_later), ("GET", COUNT, count)]


def ws_url(proxy: RunningProxy, path: str) -> str:
    return "ws" + proxy.url.removeprefix("http") + path + QUERY


def handshake(path: str, *extra: bytes) -> bytes:
    return (
        b"GET " + path.encode() + QUERY.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + b"".join(extra) + b"\r\n"
    )


def frame(opcode: Opcode, data: bytes) -> bytes:
    return Frame(opcode, data).serialize(mask=True, extensions=[])


async def open_raw(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_an_upstream_close_completes_while_the_client_floods(proxy: RunningProxy) -> None:
    ws = await connect(ws_url(proxy, CLOSE_LATER), max_size=None)
    opened = time.monotonic()
    payload = bytes(64 * 1024)

    async def flood() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(payload)

    flooding = asyncio.create_task(flood())
    try:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        await asyncio.wait_for(ws.wait_closed(), 10)
        # The upstream closed after 1 s, and the client's close answer was read although
        # the client kept sending: no 5 s wait for it, then a reset.
        assert time.monotonic() - opened < 3
    finally:
        flooding.cancel()
    assert ws.close_code == 4003


async def test_every_message_before_the_clients_close_reaches_the_upstream(
    proxy: RunningProxy,
) -> None:
    # Sent in one write with the close: all are passed on before the upstream is closed,
    # and the upstream's answers to them may come back until then.
    async with connect(
        ws_url(proxy, COUNT), subprotocols=[Subprotocol("count")], max_size=None
    ) as ws:
        assert ws.subprotocol == "count"
        await ws.send("warm-up")
        assert await ws.recv() == "n=1"
        ws.transport.write(b"".join(frame(Opcode.TEXT, b"m%d" % i) for i in range(50)))
        closing = time.monotonic()
        await ws.close(4005, "done")
        # the upstream's answers nobody takes any more do not hold up its close (no 5 s wait)
        assert time.monotonic() - closing < 2
        answers = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                answers.append(await asyncio.wait_for(ws.recv(), 5))
    assert ws.close_code == 4005  # its own close, answered after the upstream's
    assert answers == [f"n={i}" for i in range(2, 2 + len(answers))]


async def test_nothing_after_invalid_utf8_reaches_the_upstream(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    url = "ws" + proxy.url.removeprefix("http") + "/openai/realtime" + QUERY
    async with connect(url, subprotocols=[Subprotocol("echo")], max_size=None) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        # invalid UTF-8 text, then a valid one, in one write
        ws.transport.write(frame(Opcode.TEXT, b"\xff\xfe") + frame(Opcode.TEXT, b"after"))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007
    session = aoai.realtime_sessions[-1]
    await asyncio.wait_for(session.wait_ended(), 5)
    assert session.messages == [("text", "before")]


async def test_an_upgrade_request_with_a_body_is_refused_at_once(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    reader, writer = await open_raw(proxy)
    body = bytes(300 * 1024)  # past what the proxy buffers before it stops reading
    try:
        writer.write(handshake(COUNT, b"Content-Length: %d\r\n" % len(body)) + body)
        status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    finally:
        writer.transport.abort()
    assert status.startswith(b"HTTP/1.1 400 ")
    assert aoai.requests == []


async def test_a_request_pipelined_behind_a_refused_upgrade_is_answered(
    proxy: RunningProxy,
) -> None:
    # The upstream refuses the session (404): the connection goes on as HTTP/1.1, and the
    # request the client sent right behind the handshake is read by a fresh parser.
    client = await Client.connect(proxy.url)
    try:
        await client.send(
            handshake("/openai/no-such-realtime")
            + b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        refused = await client.read_response()
        probe = await client.read_response()
    finally:
        await client.close()
    assert refused.status == 404
    assert probe.status == 200
    assert probe.body == b'{"status": "ok"}'


async def test_a_session_counts_as_a_connection_until_it_ends(proxy: RunningProxy) -> None:
    frontend = proxy.server.frontend
    assert frontend is not None
    async with connect(
        ws_url(proxy, COUNT), subprotocols=[Subprotocol("count")], max_size=None
    ) as ws:
        await ws.send("x")
        assert await ws.recv() == "n=1"
        assert len(frontend.connections) == 1

    async def open_connections() -> int:
        return len(frontend.connections)

    assert await eventually(open_connections, 0)


async def test_the_admin_port_opens_no_session(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn
) -> None:
    proxy = await make_proxy(PROXY_ADMIN_PORT="0", PROXY_ADMIN_HOST="127.0.0.1")
    host, port = proxy.server.admin_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(handshake(COUNT))
        status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    finally:
        writer.transport.abort()
    assert status.startswith(b"HTTP/1.1 404 ")
    assert aoai.requests == []
