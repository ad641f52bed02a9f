"""WebSocket pass-through (Realtime API): the Entra token on the handshake, frames both ways.

The client side is aiohttp's server; the upstream side is the `websockets` client, which hands
back a refused handshake's status and body (aiohttp's client discards the body), so the client
sees exactly what the upstream answered. Control frames are per hop: each side answers its own
peer's pings. A close, with its code and reason, is passed on to the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from .config import Settings
from .credentials import TokenSource
from .egress import REFUSED_407, egress_proxy
from .errors import BadGateway, BadRequest, GatewayTimeout
from .forwarding import (
    client_response_headers,
    connection_tokens,
    upstream_request_headers,
    upstream_url,
)
from .logs import SessionStats
from .middlewares import SESSION_STATS

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import InvalidStatus

log = logging.getLogger(__name__)
# The websockets client is imported by the first session, not at start-up: 0.65 MB of an idle
# proxy's memory (issue 8) that most deployments, which never open a session, do not need.

# The Realtime API sends audio in frames of tens of kilobytes; allow generous single messages.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# RFC 6455 7.4.1: 1001 going away (our shutdown, a vanished client), 1014 bad gateway (the
# upstream vanished). 1005 and 1006 only describe a close and may never be sent.
GOING_AWAY = 1001
BAD_GATEWAY = 1014
_NO_STATUS, _ABNORMAL, _TLS_FAILURE = 1005, 1006, 1015
# The browser-style credential the openai SDK may offer as a subprotocol: never forwarded.
INSECURE_KEY_SUBPROTOCOL = "openai-insecure-api-key."
_GENERATED_BY_CLIENT = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "host",
    }
)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """RFC 6455 4.1: `Upgrade: websocket` with `Connection: upgrade`."""
    return request.headers.get("Upgrade", "").lower() == "websocket" and (
        "upgrade" in connection_tokens(request.headers.items())
    )


def forwarded_subprotocols(request: web.BaseRequest) -> list[str]:
    """The client's offered subprotocols, minus any that carry a key."""
    offered = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in value.split(",")
        if p.strip()
    ]
    return [p for p in offered if not p.lower().startswith(INSECURE_KEY_SUBPROTOCOL)]


async def relay_websocket(
    request: web.Request,
    settings: Settings,
    token_source: TokenSource,
    ssl_context: ssl.SSLContext,
) -> web.StreamResponse:
    """Open the upstream session first (a refusal goes back as plain HTTP), then relay."""
    # RFC 6455 4.2.1: a GET over HTTP/1.1 with a valid key and version 13. Checked before the
    # upstream is contacted, so an invalid handshake never opens a session with the token.
    if (
        request.method != "GET"
        or request.version < (1, 1)
        or not web.WebSocketResponse().can_prepare(request).ok
    ):
        raise BadRequest("Invalid WebSocket handshake")
    url = upstream_url(settings.api_base_url, request.raw_path)
    url = "ws" + url.removeprefix("http")  # http -> ws, https -> wss
    protocols = forwarded_subprotocols(request)
    from websockets.exceptions import InvalidStatus  # see above, at `log`

    token = await token_source.token()
    try:
        upstream = await _connect(request, settings, url, token, protocols, ssl_context)
    except InvalidStatus as exc:
        if exc.response.status_code != 401 or not await token_source.renew(token):
            return _refusal(exc)
        try:  # Azure refused a token we believed valid: one renewal, one retry, as for HTTP
            upstream = await _connect(
                request, settings, url, await token_source.token(), protocols, ssl_context
            )
        except InvalidStatus as again:
            return _refusal(again)
    stats = request[SESSION_STATS] = SessionStats()
    client = web.WebSocketResponse(
        protocols=(upstream.subprotocol,) if upstream.subprotocol else (),
        autoclose=False,  # a close is passed on before it is answered
        autoping=True,
        max_msg_size=MAX_MESSAGE_BYTES,
        compress=False,  # frames pass as they are; no CPU on recompression
    )
    try:
        await client.prepare(request)
        await _relay_frames(client, upstream, stats)
    except asyncio.CancelledError:
        # The client vanished (its handler is cancelled) or shutdown's grace period is over.
        stats.close_code = GOING_AWAY
        await _close_quietly(upstream, client, GOING_AWAY, "proxy going away")
        raise
    finally:
        await _close_quietly(upstream, None, GOING_AWAY, "")
    return client


