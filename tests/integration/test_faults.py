"""Faults the proxy survives. Each test checks what the client sees, what the proxy logs, and
that `/health/live` stays 200 (restarting the process would not fix any of these).

Tested elsewhere, not repeated here: upstream unreachable (502), idle before the headers (504),
an SSE stream cut mid-way, a client leaving before the upstream answered (test_failures); Entra
down during a refresh (test_tokens); the connection limit (test_operations).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from aoai_auth_proxy.app import LIFECYCLE
from aoai_auth_proxy.testing import AzureOpenAIStandIn, CertificateAuthority, EntraStandIn
from tests.conftest import ProxyFactory, RunningProxy, eventually, wait_ready

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
MESSAGES = {"messages": [{"role": "user", "content": "hello"}]}
AUDIENCE = "https://cognitiveservices.azure.com"
CREDENTIALS_LOGGER = "aoai_auth_proxy.credentials"
ACCESS_LOGGER = "aoai_auth_proxy.access"


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def live(proxy: RunningProxy) -> bool:
    status, body = await get_json(proxy.url + "/health/live")
    return status == 200 and body == {"status": "ok"}


async def health_reason_containing(
    proxy: RunningProxy, text: str, *, seconds: float
) -> dict[str, Any]:
    """Poll /health until its 503 reason contains `text`; liveness is checked at every poll."""
    deadline = time.monotonic() + seconds
    while True:
        status, body = await get_json(proxy.url + "/health")
        assert await live(proxy)
        if status == 503 and text in body.get("reason", ""):
            assert body["status"] == "unavailable"
            return dict(body)
        assert status == 503, body  # never ready while Entra misbehaves
        assert time.monotonic() < deadline, f"/health never said {text!r}: {body}"
        await asyncio.sleep(0.1)


def messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == logger]


# -- Entra at start-up: down, slow, answering garbage ----------------------------------------


async def test_entra_down_at_start_up_is_503_with_the_reason_backs_off_then_turns_ready(
    make_proxy: ProxyFactory, entra: EntraStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    entra.fail_next(1_000_000, status=503)  # "down": every token request fails
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        proxy = await make_proxy(ready=False)
        body = await health_reason_containing(proxy, "AADSTS50001", seconds=15)
        assert "temporarily unavailable" in body["reason"]
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + CHAT, json=MESSAGES) as response,
        ):
            assert response.status == 503
            error = (await response.json())["error"]
            assert error["code"] == "no_valid_token"
            assert "AADSTS50001" in error["message"]
        # Retries back off: azure-identity makes ~4 attempts per fetch (0.8 s, 1.6 s, 3.2 s
        # apart) and the proxy waits 0.5-1 s, 1-2 s, 2-4 s... between fetches. A loop that
        # spun would have made hundreds of requests by now.
        elapsed = time.monotonic() - started
        assert 2 <= entra.token_requests <= 2 + 1.5 * elapsed, (entra.token_requests, elapsed)
        entra.fail_next(0)  # Entra is back
        await wait_ready(proxy.url, timeout=15)
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + CHAT, json=MESSAGES) as response,
    ):
        assert response.status == 200
    assert await live(proxy)
    failures = messages(caplog, CREDENTIALS_LOGGER)
    assert any(
        m.startswith("token acquisition failed; retry in ") and "AADSTS50001" in m for m in failures
    ), failures
    assert any(m.startswith("token acquired") for m in failures)


async def test_entra_slower_than_the_token_timeout_is_503_did_not_answer_then_recovers(
    make_proxy: ProxyFactory, entra: EntraStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    entra.delay = 5.0
    with caplog.at_level(logging.INFO):
        proxy = await make_proxy(ready=False, PROXY_TOKEN_TIMEOUT="0.3")
        await health_reason_containing(proxy, "did not answer within 0.3 s", seconds=5)
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + CHAT, json=MESSAGES) as response,
        ):
            assert response.status == 503
            error = (await response.json())["error"]
        assert error["code"] == "no_valid_token"
        assert "did not answer" in error["message"]
        entra.delay = 0.0
        await wait_ready(proxy.url, timeout=10)
    assert await live(proxy)
    assert any("did not answer within 0.3 s" in m for m in messages(caplog, CREDENTIALS_LOGGER))


class GarbageAuthority:
    """A TLS server, trusted like the Entra stand-in, that answers every request with `body`."""

    def __init__(self, ca: CertificateAuthority, body: bytes, content_type: str) -> None:
        self.requests = 0
        self._body = body
        self._content_type = content_type
        self._ssl = ca.issue_server_certificate().ssl_context()
        self._runner: web.AppRunner | None = None

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.Response(body=self._body, content_type=self._content_type)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._ssl).start()
            yield f"https://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


# A realistic error page from an egress proxy or a captive portal, padded to 64 KiB.
HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    + b"<p>upstream connect error or disconnect/reset before headers</p>" * 1000
    + b"</body></html>"
)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b"this is not json", "application/json", id="not-json"),
        pytest.param(b'{"unexpected": "shape"}', "application/json", id="json-without-token"),
        pytest.param(HTML_PAGE, "text/html", id="html-page"),
    ],
)
async def test_entra_answering_garbage_is_503_with_a_short_reason_and_no_spinning(
    make_proxy: ProxyFactory,
    ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: str,
) -> None:
    garbage = GarbageAuthority(ca, body, content_type)
    async with garbage.running() as authority:
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            proxy = await make_proxy(ready=False, AZURE_AUTHORITY_HOST=authority)
            await eventually(lambda: _fetches_failed(caplog), True, seconds=5)
            await asyncio.sleep(0.5)  # a spinning loop would show here
            status, health = await get_json(proxy.url + "/health")
            async with (
                aiohttp.ClientSession() as session,
                session.post(proxy.url + CHAT, json=MESSAGES) as response,
            ):
                assert response.status == 503
                error = (await response.json())["error"]
        elapsed = time.monotonic() - started
    assert status == 503
    assert await live(proxy)
    assert health["reason"]
    assert error["code"] == "no_valid_token"
    assert 1 <= garbage.requests <= 2 + 1.5 * elapsed, (garbage.requests, elapsed)
    # What a third party answered is not echoed at length: /health is unauthenticated (and
    # on the admin listener, reachable from the pod network), and it repeats at every probe.
    reason_length = len(health["reason"])
    assert reason_length <= 1000, f"/health repeats a {reason_length}-character reason"
    failures = [m for m in messages(caplog, CREDENTIALS_LOGGER) if "failed" in m]
    assert failures
    longest = max(len(m) for m in failures)
    assert longest <= 2000, f"a {longest}-character error page went into one log line"


async def _fetches_failed(caplog: pytest.LogCaptureFixture) -> bool:
    return any("failed" in m for m in messages(caplog, CREDENTIALS_LOGGER))


# -- an upstream that breaks the protocol or resets ----------------------------------------

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream on loopback: verifies each request's bearer token with the Entra
    stand-in, then lets a script write (or not) the answer byte by byte."""

    def __init__(self, entra: EntraStandIn, script: Script) -> None:
        self.entra = entra
        self.script = script
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            token = next(
                line.split(b" ", 2)[2]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"authorization: bearer ")
            )
            assert self.entra.verify_access_token(token.decode(), audience=AUDIENCE)
            self.requests += 1
            await self.script(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def answer(raw: bytes) -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return script


async def reset_at_once(writer: asyncio.StreamWriter) -> None:
    reset(writer)


def reset_after(raw: bytes) -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(0.2)  # the proxy has relayed the first part by now
        reset(writer)

    return script


def stall_after(raw: bytes) -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(3)  # well past PROXY_READ_TIMEOUT

    return script


PARTIAL_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
PARTIAL_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n"
)


