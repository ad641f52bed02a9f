"""The upstream HTTP/1.1 client: a keep-alive pool of raw asyncio connections parsed by llhttp.

Why not a general-purpose client: a pooled aiohttp session spent about 70% of the proxy's
CPU per request (issue 8). This client does only what a relay needs: write the request the
relay built (its head in one write, its body streamed with flow control), parse the answer
with httptools (llhttp, the parser uvicorn and aiohttp use; HTTP is never hand-parsed here)
and hand the body on chunk by chunk, pausing the upstream socket while the client is slow.

Behaviour a caller can rely on (tested at the socket, tests/integration):
- nothing is added to or removed from the request the relay built, except body framing:
  a streamed body without Content-Length is sent chunked (RFC 9112 7.1);
- connections are reused while the upstream keeps them alive, and never after a response
  that was not read to its end (an aborted stream closes its connection);
- a request is sent once. Only an idempotent request (RFC 9110 9.2.2) that failed on a
  *reused* connection before a single response byte arrived is sent again, once, on a new
  connection: the upstream closed that idle connection as the request went out;
- a connection is not reused either after an answer that came before the whole request
  body was sent (an early 413: the rest is not sent), or after bytes that follow an answer;
- the idle read timeout covers the wait for the response head and every gap between body
  bytes, except while the client is not reading (its own send timeout applies then); a send
  the upstream does not take is bounded by it as well; the connect timeout covers TCP and TLS;
- behind an egress proxy (HTTPS_PROXY/HTTP_PROXY less NO_PROXY, see `egress`) a connection to
  an HTTPS origin is a CONNECT tunnel through it, TLS to the origin inside; one to an HTTP
  origin asks the proxy in absolute form. Either way the request is otherwise the same bytes,
  and the connect timeout covers reaching the proxy, its answer to CONNECT and the TLS.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, cast

import httptools
from mypy_extensions import mypyc_attr

from .egress import REFUSED_407, EgressProxy, egress_proxy
from .errors import BadGateway, GatewayTimeout, ProxyError
from .readbuffer import ReadBuffer, ReadsIntoBuffer
from .relay import UpstreamRequest

# The limits aiohttp's client applied before (and tests/integration/test_faults.py pins):
# a response head with a longer field or more fields than this is refused with a 502.
MAX_FIELD_BYTES = 8190
MAX_HEADER_FIELDS = 128
MAX_HEAD_BYTES = 64 * 1024
# Upstream bytes buffered for a client that reads slower than the upstream writes, before
# the upstream socket is paused (TCP then pushes back on the upstream).
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024
# An idle pooled connection older than this is not reused: well under the keep-alive of
# Azure's front ends and of common servers, so the upstream rarely closes one under us.
IDLE_SECONDS = 15.0
# Idle connections kept per origin, as nginx's `keepalive` directive bounds them: a burst of
# 1,000 streams leaves at most this many behind.
MAX_IDLE = 256
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_NO_BODY_STATUSES = frozenset({204, 304})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, origin: str) -> Origin:
        scheme, _, authority = origin.partition("://")
        host, port = authority, 443 if scheme == "https" else 80
        if authority.startswith("["):
            host, _, rest = authority[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else port
        elif ":" in authority:
            host, _, number = authority.rpartition(":")
            port = int(number)
        return cls(scheme, host, port)


def split_url(url: str) -> tuple[str, str]:
    """("https://host:port", "/path?query") of an absolute URL the relay built."""
    slash = url.find("/", url.index("//") + 2)
    return (url, "/") if slash < 0 else (url[:slash], url[slash:])


@mypyc_attr(native_class=False)  # an exception stays a Python class: see logs.NOT_NATIVE
class _Failure(Exception):
    """Why a connection failed; `before_response` when not one response byte had arrived."""

    def __init__(self, message: str, *, kind: str, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_response = before_response


class ResponseSink(Protocol):
    """Where an express exchange (PooledUpstream.express) delivers its response, from the
    connection's own callbacks: no task, no future, no buffer between the two sockets."""

    def on_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def hold(self) -> None:
        """Bytes from one upstream read are being delivered: write, do not send yet."""
        ...

    def release(self) -> None:
        """That read is delivered: send what it produced."""
        ...

    def on_end(self) -> None:
        """The response is complete (the connection is back in the pool or closed)."""
        ...

    def on_error(self, error: ProxyError, *, retry: bool) -> None:
        """The exchange failed (the connection is closed). `retry`: it failed on a reused
        connection before any response byte and its method is idempotent (see the module
        docstring), so it may be sent again on a new connection."""
        ...


