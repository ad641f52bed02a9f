"""The streaming relay: sends a request upstream and streams the answer back, chunk by chunk.

Two seams live here. `Upstream` is the outbound HTTP client (today a pooled aiohttp session);
`relay` wires the pure rules of `forwarding` to it. Behaviour is tested at the socket,
so either side can be replaced by a faster implementation without touching the tests.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Settings
from .credentials import TokenSource
from .errors import BadGateway, GatewayTimeout, ProxyError
from .forwarding import client_response_headers, upstream_request_headers, upstream_url
from .logs import UPSTREAM_TIMING, UpstreamTiming
from .outbound import client_session

log = logging.getLogger(__name__)

# aiohttp would otherwise add these when the client did not send them; a proxy adds nothing.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Sequence[tuple[str, str]] = field(repr=False)
    body: AsyncIterable[bytes] | bytes | None = field(repr=False)


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> Sequence[tuple[str, str]]: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded."""
        ...


class Upstream(Protocol):
    """The outbound HTTP client: open a response; leaving the context releases or aborts it."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def open(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]: ...


def upstream_error(exc: BaseException, url: str) -> ProxyError:
    """The one place where outbound-client exceptions become the proxy's own errors."""
    origin = str(URL(url).origin())
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return GatewayTimeout(f"Cannot connect to upstream {origin}: timed out", kind="connect")
    if isinstance(exc, TimeoutError):  # aiohttp's idle-read timeout
        return GatewayTimeout(f"Upstream {origin} did not answer in time", kind="timeout")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        proxy = f"{exc.host}:{exc.port}"
        return BadGateway(
            f"Cannot connect to the egress proxy {proxy} (HTTPS_PROXY) for upstream {origin}: "
            f"{exc.os_error or exc}",
            kind="connect",
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        # Verification is never switched off: name the CA settings that fix it.
        return BadGateway(
            f"TLS with upstream {origin} failed: {exc}; trust its CA with SSL_CERT_FILE or "
            "PROXY_UPSTREAM_CA_FILE",
            kind="tls",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BadGateway(
            f"Cannot connect to upstream {origin}: {exc.os_error or exc}", kind="connect"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return BadGateway(f"Upstream {origin} closed the connection: {exc}", kind="reset")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return BadGateway(f"Upstream {origin} broke off its response: {exc}", kind="reset")
    return BadGateway(f"Upstream {origin} failed: {type(exc).__name__}: {exc}", kind="protocol")


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = [(_text(k), _text(v)) for k, v in response.raw_headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc, self._url) from exc


class AiohttpUpstream:
    """One pooled aiohttp session for every upstream request (keep-alive, no decompression)."""

    def __init__(
        self, ssl_context: ssl.SSLContext, *, connect_timeout: float, read_timeout: float
    ) -> None:
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        # sock_read is an idle timeout between bytes; there is no total timeout, so a long
        # stream from a slow reasoning model is never cut while bytes keep flowing.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )

    async def start(self) -> None:
        self._session = client_session(self._ssl_context)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def open(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        if self._session is None:
            raise RuntimeError("AiohttpUpstream.open() before start()")
        try:
            response = await self._session.request(
                request.method,
                URL(request.url, encoded=True),  # the raw path and query, byte for byte
                headers=_same_case_repeats(request.headers),
                data=request.body,
                allow_redirects=False,
                timeout=self._timeout,
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc, request.url) from exc
        try:
            yield _AiohttpResponse(response, request.url)
        except BaseException:
            response.close()  # abort: the connection is not reused half-read
            raise
        else:
            response.release()


async def relay(
    request: web.Request, settings: Settings, token_source: TokenSource, upstream: Upstream
) -> web.StreamResponse:
    """Forward one request and stream the response back; never buffers a body beyond
    PROXY_REPLAY_MAX_BYTES (kept so that a request refused with 401 can be sent again)."""
    url = upstream_url(settings.api_base_url, request.raw_path)
    client_headers = [(_text(k), _text(v)) for k, v in request.raw_headers]
    kept = await _replayable_body(request, settings.replay_max_bytes)
    body: AsyncIterable[bytes] | bytes | None = kept
    if kept is None and request.body_exists:
        body = request.content
    timing = request[UPSTREAM_TIMING] = UpstreamTiming()
    started = time.monotonic()

    def outbound(token: str) -> UpstreamRequest:
        headers = upstream_request_headers(client_headers, token=token, host=settings.upstream_host)
        return UpstreamRequest(request.method, url, headers, body)

    # Azure may refuse a token we believed valid (revoked, role changed): on a 401 the token
    # is renewed (single flight, rate limited) so that later requests work, and a kept request
    # is sent again once; a streamed one cannot be, and gets the 401. The SDKs' own 429/5xx
    # retries stay theirs: this is the proxy's only retry.
    token = await token_source.token()
    async with contextlib.AsyncExitStack() as stack:
        answer = await _open(stack, upstream, outbound(token), timing)
        replayable = not isinstance(body, AsyncIterable)
        if answer.status == 401 and await token_source.renew(token) and replayable:
            await stack.aclose()  # the 401 is dropped unread, its connection closed
            token = await token_source.token()
            timing.replayed = True
            answer = await _open(stack, upstream, outbound(token), timing)
        timing.ttfb = time.monotonic() - started
        return await _stream_back(request, answer, timing)


async def _replayable_body(request: web.Request, limit: int) -> bytes | None:
    """The request body when it is small enough to keep for a replay (its Content-Length is
    known and at most `limit`); None when it must stream instead, or there is none."""
    length = request.content_length
    if (
        not request.body_exists
        or length is None
        or length > limit
        or "chunked" in (request.headers.get("Transfer-Encoding", "").lower())
    ):
        return None
    return await request.content.readexactly(length)


async def _open(
    stack: contextlib.AsyncExitStack,
    upstream: Upstream,
    outbound: UpstreamRequest,
    timing: UpstreamTiming,
) -> UpstreamResponse:
    try:
        return await stack.enter_async_context(upstream.open(outbound))
    except ProxyError as exc:
        timing.error_kind = exc.kind
        raise


async def _stream_back(
    request: web.Request, answer: UpstreamResponse, timing: UpstreamTiming
) -> web.StreamResponse:
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    for name, value in client_response_headers(answer.headers):
        response.headers.add(name, value)
    timing.request_id = response.headers.get("apim-request-id") or response.headers.get(
        "x-request-id"
    )
    try:
        await response.prepare(request)
    except ValueError as exc:
        # aiohttp refuses to write a header with control characters (RFC 9110 5.5); nothing
        # has been sent yet, so the client gets a clean 502.
        timing.error_kind = "protocol"
        raise BadGateway(
            f"Upstream sent a header the proxy cannot relay: {exc}", kind="protocol"
        ) from None
    except ConnectionError:
        timing.aborted = "client_gone"  # it left while the upstream was thinking
        return response
    try:
        async for chunk in answer.chunks():
            await response.write(chunk)
    except ProxyError as exc:
        # The status line is already out: the only honest signal left is to abort the
        # connection, so the client sees a truncated response and not a clean end.
        log.warning("upstream broke off mid-response, aborting the client: %s", exc.message)
        timing.aborted = f"upstream:{exc.code}"
        timing.error_kind = exc.kind
        _abort(request)
    except ConnectionError:
        timing.aborted = "client_gone"  # the client closed its side while we wrote
        _abort(request)
    return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _same_case_repeats(headers: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
    """Spell every repeat of a header name like its first occurrence.

    aiohttp's ClientSession merges headers by exact spelling, so `X-A: 1` then `x-a: 2` would
    lose the first value; names are case-insensitive (RFC 9110 5.1), values and order are not.
    """
    spelling: dict[str, str] = {}
    return CIMultiDict((spelling.setdefault(name.lower(), name), value) for name, value in headers)


def _text(raw: bytes) -> str:
    # aiohttp writes header values back as UTF-8; non-UTF-8 bytes are obsolete (RFC 9110 5.5).
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")
