"""The proxy port's HTTP/1.1 server: one asyncio protocol per client connection, llhttp-parsed.

Why not aiohttp's server here: every request paid for a Request object, a middleware chain
and a StreamResponse, about half the proxy's CPU once the upstream client was raw (issue 8).
This server does what a relay needs and no more, with the same rules in the same modules:
`inbound` (framing, Host, key), `health`, `metrics`, `logs`, `relay.forward`.

Two ways through: a request whose body is whole (small enough to keep for a 401 replay) takes
the express lane (`_Express`): from this parser's callback to an idle pooled upstream
connection and back from that connection's parser callbacks, with no task, coroutine or
buffer. Everything else (streamed bodies, probes, errors, a 401 to replay, no idle upstream
connection) is served by a task running `relay.forward`.

A WebSocket handshake is served by a task too (`_serve_upgrade`): `websocket.py` checks it and
opens the upstream session; the upstream's refusal goes back as a plain answer, else the 101
does and the socket is the session's (websockets' own connection) until it ends, with the
bytes that followed the head. Other upgrades (h2c) and CONNECT, which llhttp also reports as
upgrades, are refused.

Framing toward the client (RFC 9112 6): a response with Content-Length keeps it and its
bytes; a response without one is sent chunked to an HTTP/1.1 client and close-delimited to
an HTTP/1.0 client; HEAD, 1xx, 204 and 304 carry no body. The proxy adds only what framing
needs (Transfer-Encoding, Connection: close), never Date, Server or a Content-Type.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from typing import Any, cast

import httptools
from mypy_extensions import mypyc_attr

from .config import Settings
from .credentials import TokenSource
from .errors import (
    BadFraming,
    BadGateway,
    BadRequest,
    ExpectationFailed,
    HeadersTooLarge,
    MethodNotImplemented,
    NotFound,
    NotReady,
    ProxyError,
    RequestTimeout,
    UriTooLong,
    VersionNotSupported,
)
from .forwarding import (
    REFUSED_METHODS,
    client_response_headers,
    method_problem,
    redact_target,
    upstream_request_headers,
    upstream_request_id,
    upstream_url,
)
from .health import HEALTH_PATHS, readiness
from .inbound import MAX_HEADER_BYTES, InboundKeys, framing_problem, host_problem, key_problem
from .lifecycle import Lifecycle
from .logs import CLIENT_CLOSED_REQUEST, SessionStats, UpstreamTiming, access_line
from .metrics import Metrics
from .readbuffer import ReadBuffer, ReadsIntoBuffer
from .relay import Upstream, forward
from .upstream import PooledConnection, PooledUpstream
from .websocket import Refusal, open_session, relay

log = logging.getLogger(__name__)
# Answered errors keep the logger name they had under aiohttp's server (app.py), so filters
# and alerts written against it keep working.
errors_log = logging.getLogger("aoai_auth_proxy.app")
# As relay.py logs it for the task way: one logger for "the upstream broke off".
relay_log = logging.getLogger("aoai_auth_proxy.relay")

# The limits aiohttp's server applied on this port before (tests/integration/test_hostile.py).
MAX_FIELD_BYTES = 8190
MAX_HEADER_FIELDS = 128
MAX_TARGET_BYTES = 8190
# Request body bytes buffered ahead of the upstream before the client socket is paused.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
# Bytes for the client collected within one loop iteration before they are sent at once.
WRITE_COALESCE_BYTES = 64 * 1024
METRICS_PATH = "/metrics"
# Fields a request may carry once (RFC 9110 5.3: a repeat of these cannot be combined); a
# second Host in particular lets two parsers disagree on where a request goes.
_SINGLETONS = frozenset({b"host", b"content-length", b"content-type", b"transfer-encoding"})
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}  # parsed once, not per request
# How long a refused connection is read (and discarded) before it closes.
_LINGER_SECONDS = 1.0
# Bytes read with no parser callback: one field line at its limits (name and value, 8190
# bytes each), with room for a read that ends just past one.
_MAX_STALLED_BYTES = 2 * MAX_FIELD_BYTES + 4096
_FRAMING_LENGTHS = frozenset(len(name) for name in (*_SINGLETONS, b"upgrade", b"expect"))
_NO_BODY = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@mypyc_attr(native_class=False)  # an exception stays a Python class: see logs.NOT_NATIVE
class _Refused(Exception):
    """A request the parser callbacks stop at once: answered with `error`, then closed."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


class _Body:
    """A request body as it arrives, handed to the relay piece by piece (flow controlled)."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.received = 0
        self.done = False
        self.expect_continue = False
        # Kept whole (at most PROXY_REPLAY_MAX_BYTES) before the request starts: reading it
        # must not pause at the streaming water mark.
        self.kept = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > BODY_HIGH_WATER and not self.kept:
            self._connection.pause_reading("body")
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next piece; b"" at the end. ConnectionError if the client left mid-body."""
        if self.expect_continue:
            self.expect_continue = False
            if not self.received and not self.done:  # it did not send the body unasked
                self._connection.write(_CONTINUE)
                self._connection._arm_idle_timer()  # the body is due now
        while not self._pieces:
            if self.done:
                return b""
            if self._connection.lost:
                raise ConnectionResetError("the client left while sending its body")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        piece = self._pieces.popleft()
        self._buffered -= len(piece)
        if self._buffered <= BODY_LOW_WATER:
            self._connection.resume_reading("body")
        return piece

    def take(self) -> bytes:
        """The whole body, once it is done (express way)."""
        data = b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        return data

    def put_back(self, data: bytes | None) -> None:
        if data:
            self._pieces.appendleft(data)
            self._buffered += len(data)

    async def read_all(self) -> bytes:
        parts = []
        while piece := await self.read():
            parts.append(piece)
        return b"".join(parts)

    def pieces(self) -> AsyncIterator[bytes]:
        """The rest of the body, piece by piece (an iterator class: mypyc compiles no async
        generator)."""
        return self

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.read()
        if not piece:
            raise StopAsyncIteration
        return piece

    def lost(self) -> None:
        self._wake()