class PooledConnection(ReadsIntoBuffer):
    """One upstream connection: parses responses, buffers a body within the water marks,
    or hands it straight to a ResponseSink. An asyncio protocol by its methods, not a
    subclass: see http1.ClientConnection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: PooledUpstream, origin: str) -> None:
        super().__init__(pool.reads)
        self.loop = self._loop = loop
        self._pool = pool
        self.origin = origin
        self.sink: ResponseSink | None = None
        self._method = ""
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False  # an express exchange's read timeout applies
        self._held_timing = False  # it did, until the client stopped reading
        self._paused_for_client = False
        self._timeout = 0.0
        self._last_data = 0.0
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._can_write: asyncio.Future[None] | None = None
        # The response being read.
        self.head_request = False
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._raw_head_bytes = 0
        self._header_bytes = 0
        self._head: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self._received_any = False
        self._framed = False  # Content-Length or chunked: EOF before the end is a failure
        self._error: _Failure | None = None
        self._request_cut = False  # answered before the whole request body was sent
        # Through an egress proxy to an HTTP origin: the request target's absolute form
        # (RFC 9112 3.2.2) starts with this, and the proxy's credentials go with each request.
        self.absolute_prefix: str | None = None
        self.proxy_fields: list[tuple[str, str]] = []
        self.proxy_named = ""  # that proxy, as messages name it

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes | memoryview) -> None:
        # uvloop's TLS transport reads through ReadsIntoBuffer too: SSLObject.read() decrypts
        # into the buffer.
        self._received_any = True
        if self._timing:
            self._last_data = self._loop.time()
        sink = self.sink
        if sink is not None:
            # What this read makes the sink write goes out as one send once it is parsed,
            # even if the exchange ends (and the sink is let go) within it.
            sink.hold()
            try:
                self._feed(data)
            finally:
                sink.release()
        else:
            self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("it switched protocols on a plain HTTP request")
        except httptools.HttpParserCallbackError as exc:
            if self._error is None:
                self._fail(str(exc.__context__ or exc))
        except httptools.HttpParserError as exc:
            self._fail(f"invalid response: {exc}")
        if not self.status and not self.complete:
            # Still in the head: httptools holds a field's bytes until it ends, so bound
            # what an upstream can make it hold (on_header bounds each field and the total).
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > MAX_HEAD_BYTES + MAX_FIELD_BYTES:
                self._fail(f"Got more than {MAX_HEAD_BYTES} bytes of response headers")

    def eof_received(self) -> bool:
        if self.status and not self._framed and not self.complete:
            # A close-delimited body (no Content-Length, not chunked) ends here (RFC 9112 6.3).
            # `status`, not the head future, says the head is in: express exchanges have none.
            self._finish(keep_alive=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if not self.complete and (self._head is not None or self.sink is not None):
            message = str(exc) if exc is not None else "it closed the connection"
            self._fail(message, kind="reset")
        self._drop_timer()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a trailer field: never turned into a header (RFC 9110 6.5.1)
        size = len(name) + len(value)
        self._header_bytes += size + 4
        if size > MAX_FIELD_BYTES or self._header_bytes > MAX_HEAD_BYTES:
            self._too_large(name, value)
        headers = self.headers
        if len(headers) >= MAX_HEADER_FIELDS:
            raise _Failure(
                f"Too many headers (more than {MAX_HEADER_FIELDS})",
                kind="protocol",
                before_response=False,
            )
        if len(name) in (14, 17) and (lowered := name.lower()) in _FRAMING:
            self._framed = True  # Content-Length or Transfer-Encoding
            if lowered == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # Any other coding (gzip, chunked) would reach the client undecoded under a
                # plain chunked framing; nginx refuses these too (RFC 9112 6.1).
                raise _Failure(
                    f"Upstream sent Transfer-Encoding {value.decode('latin-1')!r}, which the "
                    "proxy cannot relay",
                    kind="protocol",
                    before_response=False,
                )
        # latin-1: one character per byte, so the client gets exactly these bytes
        headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _too_large(self, name: bytes, value: bytes) -> None:
        if self._header_bytes > MAX_HEAD_BYTES:
            raise _Failure(
                f"Got more than {MAX_HEAD_BYTES} bytes of response headers",
                kind="protocol",
                before_response=False,
            )
        if len(name) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise _Failure(
                f"Got more than {MAX_FIELD_BYTES} bytes in a response header line",
                kind="protocol",
                before_response=False,
            )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (103 Early Hints; a 100 nobody asked for): not relayed, the
            # final response follows on the same connection (RFC 9110 15.2).
            self.headers = []
            self.reason = ""
            self._framed = False
            return
        if status == 407 and self.absolute_prefix is not None:
            # The egress proxy's own refusal, not the origin's answer: the client has no
            # business with the proxy's credentials (the tunnel's 407 is a 502 too).
            why = f"the egress proxy {self.proxy_named} {REFUSED_407}"
            self._fail(why, kind="connect")
            raise _Failure(why, kind="connect", before_response=False)  # stop parsing
        self.status = status
        if status in _NO_BODY_STATUSES:
            self._framed = True
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if status >= 300 and self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)  # a body still going out stops: it is refused
        if self.sink is not None:
            self.sink.on_head(status, self.reason, self.headers)
        if self.head_request:
            # llhttp cannot be told that this answers a HEAD; it would wait for the body the
            # Content-Length announces. The response ends with its head; the connection is
            # not reused.
            self._finish(keep_alive=False)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.sink is not None:
            self.sink.on_body(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status and not self.complete:
            self._finish(keep_alive=self._parser.should_keep_alive())

    # -- for the pool and the response ------------------------------------------------------

    def begin(self, method: str, *, express: bool = False) -> None:
        """Reset the per-response state before a request goes out on this connection."""
        self._method = method
        self.head_request = method == "HEAD"
        self.status = 0
        self.reason = ""
        self.headers = []
        self._raw_head_bytes = 0
        self._header_bytes = 0
        self._head = None if express else self._loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self.complete = False
        self.keep_alive = False
        self._received_any = False
        self._framed = False
        self._error = None
        self._request_cut = False

    def request_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> tuple[bytes, bool]:
        """The request's head as this connection sends it (see `request_head`)."""
        if self.absolute_prefix is not None:
            target = self.absolute_prefix + target
            headers = [*headers, *self.proxy_fields]
        return request_head(method, target, headers, body)

    async def write(self, data: bytes, seconds: float) -> bool:
        """Send request bytes; False once the upstream has answered early, so the rest of
        the body is not sent (RFC 9112 9.3: it "does not wish to receive" it) and the
        connection is not reused. The answer is then relayed as any other. A send that the
        upstream does not take within `seconds` fails (nginx's proxy_send_timeout)."""
        assert self.transport is not None
        if self._error is not None:
            raise self._error
        if self._answered_early():
            return False
        self.transport.write(data)
        can_write = self._can_write
        if can_write is not None and not can_write.done():
            timer = self._loop.call_later(seconds, self._send_timed_out, can_write)
            try:
                await can_write
            finally:
                timer.cancel()
        if self._error is not None:
            raise self._error
        return not self._answered_early()

    def _answered_early(self) -> bool:
        # A final head that refuses the request (3xx-5xx), or any complete answer on a
        # connection the upstream has closed: nothing more of the body can be sent.
        if self.status >= 300 or (self.status and self.closed):
            self._request_cut = True
            return True
        return False

    def _send_timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not self._answered_early():
            self._fail("did not read the request body in time", kind="timeout")
        if not waiter.done():
            waiter.set_result(None)

    async def wait_head(self, seconds: float) -> None:
        assert self._head is not None
        if not self._head.done():
            timer = self._loop.call_later(seconds, self._timed_out, self._head)
            try:
                await self._head
            finally:
                timer.cancel()
        if self._error is not None and not self.status:
            raise self._error

    async def read(self, seconds: float) -> bytes:
        """The next body bytes as they arrived; b"" at the end of the body."""
        while not self._chunks:
            if self.complete:
                # Whole: bytes after it are the connection's fault (it closes), not the answer's.
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(seconds, self._timed_out, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= READ_LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        self.sink = None
        self._drop_timer()
        if self.transport is not None:
            self.transport.abort()

    def start_timer(self, seconds: float) -> None:
        """The idle read timeout of an express exchange: no byte for `seconds` fails it.
        A timer still pending from an earlier exchange on this connection is kept (it fires
        no later than this one would, and re-arms itself): a pooled connection would
        otherwise make and cancel a loop timer per request."""
        self._timeout = seconds
        self._last_data = self._loop.time()
        self._timing = True
        if self._timer is None:
            self._timer = self._loop.call_later(seconds, self._check_idle)

    def pause_for_client(self) -> None:
        """The client is not reading: stop reading from the upstream too. The read timeout
        stops meanwhile; the client's send timeout (http1.py) bounds the wait instead."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._paused_for_client = True
            self._held_timing, self._timing = self._timing, False

    def resume_for_client(self) -> None:
        if self.transport is not None and not self.closed and self._paused_for_client:
            self._paused_for_client = False
            self.transport.resume_reading()
            if self._held_timing:
                self._held_timing = False
                self.start_timer(self._timeout)

    def _check_idle(self) -> None:
        self._timer = None
        if not self._timing:
            return  # the exchange ended; the connection may be idle in the pool
        idle = self._loop.time() - self._last_data
        if idle >= self._timeout:
            self._timing = False
            self._fail("did not answer in time", kind="timeout")
        else:
            self._timer = self._loop.call_later(self._timeout - idle, self._check_idle)

    def _stop_timer(self) -> None:
        self._timing = False  # a pending timer finds nothing to do (see _check_idle)

    def _drop_timer(self) -> None:
        """The connection is done with: no timer is left pending for it."""
        self._timing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- internals --------------------------------------------------------------------------

    def _finish(self, *, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive and not self._request_cut
        self._wake()
        sink = self.sink
        if sink is not None:
            self.sink = None
            self._stop_timer()
            if self._paused_for_client:  # the read that ended it also filled the client's
                self._paused_for_client = self._held_timing = False  # buffer: the next
                if self.transport is not None and not self.closed:  # exchange reads again
                    self.transport.resume_reading()
            if keep_alive:
                self._pool.release(self.origin, self)
            else:
                self.close()
            sink.on_end()

    def _fail(self, message: str, *, kind: str = "protocol") -> None:
        if self._error is None:
            self._error = _Failure(message, kind=kind, before_response=not self._received_any)
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()
        sink, failure = self.sink, self._error
        if self.transport is not None and not self.closed:
            self.close()
        if sink is not None:
            self.sink = None
            retry = self.reused and _may_resend(failure, self._method)
            who = self._pool.named(self.origin)
            error = _mid_body_error(failure, who) if self.status else _head_error(failure, who)
            sink.on_error(error, retry=retry)

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        self._fail("did not answer in time", kind="timeout")
        if not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Response:
    """The seam's UpstreamResponse over one pooled connection."""

    def __init__(
        self, connection: PooledConnection, pool: PooledUpstream, origin: str, read_timeout: float
    ) -> None:
        self._connection = connection
        self._pool = pool
        self._origin = origin
        self._read_timeout = read_timeout
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (an iterator class: mypyc compiles no async generator)."""
        return self

    def __aiter__(self) -> _Response:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._connection.read(self._read_timeout)
        except _Failure as failure:
            raise _mid_body_error(failure, self._pool.named(self._origin)) from None
        if not chunk:
            raise StopAsyncIteration
        return chunk


class _Exchange:
    """`async with pool.open(request) as response`: leaving it returns the connection to
    the pool when the response was read to its end, and closes it otherwise."""

    def __init__(self, pool: PooledUpstream, request: UpstreamRequest) -> None:
        self._pool = pool
        self._request = request
        self._connection: PooledConnection | None = None

    async def __aenter__(self) -> _Response:
        pool, request = self._pool, self._request
        origin, target = split_url(request.url)
        body = request.body
        for attempt in (1, 2):
            connection = await pool.acquire(origin)
            self._connection = connection
            try:
                await _send(
                    connection, request.method, target, request.headers, body, pool.read_timeout
                )
                await connection.wait_head(pool.read_timeout)
            except _Failure as failure:
                connection.close()
                self._connection = None
                retry = (
                    attempt == 1
                    and connection.reused
                    and _may_resend(failure, request.method)
                    and not isinstance(body, AsyncIterable)
                )
                if not retry:
                    raise _head_error(failure, pool.named(origin)) from None
                continue
            except BaseException:
                connection.close()
                self._connection = None
                raise
            return _Response(connection, pool, origin, pool.read_timeout)
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if exc_type is None and connection.complete and connection.keep_alive:
            self._pool.release(split_url(self._request.url)[0], connection)
        else:
            connection.close()


def request_head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: AsyncIterable[bytes] | bytes | None,
) -> tuple[bytes, bool]:
    """The request's head as written upstream, and whether its body goes chunked."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    sized = False
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
        if not sized and len(name) == 14 and name.lower() == "content-length":
            sized = True
    # bytes or None first: an isinstance() against the AsyncIterable ABC costs a microsecond.
    chunked = not sized and body is not None and not isinstance(body, bytes)
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif isinstance(body, bytes) and not sized:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    # Header values are latin-1 text of the bytes the client sent (see http1._text), so
    # this restores those bytes exactly.
    return "".join(lines).encode("latin-1"), chunked


async def _send(
    connection: PooledConnection,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: AsyncIterable[bytes] | bytes | None,
    seconds: float,
) -> None:
    connection.begin(method)
    head, chunked = connection.request_head(method, target, headers, body)
    if body is None or isinstance(body, bytes):
        await connection.write(head + body if body else head, seconds)
        return
    if not await connection.write(head, seconds):
        return
    async for piece in body:
        if not piece:
            continue
        framed = b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece
        if not await connection.write(framed, seconds):
            return  # answered early: the answer is relayed, the rest of the body is not sent
    if chunked:
        await connection.write(b"0\r\n\r\n", seconds)


def _may_resend(failure: _Failure, method: str) -> bool:
    """A reused connection that failed this way had been closed by the upstream as the
    request went out (RFC 9112 9.3.1); only an idempotent request may go again."""
    return failure.before_response and failure.kind == "reset" and method in IDEMPOTENT


def _head_error(failure: _Failure, who: str) -> ProxyError:
    """`who` is the pool's peer and origin ("upstream https://..."), as `PooledUpstream.named`."""
    who = who[:1].upper() + who[1:]
    if failure.kind == "timeout":
        return GatewayTimeout(f"{who} did not answer in time", kind="timeout")
    if failure.kind == "reset":
        return BadGateway(f"{who} closed the connection: {failure}", kind="reset")
    return BadGateway(f"{who} failed: {failure}", kind=failure.kind)


def _mid_body_error(failure: _Failure, who: str) -> ProxyError:
    who = who[:1].upper() + who[1:]
    if failure.kind == "timeout":
        return GatewayTimeout(f"{who} did not answer in time", kind="timeout")
    return BadGateway(f"{who} broke off its response: {failure}", kind="reset")


class PooledUpstream:
    """The seam's Upstream: keep-alive connections to the upstream origin, reused LIFO.

    `peer` and `ca_settings` only word its errors: the token path's pool (`tokenhttp`) is
    "Entra ID", whose CA only SSL_CERT_FILE adds."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout: float,
        read_timeout: float,
        idle_seconds: float = IDLE_SECONDS,
        peer: str = "upstream",
        ca_settings: str = "SSL_CERT_FILE or PROXY_UPSTREAM_CA_FILE",
    ) -> None:
        self.peer = peer
        self._ca_settings = ca_settings
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle_seconds = idle_seconds
        self._idle: dict[str, list[PooledConnection]] = {}
        self._all: set[PooledConnection] = set()
        self.reads = ReadBuffer()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()

    def open(self, request: UpstreamRequest) -> _Exchange:
        return _Exchange(self, request)

    def named(self, origin: str) -> str:
        """How errors name a connection's other end: "upstream https://..."."""
        return f"{self.peer} {origin}"

    async def acquire(self, origin: str) -> PooledConnection:
        return self._idle_connection(origin) or await self._connect(origin)

    def _idle_connection(self, origin: str) -> PooledConnection | None:
        idle = self._idle.get(origin)
        if idle:
            # The connection's own loop: asyncio.get_running_loop() costs a getpid() system
            # call per call on Python 3.11.
            now = idle[-1].loop.time()
            while idle:
                connection = idle.pop()
                if connection.closed or now - connection.idle_since > self._idle_seconds:
                    self._drop(connection)
                    continue
                connection.reused = True
                return connection
        return None

    def express(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        sink: ResponseSink,
    ) -> PooledConnection | None:
        """Send a request whose body is whole on an idle pooled connection, now, and have
        its response delivered to `sink`; None when no connection is idle (use open())."""
        origin, target = split_url(url)
        connection = self._idle_connection(origin)
        if connection is None:
            return None
        assert connection.transport is not None
        connection.begin(method, express=True)
        connection.sink = sink
        head, _ = connection.request_head(method, target, headers, body)
        connection.transport.write(head + body if body else head)
        connection.start_timer(self.read_timeout)
        return connection

    def forget(self, connection: PooledConnection) -> None:
        self._all.discard(connection)

    def release(self, origin: str, connection: PooledConnection) -> None:
        idle = self._idle.setdefault(origin, [])
        if connection.closed or len(idle) >= MAX_IDLE:
            self._drop(connection)
            return
        now = connection.idle_since = connection.loop.time()
        # LIFO reuse leaves the oldest at the bottom: close those past IDLE_SECONDS here, so
        # a burst's connections do not linger until the upstream closes them.
        while idle and now - idle[0].idle_since > self._idle_seconds:
            self._drop(idle.pop(0))
        idle.append(connection)

    def _drop(self, connection: PooledConnection) -> None:
        connection.close()
        self._all.discard(connection)

    async def _connect(self, origin: str) -> PooledConnection:
        where = Origin.of(origin)
        try:
            proxy = egress_proxy(where.scheme, where.host)
        except ValueError as exc:  # load_settings refuses such a URL at start-up
            raise BadGateway(f"Cannot reach {self.named(origin)}: {exc}", kind="connect") from None
        loop = asyncio.get_running_loop()
        tls = where.scheme == "https"
        connection = PooledConnection(loop, self, origin)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if proxy is None:
                    await loop.create_connection(
                        lambda: cast(asyncio.BaseProtocol, connection),
                        where.host,
                        where.port,
                        ssl=self._ssl_context if tls else None,
                        server_hostname=where.host if tls else None,
                    )
                elif tls:
                    await self._tunnel(loop, connection, where, proxy)
                else:
                    connection.absolute_prefix = origin
                    connection.proxy_named = proxy.named
                    if proxy.authorization is not None:
                        connection.proxy_fields = [("Proxy-Authorization", proxy.authorization)]
                    await self._reach_proxy(
                        loop, lambda: cast(asyncio.BaseProtocol, connection), origin, proxy
                    )
        except TimeoutError:
            connection.close()
            via = "" if proxy is None else f" through the egress proxy {proxy.named}"
            raise GatewayTimeout(
                f"Cannot connect to {self.named(origin)}{via}: timed out", kind="connect"
            ) from None
        except ssl.SSLError as exc:
            connection.close()
            # Verification is never switched off: name the CA settings that fix it.
            raise BadGateway(
                f"TLS with {self.named(origin)} failed: {exc}; trust its CA with "
                f"{self._ca_settings}",
                kind="tls",
            ) from None
        except OSError as exc:
            connection.close()
            message = f"Cannot connect to {self.named(origin)}: {str(exc) or type(exc).__name__}"
            raise BadGateway(message, kind="connect") from None
        except BaseException:
            connection.close()
            raise
        self._all.add(connection)
        return connection

    async def _reach_proxy(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: Callable[[], asyncio.BaseProtocol],
        origin: str,
        proxy: EgressProxy,
    ) -> asyncio.Transport:
        try:
            transport, _ = await loop.create_connection(protocol, proxy.host, proxy.port)
        except OSError as exc:
            raise BadGateway(
                f"Cannot connect to the egress proxy {proxy.named} for {self.named(origin)}: {exc}",
                kind="connect",
            ) from None
        return transport

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: PooledConnection,
        where: Origin,
        proxy: EgressProxy,
    ) -> None:
        """A CONNECT tunnel through `proxy` to `where` (RFC 9110 9.3.6), then TLS with the
        origin inside it; `connection` reads and writes the TLS transport."""
        origin = connection.origin
        tunnel = _Tunnel(loop)
        transport = await self._reach_proxy(
            loop, lambda: cast(asyncio.BaseProtocol, tunnel), origin, proxy
        )
        try:
            authority = (
                f"[{where.host}]:{where.port}"
                if ":" in where.host
                else (f"{where.host}:{where.port}")
            )
            fields = f"Host: {authority}\r\n"
            if proxy.authorization is not None:
                fields += f"Proxy-Authorization: {proxy.authorization}\r\n"
            transport.write(f"CONNECT {authority} HTTP/1.1\r\n{fields}\r\n".encode("latin-1"))
            refusal = await tunnel.answered
            if not refusal and tunnel.stray:
                # The origin's TLS has not begun (its client speaks first): bytes here mean
                # the tunnel is not a clean byte pipe.
                refusal = "it sent bytes after opening the tunnel"
            if refusal:
                raise BadGateway(
                    f"The egress proxy {proxy.named} did not open a tunnel to "
                    f"{self.named(origin)}: {refusal}",
                    kind="connect",
                )
            tls_transport = await loop.start_tls(
                transport,
                cast(asyncio.BaseProtocol, connection),
                self._ssl_context,
                server_hostname=where.host,
            )
        except ssl.SSLError:
            transport.close()
            raise  # the origin's TLS: _connect names the CA settings
        except OSError as exc:
            transport.close()
            raise BadGateway(
                f"The egress proxy {proxy.named} broke the tunnel to {self.named(origin)}: "
                f"{str(exc) or type(exc).__name__}",
                kind="connect",
            ) from None
        except BaseException:
            transport.close()
            raise
        assert tls_transport is not None
        # start_tls does not call connection_made: the protocol takes the new transport here.
        connection.connection_made(tls_transport)


