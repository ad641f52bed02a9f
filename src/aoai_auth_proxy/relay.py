"""The streaming relay (the task way): sends a request upstream and streams the answer back.

Two seams live here. `Upstream` is the outbound HTTP client (`upstream.PooledUpstream`);
`Downstream` is the client's connection (`http1.py`'s, or aiohttp's after a WebSocket
hand-over). `forward` wires the pure rules of `forwarding` between them. Behaviour is tested at
the socket, so any side can be replaced without touching the tests. Requests whose body is
whole usually skip this module: `http1._Express` relays them by callbacks, by the same rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from .config import Settings
from .credentials import TokenSource
from .errors import BadGateway, ProxyError
from .forwarding import (
    client_response_headers,
    method_problem,
    upstream_request_headers,
    upstream_request_id,
    upstream_url,
)
from .logs import UpstreamTiming
from .middlewares import UPSTREAM_TIMING

log = logging.getLogger(__name__)


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


class Downstream(Protocol):
    """Where the answer goes: the client's connection, whichever server holds it."""

    async def send_head(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None:
        """Send the status line and headers. ConnectionError if the client has gone;
        BadGateway (nothing sent) for a header that cannot be relayed."""
        ...

    async def send(self, chunk: bytes) -> None:
        """Send body bytes, waiting while the client is slow. ConnectionError if gone."""
        ...

    def abort(self) -> None:
        """Cut the connection so the client sees an incomplete response."""
        ...


async def forward(
    settings: Settings,
    token_source: TokenSource,
    upstream: Upstream,
    downstream: Downstream,
    *,
    method: str,
    raw_target: str,
    headers: Sequence[tuple[str, str]],
    body: AsyncIterable[bytes] | bytes | None,
    timing: UpstreamTiming,
    rejected: str | None = None,
) -> None:
    """Forward one request and stream the answer to `downstream`.

    `headers` are the client's, as latin-1 text of their bytes; `body` is bytes when it was
    small enough to keep for a replay (PROXY_REPLAY_MAX_BYTES), else streamed, never buffered.
    `rejected`: the upstream already answered this request 401 with that token (on the
    express way, http1.py): renew first, and this is the one replay.
    """
    if problem := method_problem(method):
        raise problem
    url = upstream_url(settings.api_base_url, raw_target)
    started = time.monotonic()
    if rejected is not None and await token_source.renew(rejected):
        timing.replayed = True
    # (Not renewed after all, Entra failing just then: sent once more as it was, and the
    # upstream's answer passes through, as it would have the first time.)

    def outbound(token: str) -> UpstreamRequest:
        forwarded = upstream_request_headers(headers, token=token, host=settings.upstream_host)
        return UpstreamRequest(method, url, forwarded, body)

    # Azure may refuse a token we believed valid (revoked, role changed): on a 401 the token
    # is renewed (single flight, rate limited) so that later requests work, and a kept request
    # is sent again once; a streamed one cannot be, and gets the 401. The SDKs' own 429/5xx
    # retries stay theirs: this is the proxy's only retry.
    token = await token_source.token()
    exchange = upstream.open(outbound(token))
    answer = await _open(exchange, timing)
    try:
        # renew() first: a streamed request cannot be replayed, but the next one needs the
        # new token all the same.
        if (
            answer.status == 401
            and rejected is None
            and await token_source.renew(token)
            and not isinstance(body, AsyncIterable)
        ):
            dropped = ConnectionAbortedError("401 dropped unread")  # its connection closes
            await exchange.__aexit__(type(dropped), dropped, None)
            exchange = upstream.open(outbound(await token_source.token()))
            timing.replayed = True
            answer = await _open(exchange, timing)
        timing.ttfb = time.monotonic() - started
        await _stream_back(downstream, answer, timing)
    except BaseException as exc:
        await exchange.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await exchange.__aexit__(None, None, None)


async def relay(
    request: web.Request, settings: Settings, token_source: TokenSource, upstream: Upstream
) -> web.StreamResponse:
    """`forward` for a request that aiohttp's server holds (after a WebSocket handover)."""
    # latin-1 maps each byte to one character: the upstream client writes the same bytes back.
    client_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    kept = await _replayable_body(request, settings.replay_max_bytes)
    body: AsyncIterable[bytes] | bytes | None = kept
    if kept is None and request.body_exists:
        body = request.content.iter_any()  # as it arrives (iterating a StreamReader yields lines)
    timing = request[UPSTREAM_TIMING] = UpstreamTiming()
    downstream = _AiohttpDownstream(request)
    await forward(
        settings,
        token_source,
        upstream,
        downstream,
        method=request.method,
        raw_target=request.raw_path,
        headers=client_headers,
        body=body,
        timing=timing,
    )
    return downstream.response


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
    exchange: AbstractAsyncContextManager[UpstreamResponse], timing: UpstreamTiming
) -> UpstreamResponse:
    # The exchange is entered and left by hand (not `async with`) because a 401 replaces it
    # with a second one midway; AsyncExitStack cost more than the rest of the relay.
    try:
        return await exchange.__aenter__()
    except ProxyError as exc:
        timing.error_kind = exc.kind
        raise


async def _stream_back(
    downstream: Downstream, answer: UpstreamResponse, timing: UpstreamTiming
) -> None:
    headers = client_response_headers(answer.headers)
    timing.request_id = upstream_request_id(headers)
    try:
        await downstream.send_head(answer.status, answer.reason, headers)
    except ProxyError as exc:
        timing.error_kind = exc.kind
        raise
    except ConnectionError:
        timing.aborted = "client_gone"  # it left while the upstream was thinking
        return
    try:
        async for chunk in answer.chunks():
            await downstream.send(chunk)
    except ProxyError as exc:
        # The status line is already out: the only honest signal left is to abort the
        # connection, so the client sees a truncated response and not a clean end.
        log.warning("upstream broke off mid-response, aborting the client: %s", exc.message)
        timing.aborted = f"upstream:{exc.code}"
        timing.error_kind = exc.kind
        downstream.abort()
    except ConnectionError:
        timing.aborted = "client_gone"  # the client closed its side while we wrote
        downstream.abort()


class _AiohttpDownstream:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse()

    async def send_head(self, status: int, reason: str, headers: Sequence[tuple[str, str]]) -> None:
        response = self.response
        response.set_status(status, reason)
        for name, value in headers:
            # aiohttp writes str headers as UTF-8 (see header_text)
            response.headers.add(
                header_text(name.encode("latin-1")), header_text(value.encode("latin-1"))
            )
        try:
            await response.prepare(self._request)
        except ValueError as exc:
            # aiohttp refuses to write a header with control characters (RFC 9110 5.5);
            # nothing has been sent yet, so the client gets a clean 502.
            raise BadGateway(
                f"Upstream sent a header the proxy cannot relay: {exc}", kind="protocol"
            ) from None

    async def send(self, chunk: bytes) -> None:
        await self.response.write(chunk)

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()


def header_text(raw: bytes) -> str:
    """A header as aiohttp's writer needs it: it writes str values back as UTF-8, so UTF-8
    bytes survive the round trip; other bytes are obsolete text (RFC 9110 5.5)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")