@pytest.mark.parametrize(
    ("script", "says"),
    [
        pytest.param(
            answer(
                b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok"
            ),
            "Got more than 8190 bytes",
            id="header-over-8-kib",
        ),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 200 + b"Content-Length: 2\r\n\r\nok"),
            "Too many headers",
            id="too-many-headers",
        ),
        pytest.param(
            answer(b"HTTP/1.1 two-hundred OK\r\nContent-Length: 2\r\n\r\nok"),
            "failed",
            id="invalid-status-line",
        ),
        pytest.param(answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "failed", id="not-http"),
        pytest.param(reset_at_once, "closed the connection", id="reset-before-the-response"),
    ],
)
async def test_an_upstream_failing_before_its_response_is_a_502_json(
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    caplog: pytest.LogCaptureFixture,
    script: Script,
    says: str,
) -> None:
    upstream = ScriptedUpstream(entra, script)
    try:
        proxy = await make_proxy(API_BASE_URL=await upstream.start())
        with caplog.at_level(logging.INFO):
            # POST, as the SDKs send: aiohttp's client silently sends an idempotent method
            # (GET, PUT, DELETE) a second time after a reset (SECURITY.md, "Known and accepted").
            async with (
                aiohttp.ClientSession() as session,
                session.post(proxy.url + CHAT, json=MESSAGES) as response,
            ):
                assert response.status == 502
                assert response.content_type == "application/json"
                error = json.loads(await response.read())["error"]
        assert upstream.requests == 1
        assert await live(proxy)
    finally:
        await upstream.close()
    assert error["type"] == "proxy_error"
    assert error["code"] == "upstream_unreachable"
    assert says in error["message"]
    assert any("-> 502 upstream_unreachable" in m for m in messages(caplog, "aoai_auth_proxy.app"))