class _Tunnel:
    """The proxy's answer to CONNECT, parsed by llhttp. An asyncio protocol by its methods,
    as PooledConnection. `answered` is "" once the tunnel is open (a 2xx), else why not."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answered: asyncio.Future[str] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reason = ""
        self._received = 0
        self.stray = False  # bytes came after the 2xx head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            self.stray = True  # reading is paused once answered; a read already under way
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._answer("it answered 101 Switching Protocols")
        except httptools.HttpParserError as exc:
            if self.answered.done():
                self.stray = True  # bytes after the 2xx head that llhttp cannot parse
            self._answer(f"invalid answer to CONNECT: {exc}")
        if not self.answered.done() and self._received > MAX_HEAD_BYTES:
            self._answer(f"more than {MAX_HEAD_BYTES} bytes of answer head to CONNECT")

    def eof_received(self) -> bool:
        self._answer("it closed the connection without answering CONNECT")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._answer("it closed the connection without answering CONNECT")

    def on_message_begin(self) -> None:
        if self.answered.done():
            self.stray = True  # a second message after the 2xx (one with Content-Length: 0)
        self._reason = ""

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            return  # an interim answer; the final one follows (RFC 9110 15.2)
        if 200 <= code < 300:
            self.answered.set_result("")
            if self.transport is not None:
                self.transport.pause_reading()  # start_tls resumes it under TLS
            return
        if code == 407:
            self._answer(f"it {REFUSED_407}")
        else:
            self._answer(f"it answered {code} {self._reason}".rstrip())

    def on_body(self, body: bytes) -> None:
        if self.answered.done():
            self.stray = True

    def _answer(self, why: str) -> None:
        if not self.answered.done():
            self.answered.set_result(why)
