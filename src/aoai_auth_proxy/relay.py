"""The streaming relay (the task way): sends a request upstream and streams the answer back.

Two seams live here. `Upstream` is the outbound HTTP client (`upstream.PooledUpstream`);
`Downstream` is the client's connection (`http1.py`'s). `forward` wires the pure rules of
`forwarding` between them. Behaviour is tested at the socket, so any side can be replaced
without touching the tests. Requests whose body is whole usually skip this module:
`http1._Express` relays them by callbacks, by the same rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from .config import Settings
from .credentials import TokenSource
from .errors import ProxyError
from .forwarding import (
    client_response_headers,
    method_problem,
    upstream_request_headers,
    upstream_request_id,
    upstream_url,
)
from .logs import UpstreamTiming

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