async def _connect(
    request: web.Request,
    settings: Settings,
    url: str,
    token: str,
    protocols: list[str],
    ssl_context: ssl.SSLContext,
) -> ClientConnection:
    from websockets.asyncio.client import connect  # see above, at `log`
    from websockets.exceptions import (
        InvalidHandshake,
        InvalidProxy,
        InvalidProxyStatus,
        InvalidStatus,
        ProxyError,
    )
    from websockets.typing import Subprotocol

    # The egress proxy by the rule the HTTP upstream follows (`egress`), given explicitly:
    # websockets' own reading of the variables differs (NO_PROXY by host:port), and its
    # errors about a proxy URL repeat the URL, credentials and all.
    try:
        proxy = egress_proxy(
            "wss" if url.startswith("wss:") else "ws", urlsplit(url).hostname or ""
        )
    except ValueError as exc:  # load_settings refuses such a URL at start-up
        raise BadGateway(
            f"Cannot connect to upstream WebSocket {url}: {exc}", kind="connect"
        ) from None
    via = "" if proxy is None else f" through the egress proxy {proxy.named}"

    headers = [
        (name, value)
        for name, value in upstream_request_headers(
            list(request.headers.items()), token=token, host=settings.upstream_host
        )
        if name.lower() not in _GENERATED_BY_CLIENT
    ]
    try:
        return await connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(p) for p in protocols] or None,
            ssl=ssl_context if url.startswith("wss:") else None,
            open_timeout=settings.connect_timeout,
            user_agent_header=None,  # the client's own User-Agent is forwarded
            compression=None,
            max_size=MAX_MESSAGE_BYTES,
            ping_interval=20,  # detects an upstream that vanished without a FIN
            ping_timeout=20,
            close_timeout=5,
            proxy=None if proxy is None else proxy.url,
        )
    except InvalidStatus:
        raise
    except InvalidProxyStatus as exc:
        answer = f"it answered {exc.response.status_code}"
        if exc.response.status_code == 407:
            answer = f"it {REFUSED_407}"
        raise BadGateway(
            f"Cannot connect to upstream WebSocket {url}{via}: {answer}", kind="connect"
        ) from None
    except (InvalidProxy, ProxyError) as exc:
        # Named by its type only: InvalidProxy's text is the proxy URL, password included.
        raise BadGateway(
            f"Cannot connect to upstream WebSocket {url}{via}: {type(exc).__name__}",
            kind="connect",
        ) from None
    except TimeoutError as exc:
        raise GatewayTimeout(
            f"Upstream WebSocket handshake timed out: {url}{via}", kind="connect"
        ) from exc
    except OSError as exc:
        raise BadGateway(
            f"Cannot connect to upstream WebSocket {url}{via}: {exc}", kind="connect"
        ) from exc
    except InvalidHandshake as exc:
        raise BadGateway(f"Upstream WebSocket handshake failed: {exc}", kind="protocol") from exc


def _refusal(exc: InvalidStatus) -> web.Response:
    """The upstream's own answer to the upgrade (401, 403, 404...), status and body as sent."""
    response = exc.response
    headers = client_response_headers(list(response.headers.raw_items()))
    refusal = web.Response(
        status=response.status_code, reason=response.reason_phrase, body=response.body
    )
    for name, value in headers:
        if name.lower() != "content-length":
            refusal.headers.add(name, value)
    return refusal


async def _relay_frames(
    client: web.WebSocketResponse, upstream: ClientConnection, stats: SessionStats
) -> None:
    inbound = asyncio.create_task(_client_to_upstream(client, upstream, stats))
    outbound = asyncio.create_task(_upstream_to_client(upstream, client, stats))
    try:
        done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (inbound, outbound):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(inbound, outbound, return_exceptions=True)
    if inbound in done and not inbound.cancelled() and inbound.exception() is None:
        code, reason = inbound.result()  # the client closed: tell the upstream, then answer
        stats.close_code = code
        await upstream.close(_sendable(code, GOING_AWAY), reason)
        await client.close(code=_sendable(code, GOING_AWAY), message=reason.encode())
    else:
        code = upstream.close_code if upstream.close_code is not None else _ABNORMAL
        stats.close_code = code
        said = (upstream.close_reason or "").encode()
        await client.close(code=_sendable(code, BAD_GATEWAY), message=said)


async def _client_to_upstream(
    client: web.WebSocketResponse, upstream: ClientConnection, stats: SessionStats
) -> tuple[int, str]:
    while True:
        message = await client.receive()
        if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
            await upstream.send(message.data)
        elif message.type is WSMsgType.CLOSE:
            return int(message.data), str(message.extra or "")
        else:  # CLOSING, CLOSED, ERROR: the client is gone
            return _ABNORMAL, ""
        stats.frames_in += 1


async def _upstream_to_client(
    upstream: ClientConnection, client: web.WebSocketResponse, stats: SessionStats
) -> None:
    from websockets.exceptions import ConnectionClosed  # see above, at `log`

    with contextlib.suppress(ConnectionClosed):
        async for message in upstream:
            if isinstance(message, str):
                await client.send_str(message)
            else:
                await client.send_bytes(message)
            stats.frames_out += 1


def _sendable(code: int, vanished: int) -> int:
    """A close code that may go on the wire: 1005 becomes a normal close, and a peer that
    vanished (1006, 1015) becomes `vanished`."""
    if code == _NO_STATUS:
        return 1000
    if code in (_ABNORMAL, _TLS_FAILURE):
        return vanished
    return code


async def _close_quietly(
    upstream: ClientConnection, client: web.WebSocketResponse | None, code: int, reason: str
) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(upstream.close(code, reason), 2)
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(code=code, message=reason.encode()), 2)