@pytest.mark.parametrize(
    ("script", "says"),
    [
        pytest.param(reset_after(PARTIAL_LENGTH), "broke off", id="reset-in-a-sized-body"),
        pytest.param(reset_after(PARTIAL_CHUNKED), "broke off", id="reset-in-a-chunked-body"),
        pytest.param(stall_after(PARTIAL_LENGTH), "did not answer in time", id="stall-mid-body"),
    ],
)
async def test_an_upstream_failing_during_its_response_aborts_the_client_connection(
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    caplog: pytest.LogCaptureFixture,
    script: Script,
    says: str,
) -> None:
    upstream = ScriptedUpstream(entra, script)
    try:
        proxy = await make_proxy(API_BASE_URL=await upstream.start(), PROXY_READ_TIMEOUT="0.5")
        with caplog.at_level(logging.INFO):
            async with (
                aiohttp.ClientSession() as session,
                session.get(proxy.url + "/openai/models") as response,
            ):
                assert response.status == 200
                first = await response.content.readany()
                assert first.startswith(b"x")
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.content.read()  # never a clean end of a truncated body
            await asyncio.sleep(0.1)
        assert await live(proxy)
    finally:
        await upstream.close()
    warnings = messages(caplog, "aoai_auth_proxy.relay")
    assert any(
        m.startswith("upstream broke off mid-response, aborting the client") and says in m
        for m in warnings
    ), warnings
    access = messages(caplog, ACCESS_LOGGER)
    assert any("aborted=upstream:" in m for m in access), access


# -- clients that vanish -----------------------------------------------------------------------


class Tracker:
    """What the scripted upstream routes saw, per request id (`?id=` in the path)."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.cancelled_at: dict[str, float] = {}
        self.finished: set[str] = set()

    def started_event(self, request_id: str) -> asyncio.Event:
        return self.started.setdefault(request_id, asyncio.Event())

    def cancelled(self, request_id: str) -> None:
        self.cancelled_at[request_id] = asyncio.get_running_loop().time()


@pytest.fixture
def tracker() -> Tracker:
    return Tracker()


@pytest.fixture
def upstream_routes(tracker: Tracker) -> list[tuple[str, str, Any]]:
    async def upload(request: web.Request) -> web.StreamResponse:
        request_id = request.query["id"]
        received = 0
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
                tracker.started_event(request_id).set()
        except (asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
            tracker.cancelled(request_id)
            raise
        tracker.finished.add(request_id)
        return web.json_response({"received": received})

    async def stream(request: web.Request) -> web.StreamResponse:
        request_id = request.query["id"]
        events = int(request.query.get("events", "200"))  # 200 x 50 ms: 10 s unless cut
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            for n in range(events):
                await response.write(b"data: %d\n\n" % n)
                tracker.started_event(request_id).set()
                await asyncio.sleep(0.05)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            tracker.cancelled(request_id)
            raise
        tracker.finished.add(request_id)
        return response

    return [("POST", "/vanish/upload", upload), ("GET", "/vanish/stream", stream)]


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received.set()


async def vanish(proxy: RunningProxy, tracker: Tracker, request_id: str, kind: str) -> float:
    """Start an upload or a stream on a raw connection, wait until the upstream is busy with it,
    then drop the connection without a word (an abort: RST, as a killed process would). Returns
    the loop time of the abort."""
    host, port = proxy.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_Client, host, int(port))
    try:
        if kind == "upload":  # chunked, so it streams instead of being kept for a 401 replay
            transport.write(
                f"POST /vanish/upload?id={request_id} HTTP/1.1\r\nHost: localhost\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + b"10000\r\n"
                + bytes(0x10000)
                + b"\r\n"
            )
        else:
            transport.write(
                f"GET /vanish/stream?id={request_id} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            )
        await asyncio.wait_for(tracker.started_event(request_id).wait(), 5)
        if kind == "stream":
            await asyncio.wait_for(client.received.wait(), 5)  # mid-stream for the client too
    finally:
        transport.abort()
    return loop.time()


@pytest.mark.parametrize("kind", ["upload", "stream"])
async def test_a_client_vanishing_mid_request_or_mid_stream_cancels_the_upstream_within_a_second(
    proxy: RunningProxy, tracker: Tracker, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        aborted = await vanish(proxy, tracker, "one", kind)
        assert await eventually(lambda: _cancelled(tracker, "one"), True, seconds=2.0)
        assert tracker.cancelled_at["one"] - aborted < 1.0
        await asyncio.sleep(0.05)
    assert "one" not in tracker.finished
    assert await live(proxy)
    path = "POST /vanish/upload?id=one" if kind == "upload" else "GET /vanish/stream?id=one"
    access = messages(caplog, ACCESS_LOGGER)
    assert any(m.startswith(f"{path} status=499") for m in access), access


async def _cancelled(tracker: Tracker, request_id: str) -> bool:
    return request_id in tracker.cancelled_at


async def test_a_client_vanishing_while_its_small_body_is_kept_never_reaches_the_upstream(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    # Bodies up to PROXY_REPLAY_MAX_BYTES are read whole before the upstream is called (kept
    # for a 401 replay): a client that leaves half-way must not start an upstream request.
    host, port = proxy.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /vanish/upload?id=kept HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
        + bytes(1000)
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    await asyncio.sleep(0.3)
    assert aoai.requests == []
    assert await live(proxy)


def _upstream_connections(port: int) -> int:
    """This process's established TCP connections to `port` (the proxy's pooled and in-use
    upstream connections; the stand-in's own sockets have `port` as their local port)."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def _completed(proxy: RunningProxy, request_id: str, kind: str) -> None:
    async with aiohttp.ClientSession() as session:
        if kind == "upload":
            async with session.post(
                f"{proxy.url}/vanish/upload?id={request_id}", data=_chunks()
            ) as response:
                assert response.status == 200
        else:
            async with session.get(f"{proxy.url}/vanish/stream?id={request_id}&events=3") as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def _chunks() -> AsyncIterator[bytes]:
    for _ in range(4):
        yield bytes(0x4000)