class _Request:
    __slots__ = (
        "body",
        "chunked",
        "content_length",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "upgrade_offer",
        "version",
    )

    def __init__(self, connection: ClientConnection) -> None:
        self.method = ""
        self.target = b""
        self.version = (1, 1)
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.body = _Body(connection)
        self.upgrade = False
        self.content_length: int | None = None
        self.chunked = False
        self.host = b""
        self.upgrade_offer: bytes | None = None

    def streams(self, settings: Settings) -> bool:
        """It starts before its body is in: a streamed body, or a client waiting for 100
        Continue; else it is kept whole (at most PROXY_REPLAY_MAX_BYTES) first."""
        length = self.content_length
        return (
            self.chunked
            or self.body.expect_continue
            or (length is not None and length > settings.replay_max_bytes)
        )


class Frontend:
    """What every connection on the proxy port shares: the app's state and the open
    connections (for the connection limit and for draining)."""

    def __init__(
        self,
        settings: Settings,
        *,
        token_source: TokenSource,
        upstream: Upstream,
        lifecycle: Lifecycle,
        metrics: Metrics,
        keys: InboundKeys | None,
        hosts: frozenset[str] | None,
        upstream_ssl: ssl.SSLContext,
        access_log: logging.Logger,
        admin: bool = False,
    ) -> None:
        self.settings = settings
        self.token_source = token_source
        self.upstream = upstream
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.keys = keys
        self.hosts = hosts
        self.upstream_ssl = upstream_ssl  # TLS trust for WebSocket sessions upstream
        self.access_log = access_log
        # The admin port (PROXY_ADMIN_PORT): probes and /metrics only, nothing forwarded,
        # counted or access-logged; kubelet and Prometheus need no key or Host name there.
        self.admin = admin
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self.reads = ReadBuffer()

    def connection(self) -> asyncio.Protocol:
        """A new connection's protocol (see ClientConnection on why the cast holds)."""
        return cast(asyncio.Protocol, ClientConnection(self))

    def close_idle(self) -> None:
        """Draining: idle keep-alive connections close now, busy ones after their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()

    def abort_all(self) -> None:
        for connection in list(self.connections):
            connection.abort()


class ClientConnection(ReadsIntoBuffer):
    """One client connection: requests in order (pipelined ones wait their turn), each
    relayed by a task of its own that the connection cancels if the client goes away.

    An asyncio protocol by its methods, not by subclassing asyncio.Protocol: compiled by
    mypyc (hatch_build.py), a class with a Python base would get weak references its
    deallocation does not clear. The event loop only ever calls these methods by name; reads
    arrive through ReadsIntoBuffer (readbuffer.py)."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__(frontend.reads)
        self._frontend = frontend
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: _Request | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._express: _Express | None = None
        self._serving: _Request | None = None
        self._url = bytearray()
        self._header_bytes = 0
        self._progressed = False  # a parser callback ran during this read
        self._stalled_bytes = 0  # bytes read since one last ran
        self._paused_by: set[str] = set()
        self._can_write: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0  # loop time; 0: not waiting for a request head
        self._pending_upgrade: tuple[_Request, bytes] | None = None
        self._refusal: ProxyError | None = None
        self._lingering = False  # answered for the last time: input is discarded
        self._send_timer: asyncio.TimerHandle | None = None  # while the client reads nothing
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._holding = 0
        self.lost = False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have their methods.
        self._transport = cast(asyncio.Transport, transport)
        self._frontend.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._refusal is not None or self._pending_upgrade is not None or self._lingering:
            return  # nothing after a refused request, an upgrade head or the end is HTTP
        self._progressed = False
        try:
            self._parser.feed_data(data)
            request = self._parsing
            if request is not None and request.method and not request.body.expect_continue:
                # A body still to come: PROXY_HEADER_TIMEOUT from each read to the next
                # (nginx's client_body_timeout); its 100 Continue, if asked for, arms it.
                self._arm_idle_timer()
            if self._progressed:
                self._stalled_bytes = 0
            else:
                # llhttp keeps a field that has not ended yet (httptools joins its pieces):
                # bound what a line that never ends may make it hold, as nginx's
                # large_client_header_buffers does, in the head and in chunked trailers.
                self._stalled_bytes += len(data)
                if self._stalled_bytes > _MAX_STALLED_BYTES:
                    self._refuse(
                        HeadersTooLarge(
                            f"A request or trailer line exceeds {MAX_FIELD_BYTES} bytes"
                        )
                    )
        except httptools.HttpParserUpgrade as upgrade:
            request = self._parsing
            self._parsing = None
            if request is None:
                self._refuse(BadFraming("Malformed upgrade request"))
                return
            self._pending_upgrade = (request, bytes(data[upgrade.args[0] :]))
            self.pause_reading("upgrade")
            if not self._busy:
                self._next()  # else once the answer in progress is out
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause.error if isinstance(cause, _Refused) else BadFraming(str(exc))
            self._refuse(error)
        except httptools.HttpParserError as exc:
            self._refuse(BadFraming(f"Malformed request: {exc}"))

    def eof_received(self) -> bool:
        # A client that closes its side has gone, as aiohttp and nginx
        # (proxy_ignore_client_abort off) take it: the transport closes, and
        # connection_lost cancels the request in flight with its upstream request.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._frontend.connections.discard(self)
        self._stop_idle_timer()
        self._stop_send_timer()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        for request in (self._parsing, *self._queue):
            if request is not None:
                request.body.lost()
        self._queue.clear()
        if self._task is not None and not self._task.done():
            # As aiohttp's handler_cancellation: the upstream request ends with the client.
            self._task.cancel()
        if self._express is not None:
            self._express.cancel()

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()
        if self._send_timer is None:
            # A client that reads nothing for PROXY_HEADER_TIMEOUT is cut off (nginx's
            # send_timeout): it would hold its upstream request and buffers for ever.
            timeout = self._frontend.settings.header_timeout
            self._send_timer = self._loop.call_later(timeout, self._send_timed_out)
        if self._express is not None:
            self._express.client_paused()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._stop_send_timer()
        if self._express is not None:
            self._express.client_resumed()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self._transport is not None and not self.lost:
            timeout = self._frontend.settings.header_timeout
            log.warning("a client read nothing for %g s (PROXY_HEADER_TIMEOUT): cut off", timeout)
            self._transport.abort()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._progressed = True
        self._parsing = _Request(self)
        self._url.clear()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._progressed = True
        self._url += url
        if len(self._url) > MAX_TARGET_BYTES:
            raise _Refused(UriTooLong(f"The request target exceeds {MAX_TARGET_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progressed = True
        request = self._parsing
        assert request is not None
        if request.method:
            return  # a trailer field after a chunked body: never a header (RFC 9110 6.5.1)
        if len(name) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise _Refused(HeadersTooLarge(f"A request header exceeds {MAX_FIELD_BYTES} bytes"))
        if len(request.headers) >= MAX_HEADER_FIELDS:
            raise _Refused(HeadersTooLarge(f"More than {MAX_HEADER_FIELDS} request headers"))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(HeadersTooLarge(f"Request headers exceed {MAX_HEADER_BYTES} bytes"))
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._progressed = True
        request = self._parsing
        assert request is not None
        self._cancel_idle_timer()
        parser = self._parser
        request.method = parser.get_method().decode("ascii")
        request.target = bytes(self._url)
        version = parser.get_http_version()
        known = _VERSIONS.get(version)
        if known is not None:
            request.version = known
        else:
            request.version = (int(version[0]), int(version[2])) if len(version) == 3 else (0, 9)
        request.keep_alive = parser.should_keep_alive() and request.version >= (1, 1)
        request.upgrade = parser.should_upgrade()
        seen: set[bytes] = set()
        for name, value in request.headers:
            if len(name) not in _FRAMING_LENGTHS:
                continue  # none of the names below: not lower-cased (most names are not)
            lowered = name.lower()
            if lowered in _SINGLETONS:
                if lowered in seen:
                    raise _Refused(BadFraming(f"Repeated {name.decode('latin-1')} header"))
                seen.add(lowered)
            if lowered == b"host":
                request.host = value
            elif lowered == b"upgrade":
                request.upgrade_offer = value
            elif lowered == b"content-length":
                request.content_length = int(value)
            elif lowered == b"transfer-encoding":
                request.chunked = True
            elif lowered == b"expect":
                if value.lower() != b"100-continue":
                    raise _Refused(ExpectationFailed("Only Expect: 100-continue is supported"))
                request.body.expect_continue = request.version >= (1, 1)
        if b"host" not in seen and request.version >= (1, 1):
            # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
            raise _Refused(BadFraming("An HTTP/1.1 request must carry a Host header"))
        if request.method == "CONNECT":
            # Never a tunnel to anywhere; and what follows the head would be the tunnel's.
            raise _Refused(MethodNotImplemented("The proxy does not forward CONNECT requests"))
        if request.upgrade:
            offer = request.upgrade_offer
            if request.chunked or request.content_length:
                # llhttp reads a body before it stops at the upgrade; a handshake has none
                # (RFC 6455 4.1), and what follows a refused one must be the next request.
                raise _Refused(BadRequest("A WebSocket handshake cannot carry a body"))
            if offer is not None and not _is_websocket(offer):
                # h2c and other upgrades through a proxy are a known smuggling path; what
                # follows such a head is not HTTP/1.1 the proxy can read, so the connection
                # ends after the requests before it are answered.
                raise _Refused(BadRequest(f"Upgrade to {_text(offer)!r} is not supported"))
            return  # httptools raises HttpParserUpgrade next: see data_received
        request.body.kept = not request.streams(self._frontend.settings)
        self._queue.append(request)
        if self._busy:
            self.pause_reading("pipeline")  # one request at a time, in order
        else:
            self._next()

    def on_body(self, body: bytes) -> None:
        self._progressed = True
        if self._parsing is not None:
            self._parsing.body.feed(body)

    def on_message_complete(self) -> None:
        self._progressed = True
        self._cancel_idle_timer()  # the body is in
        if self._parsing is not None and not self._parsing.upgrade:
            self._parsing.body.finish()
            self._parsing = None
            if not self._busy and self._queue:
                self._next()  # a request whose whole body it waited for

    # -- flow control and writing -----------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        if not self._paused_by and self._transport is not None and not self.lost:
            self._transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._paused_by:
            return
        self._paused_by.discard(reason)
        if not self._paused_by and self._transport is not None and not self.lost:
            self._transport.resume_reading()
            request = self._parsing
            if request is not None and request.method:
                self._arm_idle_timer()  # a body is due again: its timeout starts afresh

    def hold(self) -> None:
        """Writes from now until `release` go out together (an express exchange delivering
        one upstream read), with no call_soon round through the loop."""
        self._holding += 1

    def release(self) -> None:
        self._holding -= 1
        if not self._holding:
            self.flush()

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; what one loop iteration writes (a small response's
        head, body and end) goes out in one send instead of three."""
        if self.lost:
            return
        if not self._out and not self._holding:
            self._loop.call_soon(self.flush)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= WRITE_COALESCE_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if self._transport is not None and not self.lost:
            self._transport.write(data)

    async def drain(self) -> None:
        if self._out_bytes >= WRITE_COALESCE_BYTES:
            self.flush()
        if self.lost:
            raise ConnectionResetError("the client closed the connection")
        if self._can_write is not None and not self._can_write.done():
            await self._can_write
            if self.lost:
                raise ConnectionResetError("the client closed the connection")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def draining(self) -> bool:
        return self._frontend.closing

    @property
    def frontend(self) -> Frontend:
        return self._frontend

    def close_if_idle(self) -> None:
        idle = not self._busy and not self._queue and self._parsing is None
        if idle and self._transport is not None:
            self.flush()
            self._transport.close()

    # -- requests, one at a time ------------------------------------------------------------

    @property
    def _busy(self) -> bool:
        return self._task is not None or self._express is not None

    def _next(self) -> None:
        """Start the next queued request, or hand the connection over, or wait for one.

        A request whose body is small enough to keep (PROXY_REPLAY_MAX_BYTES) starts once it
        is whole: then it usually goes the express way (`_Express`). Others start at once
        and stream (`_serve`, a task), as do requests the express way cannot take."""
        self._task = None
        self._express = None
        if self.lost:
            return
        if self._queue:
            request = self._queue[0]
            if not (request.body.done or request.streams(self._frontend.settings)):
                self.resume_reading("pipeline")  # wait for the rest of its body
                return
            self._queue.popleft()
            self._serving = request
            # Its body (if still coming) must flow; a request pipelined behind it pauses
            # reading again once its head is in (on_headers_complete).
            self.resume_reading("pipeline")
            if not self._try_express(request):
                self._task = self._loop.create_task(self._serve(request))
            return
        self._serving = None
        if self._refusal is not None:
            self._send_refusal()
            return
        if self._pending_upgrade is not None:
            # Kept set: nothing the client sends from here on is read as HTTP (data_received).
            self._task = self._loop.create_task(self._serve_upgrade(*self._pending_upgrade))
            return
        if self._frontend.closing:
            self.close_if_idle()
            return
        self.resume_reading("pipeline")
        self._arm_idle_timer()

    def _try_express(self, request: _Request) -> bool:
        """Relay `request` by callbacks if nothing about it needs the task path: its body
        is whole, it passes the inbound rules, a token is held and a pooled upstream
        connection is idle. False (nothing sent, nothing answered) otherwise."""
        frontend = self._frontend
        upstream = frontend.upstream
        if not isinstance(upstream, PooledUpstream) or not request.body.done or frontend.admin:
            return False
        if request.chunked or request.upgrade_offer is not None:
            return False
        if not (1, 0) <= request.version <= (1, 1) or request.method in REFUSED_METHODS:
            return False  # the task way answers these
        target = _text(request.target)
        path = target.partition("?")[0]
        if path in _RESERVED:
            return False
        token = frontend.token_source.held()
        if token is None:
            return False
        headers = [(_text(n), _text(v)) for n, v in request.headers]
        if self._admission_problem(request, path, headers) is not None:
            return False  # the task way answers it
        try:
            url = upstream_url(frontend.settings.api_base_url, target)
        except ProxyError:
            return False
        body = request.body.take() if request.content_length is not None else None
        express = _Express(self, request, path, target, token, body)
        forwarded = upstream_request_headers(
            headers, token=token, host=frontend.settings.upstream_host
        )
        connection = upstream.express(request.method, url, forwarded, body, express)
        if connection is None:
            request.body.put_back(body)
            return False
        express.start(connection)
        self._express = express
        return True

    def _admission_problem(
        self, request: _Request, path: str, headers: Sequence[tuple[str, str]]
    ) -> ProxyError | None:
        """The inbound rules (inbound.py): the Host name, then the key (probes need none)."""
        frontend = self._frontend
        if frontend.hosts is not None and (
            problem := host_problem(frontend.hosts, _text(request.host))
        ):
            return problem
        # Only the probes the proxy answers itself (GET/HEAD) go without a key; any other
        # method on those paths is forwarded, with the proxy's token.
        if frontend.keys is not None and not (
            path in HEALTH_PATHS and request.method in _PROBE_METHODS
        ):
            return key_problem(frontend.keys, headers)
        return None

    def express_done(self, express: _Express, *, keep_alive: bool) -> None:
        """An express exchange has answered (or been cut); go on with the connection."""
        if self._express is not express:
            return
        self._express = None
        if self.lost:
            return
        if keep_alive:
            if self._queue:
                # Not from inside the upstream connection's parser callback, which may have
                # just put that connection back in the pool for the next request to take.
                self._express = express  # still busy until then
                self._loop.call_soon(self._resume_after, express)
            else:
                self._next()
        elif self._transport is not None:
            self._close()

    def express_fallback(
        self, express: _Express, request: _Request, body: bytes | None, rejected: str | None
    ) -> None:
        """The express way cannot finish `request`: the task way takes it from the start."""
        if self._express is express:
            self._express = None
            request.body.put_back(body)
            if not self.lost:
                self._task = self._loop.create_task(self._serve(request, rejected=rejected))

    def _resume_after(self, express: _Express) -> None:
        if self._express is express:
            self._next()

    async def _serve(self, request: _Request, *, rejected: str | None = None) -> None:
        frontend = self._frontend
        task = asyncio.current_task()
        assert task is not None
        if not frontend.admin:  # a probe or a scrape is not a request to drain
            frontend.lifecycle.enter(task)
        started = time.monotonic()
        response = _Response(self, request)
        path = request.target.partition(b"?")[0].decode("latin-1")
        observed = path not in _RESERVED and not frontend.admin
        if observed:
            frontend.metrics.in_flight += 1
        status = 500
        try:
            await self._answer(request, path, response, rejected=rejected)
            status = response.status
        except ProxyError as exc:
            status = exc.status
            if not frontend.admin:
                self.log_error(request, exc)
            if response.started:
                response.abort()  # a head is out: the client must see a broken response
            else:
                await response.send_error(exc)
        except asyncio.CancelledError:
            if self._refusal is not None and not response.started:
                status = self._refusal.status  # its body was malformed: _refuse answers
            else:
                status = CLIENT_CLOSED_REQUEST  # client gone, or the shutdown grace is over
                response.abort()
        except Exception:
            log.exception("%s %s failed", request.method, redact_target(_text(request.target)))
            if response.started:
                response.abort()
            else:
                await response.send_error(ProxyError("Internal proxy error"))
        finally:
            self._account(
                request,
                path,
                status,
                started,
                response,
                observed=observed,
                streamed=response.event_stream,
                bytes_in=request.body.received,
            )
            if not frontend.admin:
                frontend.lifecycle.leave(task)
        if response.keep_alive and not self.lost:
            self._next()
        elif not self.lost and self._transport is not None:
            self._task = None
            self._close()

    def _admit(self, request: _Request, path: str) -> list[tuple[str, str]]:
        """What every request the tasks serve must pass before it is answered: the HTTP
        version, sound framing and the inbound rules (ProxyError if not). Its headers, as
        latin-1 text of their bytes."""
        if request.version > (1, 1):
            # RFC 9110 15.6.6: this port speaks HTTP/1.x only (an HTTP/2 client sends a preface
            # llhttp already refuses; this is a request line that claims a later version).
            major, minor = request.version
            raise VersionNotSupported(f"HTTP/{major}.{minor} is not supported; use HTTP/1.1")
        if request.chunked or request.version < (1, 0):  # else no rule of it applies
            problem = framing_problem(request.version, request.headers)
            if problem is not None:
                raise problem
        headers = [(_text(n), _text(v)) for n, v in request.headers]
        if problem := self._admission_problem(request, path, headers):
            raise problem
        return headers

    def _account(
        self,
        request: _Request,
        path: str,
        status: int,
        started: float,
        response: _Response,
        *,
        observed: bool,
        streamed: bool,
        bytes_in: int,
        session: SessionStats | None = None,
    ) -> None:
        """A served request's metrics (`observed`: counted in flight since it began) and
        access line; the admin port writes none."""
        frontend = self._frontend
        seconds = time.monotonic() - started
        if observed:
            frontend.metrics.in_flight -= 1
            frontend.metrics.observe(
                request.method,
                frontend.metrics.deployment(path),
                str(status),
                seconds,
                streamed=streamed,
                timing=response.timing,
                session=session,
            )
        if not frontend.admin:
            access_line(
                frontend.access_log,
                request.method,
                _text(request.target),
                status,
                bytes_in=bytes_in,
                bytes_out=response.bytes_out,
                seconds=seconds,
                upstream=response.timing,
                session=session,
            )

    async def _answer(
        self, request: _Request, path: str, response: _Response, *, rejected: str | None
    ) -> None:
        frontend = self._frontend
        headers = self._admit(request, path)
        if request.method in _PROBE_METHODS and path in _RESERVED:
            await self._reserved(request, path, response)
            return
        if frontend.admin:
            raise NotFound(_ADMIN_ONLY)
        if request.upgrade_offer is not None:
            # h2c and other upgrades through a proxy are a known smuggling path: refuse them
            # rather than drop the header and let the two ends disagree on the protocol.
            offered = _text(request.upgrade_offer)
            raise BadRequest(f"Upgrade to {offered!r} is not supported")
        # Refused before the body is asked for (100 Continue) or read: forward() would refuse
        # these only once it had the body.
        if problem := method_problem(request.method):
            raise problem
        upstream_url(frontend.settings.api_base_url, _text(request.target))
        body: Any = None
        length = request.content_length
        if request.chunked or (length is not None and length > frontend.settings.replay_max_bytes):
            body = request.body.pieces()
        elif length:
            body = await request.body.read_all()
        elif length == 0:
            body = b""
        response.timing = UpstreamTiming()
        await forward(
            frontend.settings,
            frontend.token_source,
            frontend.upstream,
            response,
            method=request.method,
            raw_target=_text(request.target),
            headers=headers,
            body=body,
            timing=response.timing,
            rejected=rejected,
        )
        await response.end()

    async def _reserved(self, request: _Request, path: str, response: _Response) -> None:
        frontend = self._frontend
        if path == METRICS_PATH:
            page, content_type = frontend.metrics.exposition()
            await response.send_whole(200, page, content_type)
            return
        if path == "/health/live":
            # Independent of Entra and the upstream: restarting the pod would not fix either.
            status, body = 200, {"status": "ok"}
        else:
            token = frontend.token_source.status()
            status, body = readiness(token, draining=frontend.lifecycle.draining)
        await response.send_whole(
            status, _json(body), "application/json", extra=(("Cache-Control", "no-store"),)
        )

    async def _serve_upgrade(self, request: _Request, early: bytes) -> None:
        """A WebSocket handshake, with `early` the bytes that came after its head. The same
        rules, counts and access line as `_serve`; the line is written when the session ends,
        with its frames and close code."""
        frontend = self._frontend
        task = asyncio.current_task()
        assert task is not None
        if not frontend.admin:  # as in _serve
            frontend.lifecycle.enter(task)
        started = time.monotonic()
        # Not upgraded after all (refused, or an error): the connection goes on as HTTP/1.1.
        # Its head was all of the request (one with a body is refused in on_headers_complete;
        # llhttp stops after the head: what follows is `early`).
        request.body.finish()
        response = _Response(self, request)
        target = _text(request.target)
        path = target.partition("?")[0]
        observed = path not in _RESERVED and not frontend.admin
        if observed:
            frontend.metrics.in_flight += 1
        status = 500
        stats: SessionStats | None = None
        try:
            headers = self._admit(request, path)
            if request.method in _PROBE_METHODS and path in _RESERVED:
                await self._reserved(request, path, response)
                status = response.status
            elif frontend.admin:
                raise NotFound(_ADMIN_ONLY)
            elif frontend.closing:
                # A session opened now would be cut at the end of the grace period.
                raise NotReady("The proxy is shutting down: open the session again")
            else:
                outcome = await open_session(
                    frontend.settings,
                    frontend.token_source,
                    frontend.upstream_ssl,
                    method=request.method,
                    target=target,
                    version=request.version,
                    headers=headers,
                )
                if isinstance(outcome, Refusal):
                    sized = (*outcome.headers, ("Content-Length", str(len(outcome.body))))
                    response.head_now(outcome.status, outcome.reason, sized)
                    response.body_now(outcome.body)
                    await self.drain()
                    status = outcome.status
                else:
                    stats = SessionStats()
                    try:
                        response.started = True
                        response.write_now(outcome.answer)  # ConnectionError: client gone
                        status = response.status = 101
                        transport = self._take_over()
                    except BaseException:
                        await outcome.abandon()
                        raise
                    await relay(
                        outcome,
                        transport,
                        early,
                        stats,
                        send_timeout=frontend.settings.header_timeout,
                    )
        except ProxyError as exc:
            status = exc.status
            if not frontend.admin:
                self.log_error(request, exc)
            if not response.started and not self.lost:
                await response.send_error(exc)
        except asyncio.CancelledError:
            if stats is None:  # a session keeps its 101; relay() closed it with 1001
                status = CLIENT_CLOSED_REQUEST
                response.abort()
        except ConnectionError:
            status = CLIENT_CLOSED_REQUEST  # it left while the upstream was answering
        except Exception:
            log.exception("%s %s failed", request.method, redact_target(target))
            if not response.started and not self.lost:
                await response.send_error(ProxyError("Internal proxy error"))
        finally:
            self._account(
                request,
                path,
                status,
                started,
                response,
                observed=observed,
                streamed=False,
                bytes_in=0,
                session=stats,
            )
            if not frontend.admin:
                frontend.lifecycle.leave(task)
            if stats is not None:
                # The socket was the session's: its end is this connection's end.
                self.lost = True
                frontend.connections.discard(self)
                if self._transport is not None:
                    self._transport.abort()  # closed already, unless the session never began
        if self.lost or self._transport is None:
            return
        self._task = None
        if not response.keep_alive:
            self._close_lingering()  # the client may have sent more after its head
            return
        # llhttp stops for good at an upgrade: a new parser reads what the client sent next.
        self._pending_upgrade = None
        self._parser = httptools.HttpRequestParser(self)
        self.resume_reading("upgrade")
        if early:
            self.data_received(early)
        if not self._busy and not self.lost:
            self._next()

    def _take_over(self) -> asyncio.Transport:
        """The client's transport, for a WebSocket session: the 101 is out, no timer of this
        connection is left, and reading is paused until the session's protocol has it
        (uvloop chooses how reads arrive, into our buffer or as bytes, when reading starts)."""
        transport = self._transport
        assert transport is not None
        self.flush()
        self._stop_idle_timer()
        self._stop_send_timer()
        transport.pause_reading()
        self._paused_by.clear()
        return transport

    def _refuse(self, error: ProxyError) -> None:
        """A request that cannot be served (malformed, too large, its body stalled): answer
        it after the requests before it, then close; nothing after it is read."""
        log.warning("refused a malformed request: %s (HTTP %d)", error.message, error.status)
        self._refusal = error
        self.pause_reading("refused")
        broken, self._parsing = self._parsing, None
        if broken is not None and broken in self._queue:
            self._queue.remove(broken)  # its head was sound; its body is not
        if self._task is not None and broken is not None and broken is self._serving:
            # Its body turned out malformed: it must not reach (or finish reaching) the
            # upstream. A task that has not run yet never starts.
            self._task.cancel()
            self._task.add_done_callback(lambda _: self._send_refusal())
        elif not self._busy and not self._queue:
            self._send_refusal()
        # Else the sound requests pipelined before it are answered first, in order, as nginx
        # does; _next() sends the refusal once they are.

    def _send_refusal(self) -> None:
        error = self._refusal
        if error is None or self.lost or self._transport is None or self._lingering:
            return  # (sent already: _next and a cancelled task's callback may both try)
        if self._transport.is_closing():
            return  # an answer was under way and has been cut
        self.flush()
        self._transport.write(_refusal_bytes(error))
        self._close_lingering()

    def _close(self) -> None:
        """Close after an answer that said `Connection: close`: at once, unless input may
        be left unread (a body not read to its end, a refused or paused-on request)."""
        request = self._serving
        if self._refusal is not None or self._paused_by or (request and not request.body.done):
            self._close_lingering()
        else:
            assert self._transport is not None
            self.flush()
            self._transport.close()

    def _close_lingering(self) -> None:
        """Close a connection that may have unread input after its last answer. Closing
        with unread input sends a reset, which can destroy that answer before the client
        reads it: half-close, read on and discard (data_received) for a moment, then close,
        as nginx's lingering_close does."""
        transport = self._transport
        assert transport is not None
        self._lingering = True
        self.flush()
        transport.write_eof()
        self._stop_idle_timer()
        self._paused_by.clear()
        transport.resume_reading()
        self._loop.call_later(_LINGER_SECONDS, transport.close)

    def log_error(self, request: _Request, exc: ProxyError) -> None:
        errors_log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            redact_target(_text(request.target)),
            exc.status,
            exc.code,
            exc.message,
        )

    def _arm_idle_timer(self) -> None:
        # A connection waiting for a request head gets PROXY_HEADER_TIMEOUT to send it
        # whole: idle keep-alive and slow-header clients alike (nginx's client_header_timeout).
        # While a body is due, each read re-arms it (client_body_timeout). Arming sets a
        # deadline; the loop timer is made only if none is pending: a
        # keep-alive connection would otherwise make and cancel one per request.
        timeout = self._frontend.settings.header_timeout
        self._idle_deadline = self._loop.time() + timeout
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(timeout, self._idle_check)

    def _cancel_idle_timer(self) -> None:
        self._idle_deadline = 0.0  # a pending timer finds nothing to do (see _idle_check)

    def _stop_idle_timer(self) -> None:
        """The connection is gone or handed over: no timer is left pending for it."""
        self._idle_deadline = 0.0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_check(self) -> None:
        self._idle_timer = None
        if not self._idle_deadline:
            return  # disarmed: a request (or its body) came
        remaining = self._idle_deadline - self._loop.time()
        if remaining > 0:  # re-armed since this timer was made
            self._idle_timer = self._loop.call_later(remaining, self._idle_check)
            return
        self._idle_deadline = 0.0
        request = self._parsing
        if request is not None and request.method and self._refusal is None and not self.lost:
            if self._paused_by:  # the proxy is not reading (flow control, pipelining): not
                self._arm_idle_timer()  # the client's pause; resume_reading re-arms as well
                return
            timeout = self._frontend.settings.header_timeout
            message = f"The request body stalled: nothing arrived for {timeout:g} s"
            self._refuse(RequestTimeout(f"{message} (PROXY_HEADER_TIMEOUT)"))
            return
        if not self._busy and self._transport is not None:
            self.flush()
            self._transport.close()


def _is_websocket(offer: bytes) -> bool:
    """Whether an Upgrade header offers WebSocket (RFC 6455 4.1), the one upgrade relayed."""
    return any(token.strip().lower() == b"websocket" for token in offer.split(b","))


_RESERVED = frozenset((*HEALTH_PATHS, METRICS_PATH))
_PROBE_METHODS = ("GET", "HEAD")
_ADMIN_ONLY = "The admin port serves GET /health, /health/ready, /health/live and /metrics only"


class _Express:
    """One request relayed by callbacks, from the upstream connection's parser straight to
    the client's transport: no task, no coroutine, no buffer (issue 8). It answers exactly
    as the task way (`relay.forward`) does; where it cannot go on (an upstream 401, a stale
    pooled connection) it hands the request to the task way before anything is sent."""

    def __init__(
        self,
        client: ClientConnection,
        request: _Request,
        path: str,
        target: str,
        token: str,
        body: bytes | None,
    ) -> None:
        self._client = client
        self._body = body  # kept: the task way sends it again after a 401
        self._request = request
        self._path = path
        self._target = target
        self._token = token
        self._started = time.monotonic()
        self._connection: PooledConnection | None = None
        self._done = False
        self.response = _Response(client, request)
        self.timing = self.response.timing = UpstreamTiming()

    def start(self, connection: PooledConnection) -> None:
        self._connection = connection
        frontend = self._client.frontend
        frontend.lifecycle.enter(self)
        frontend.metrics.in_flight += 1

    # -- ResponseSink ---------------------------------------------------------------------

    def on_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        timing = self.timing
        if status == 401 and self._client.frontend.token_source.may_renew(self._token):
            # Azure refused the token: the task way renews it and sends the request again
            # (its body is kept), exactly as for any request (relay.forward).
            self._detach()
            self._leave()
            self._client.express_fallback(self, self._request, self._body, self._token)
            return
        timing.ttfb = time.monotonic() - self._started
        forwarded = client_response_headers(headers)
        timing.request_id = upstream_request_id(forwarded)
        try:
            self.response.head_now(status, reason, forwarded)
        except ProxyError as exc:
            timing.error_kind = exc.kind
            self._detach()
            self._fail_before_head(exc)
        except ConnectionError:
            self._detach()
            self._cut("client_gone")

    def on_body(self, data: bytes) -> None:
        try:
            self.response.body_now(data)
        except ConnectionError:
            self._detach()
            self._cut("client_gone")

    def hold(self) -> None:
        self._client.hold()

    def release(self) -> None:
        self._client.release()

    def on_end(self) -> None:
        self._connection = None
        try:
            self.response.end_now()
        except ConnectionError:
            self._cut("client_gone")
            return
        # The answer goes out now, before its metrics and access line: the client need not
        # wait for the bookkeeping (latency at one connection, issue 8).
        self._client.flush()
        self._finish(self.response.status, keep_alive=self.response.keep_alive)

    def on_error(self, error: ProxyError, *, retry: bool) -> None:
        self._connection = None
        if retry and not self.response.started:
            self._leave()
            self._client.express_fallback(self, self._request, self._body, None)
            return
        self.timing.error_kind = error.kind
        if not self.response.started:
            self._fail_before_head(error)
            return
        relay_log.warning("upstream broke off mid-response, aborting the client: %s", error.message)
        self.timing.aborted = f"upstream:{error.code}"
        self.response.abort()
        self._finish(self.response.status, keep_alive=False)

    # -- the client side ----------------------------------------------------------------------

    def client_paused(self) -> None:
        if self._connection is not None:
            self._connection.pause_for_client()

    def client_resumed(self) -> None:
        if self._connection is not None:
            self._connection.resume_for_client()

    def cancel(self) -> None:
        """The client left, or the shutdown grace is over: cut both sides (499)."""
        if not self._done:
            self._detach()
            self._cut("client_gone" if self._client.lost else None)

    # -- internals ----------------------------------------------------------------------------

    def _detach(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()  # not reused half-read

    def _cut(self, reason: str | None) -> None:
        if reason is not None:
            self.timing.aborted = reason
        self.response.abort()
        self._finish(CLIENT_CLOSED_REQUEST, keep_alive=False)

    def _fail_before_head(self, error: ProxyError) -> None:
        self._client.log_error(self._request, error)
        try:
            self.response.error_now(error)
        except ConnectionError:
            self._cut("client_gone")
            return
        self._finish(error.status, keep_alive=self.response.keep_alive)

    def _leave(self) -> None:
        if not self._done:
            self._done = True
            frontend = self._client.frontend
            frontend.metrics.in_flight -= 1
            frontend.lifecycle.leave(self)

    def _finish(self, status: int, *, keep_alive: bool) -> None:
        if self._done:
            return
        self._leave()
        frontend = self._client.frontend
        seconds = time.monotonic() - self._started
        frontend.metrics.observe(
            self._request.method,
            frontend.metrics.deployment(self._path),
            str(status),
            seconds,
            streamed=self.response.event_stream,
            timing=self.timing,
        )
        access_line(
            frontend.access_log,
            self._request.method,
            self._target,
            status,
            bytes_in=self._request.body.received,
            bytes_out=self.response.bytes_out,
            seconds=seconds,
            upstream=self.timing,
        )
        self._client.express_done(self, keep_alive=keep_alive)


class _Response:
    """The relay's Downstream on a ClientConnection: writes the head and frames the body."""

    def __init__(self, connection: ClientConnection, request: _Request) -> None:
        self._connection = connection
        self._request = request
        self.status = 0
        self.started = False
        self.keep_alive = request.keep_alive
        self.bytes_out = 0
        self.event_stream = False
        self.timing: UpstreamTiming | None = None
        self._chunked = False
        self._bodyless = False

    async def send_head(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None:
        self.head_now(status, reason, headers)
        await self._connection.drain()

    def head_now(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None:
        """Queue the head (see `ClientConnection.write`); BadGateway if it cannot be sent."""
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        sized = False
        for name, value in headers:
            if "\r" in value or "\n" in value or "\x00" in value or "\n" in name:
                raise BadGateway(
                    f"Upstream sent a header the proxy cannot relay: {name!r}", kind="protocol"
                )
            size = len(name)  # only a name of their length is lower-cased: most are not
            if size == 14 and name.lower() == "content-length":
                sized = True
            elif size == 12 and name.lower() == "content-type":
                self.event_stream = value.startswith("text/event-stream")
            lines.append(f"{name}: {value}\r\n")
        request = self._request
        self._bodyless = request.method == "HEAD" or status in _NO_BODY or status < 200
        if not self._bodyless and not sized:
            if request.version >= (1, 1):
                self._chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends when the connection does
        self._finish_head(lines)
        self.status = status
        self.write_now("".join(lines).encode("latin-1"))

    def _finish_head(self, lines: list[str]) -> None:
        connection = self._connection
        if not self._request.body.done or connection.draining:
            # The client's body is not read to its end (or we are draining): the
            # connection cannot carry another request.
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        self.started = True

    async def send(self, chunk: bytes) -> None:
        self.body_now(chunk)
        await self._connection.drain()

    def body_now(self, chunk: bytes) -> None:
        if self._bodyless or not chunk:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        self.write_now(chunk)

    async def end(self) -> None:
        self.end_now()
        await self._connection.drain()

    def end_now(self) -> None:
        if self._chunked:
            self._chunked = False
            self.write_now(b"0\r\n\r\n")

    def abort(self) -> None:
        self.keep_alive = False
        self._connection.abort()

    async def send_whole(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.whole_now(status, body, content_type, extra=extra)
        await self._connection.drain()

    def whole_now(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        lines = _whole_head(status, content_type, len(body), extra)
        self._finish_head(lines)
        self.status = status
        head = "".join(lines).encode("latin-1")
        self.write_now(head if self._request.method == "HEAD" else head + body)

    async def send_error(self, error: ProxyError) -> None:
        self.error_now(error)
        await self._connection.drain()

    def error_now(self, error: ProxyError) -> None:
        if error.closes_connection:
            self.keep_alive = False
        self.whole_now(error.status, error.error_body(), "application/json")

    def write_now(self, data: bytes) -> None:
        connection = self._connection
        if connection.lost:
            raise ConnectionResetError("the client closed the connection")
        connection.write(data)
        self.bytes_out += len(data)


def _whole_head(
    status: int, content_type: str, length: int, extra: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """The head lines of an answer the proxy writes itself, up to its connection lines."""
    return [
        f"HTTP/1.1 {status} {_PHRASES.get(status, '')}\r\n",
        f"Content-Type: {content_type}\r\n",
        f"Content-Length: {length}\r\n",
        *(f"{name}: {value}\r\n" for name, value in extra),
    ]


def _refusal_bytes(error: ProxyError) -> bytes:
    """The answer to a request that could not be parsed: the connection closes after it."""
    body = error.error_body()
    lines = _whole_head(error.status, "application/json", len(body))
    lines += ["Connection: close\r\n", "\r\n"]
    return "".join(lines).encode("latin-1") + body


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _text(raw: bytes) -> str:
    # latin-1 maps each byte to one character: the upstream client writes the same bytes back.
    return raw.decode("latin-1")


_PHRASES = {status.value: status.phrase for status in HTTPStatus}