async def test_fifty_vanished_clients_leak_no_descriptor_task_or_pooled_connection(
    proxy: RunningProxy,
    aoai: AzureOpenAIStandIn,
    tracker: Tracker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = psutil.Process()
    lifecycle = proxy.app[LIFECYCLE]

    def counts() -> tuple[int, int, int]:
        return process.num_fds(), len(asyncio.all_tasks()), _upstream_connections(aoai.port)

    # Warm-up: every code path has run once (pools, TLS sessions, lazily built objects).
    for kind in ("upload", "stream"):
        await _completed(proxy, f"warm-{kind}", kind)
        await vanish(proxy, tracker, f"warm-vanish-{kind}", kind)
    assert await eventually(lambda: _idle(proxy), True)
    fds, tasks, pooled = counts()

    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        aborted: dict[str, float] = {}
        for batch in range(5):  # 50 clients, 10 at a time
            ids = [(f"v{batch}-{n}", "upload" if n % 2 else "stream") for n in range(10)]
            times = await asyncio.gather(*(vanish(proxy, tracker, i, kind) for i, kind in ids))
            aborted.update(zip((i for i, _ in ids), times, strict=True))
        assert await eventually(lambda: _all_cancelled(tracker, aborted), True, seconds=3)

        async def settled() -> bool:
            now_fds, now_tasks, now_pooled = counts()
            return (
                lifecycle.inflight == 0
                and now_fds <= fds + 2
                and now_tasks <= tasks + 1
                and now_pooled <= pooled
            )

        clean = await eventually(settled, True, seconds=5)
    after = counts()
    assert clean, f"fds, tasks, upstream connections: before {(fds, tasks, pooled)}, after {after}"
    lateness = max(tracker.cancelled_at[i] - t for i, t in aborted.items())
    assert lateness < 1.0, f"an upstream request outlived its client by {lateness:.2f} s"
    assert not tracker.finished & set(aborted)
    statuses = [m for m in messages(caplog, ACCESS_LOGGER) if "/vanish/" in m and "?id=v" in m]
    assert len(statuses) == 50
    assert all(" status=499 " in m for m in statuses)
    assert await live(proxy)
    await _completed(proxy, "after", "stream")  # and it still serves


async def _idle(proxy: RunningProxy) -> bool:
    return proxy.app[LIFECYCLE].inflight == 0


async def _all_cancelled(tracker: Tracker, aborted: dict[str, float]) -> bool:
    return all(request_id in tracker.cancelled_at for request_id in aborted)
