"""WebSocket pass-through (Realtime API): the Entra token on the handshake, frames both ways.

The upstream side is the `websockets` asyncio client, which hands back a refused handshake's
status and body, so the client sees exactly what the upstream answered. The client side is
websockets' sans-I/O server protocol driven by `ClientSide`, put on the client's socket by
`http1.py` once the 101 is out: llhttp parsed the handshake there; `ServerProtocol.accept`
checks it (RFC 6455 4.2.1) and makes the 101. Control frames are per hop: each side answers
its own peer's pings. A close, with its code and reason, is passed on to the other side before
it is answered, so a client whose close handshake is done knows the upstream session is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from .config import Settings
from .credentials import TokenSource
from .egress import REFUSED_407, egress_proxy
from .errors import BadGateway, BadRequest, GatewayTimeout
from .forwarding import (
    client_response_headers,
    upstream_request_headers,
    upstream_url,
)
from .logs import SessionStats

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import InvalidStatus
    from websockets.server import ServerProtocol

log = logging.getLogger(__name__)
# websockets is imported by the first session, not at start-up: 0.65 MB of an idle proxy's
# memory (issue 8) that most deployments, which never open a session, do not need.

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
# How long a client gets to end its TCP connection once the close handshake is done.
_CLOSE_TIMEOUT_SECONDS = 5.0
# Bytes of whole messages from the client not yet taken by the upstream before the client's
# socket is paused, and when it resumes (aiohttp's server, before, paused at 128 KiB). One
# message may be larger: websockets reads a frame whole, up to MAX_MESSAGE_BYTES.
QUEUE_HIGH_BYTES = 256 * 1024
QUEUE_LOW_BYTES = 64 * 1024
# After the proxy failed a session, how long the client must send nothing before TCP ends.
_LINGER_QUIET_SECONDS = 0.5


@dataclass(frozen=True)
class Refusal:
    """The upstream's own answer to the upgrade (401, 403, 404...), to go back as sent."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Accepted:
    """An upstream session is open; `answer` (the 101) goes to the client, then `relay`."""

    upstream: ClientConnection
    answer: bytes

    async def abandon(self) -> None:
        """Close the upstream session: the client is gone before its 101 went out."""
        await _close_quietly(self.upstream, None, GOING_AWAY, "")


def forwarded_subprotocols(headers: Sequence[tuple[str, str]]) -> list[str]:
    """The client's offered subprotocols, minus any that carry a key."""
    offered = [
        p.strip()
        for name, value in headers
        if name.lower() == "sec-websocket-protocol"
        for p in value.split(",")
        if p.strip()
    ]
    return [p for p in offered if not p.lower().startswith(INSECURE_KEY_SUBPROTOCOL)]


def _answer_to(
    target: str, headers: Sequence[tuple[str, str]], subprotocol: str | None
) -> tuple[bytes | None, str]:
    """websockets' answer to the client's handshake: (the 101's bytes, "") when it is valid
    (RFC 6455 4.2.1), else (None, why not)."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request
    from websockets.server import ServerProtocol
    from websockets.typing import Subprotocol

    protocol = ServerProtocol(
        subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
        extensions=None,  # frames pass as they are: no compression to negotiate
        max_size=MAX_MESSAGE_BYTES,
    )
    response = protocol.accept(Request(target, Headers(list(headers))))
    if response.status_code != 101:
        return None, str(protocol.handshake_exc or response.reason_phrase)
    return response.serialize(), ""


async def open_session(
    settings: Settings,
    token_source: TokenSource,
    ssl_context: ssl.SSLContext,
    *,
    method: str,
    target: str,
    version: tuple[int, int],
    headers: Sequence[tuple[str, str]],
) -> Refusal | Accepted:
    """Check the client's handshake, then open the upstream session (a refusal goes back to
    the client as plain HTTP)."""
    # RFC 6455 4.2.1: a GET over HTTP/1.1 with a valid key and version 13. Checked before the
    # upstream is contacted, so an invalid handshake never opens a session with the token.
    answer, why = _answer_to(target, headers, None)
    if method != "GET" or version < (1, 1) or answer is None:
        detail = f": {why}" if why else ""
        raise BadRequest(f"Invalid WebSocket handshake{detail}")
    url = upstream_url(settings.api_base_url, target)
    url = "ws" + url.removeprefix("http")  # http -> ws, https -> wss
    protocols = forwarded_subprotocols(headers)
    from websockets.exceptions import InvalidStatus  # see above, at `log`

    token = await token_source.token()
    try:
        upstream = await _connect(headers, settings, url, token, protocols, ssl_context)
    except InvalidStatus as exc:
        if exc.response.status_code != 401 or not await token_source.renew(token):
            return _refusal(exc)
        try:  # Azure refused a token we believed valid: one renewal, one retry, as for HTTP
            upstream = await _connect(
                headers, settings, url, await token_source.token(), protocols, ssl_context
            )
        except InvalidStatus as again:
            return _refusal(again)
    answer, why = _answer_to(target, headers, upstream.subprotocol)
    if answer is None:  # the upstream chose a subprotocol the client did not offer
        await _close_quietly(upstream, None, GOING_AWAY, "")
        raise BadGateway(f"Upstream WebSocket handshake cannot be relayed: {why}")
    return Accepted(upstream, answer)


async def relay(
    accepted: Accepted,
    transport: asyncio.Transport,
    early: bytes,
    stats: SessionStats,
    *,
    send_timeout: float,
) -> None:
    """Relay messages between the client on `transport` (its 101 sent, reading paused;
    `early`: bytes it sent after its handshake) and the upstream, until either side closes.
    A client that takes nothing for `send_timeout` seconds is cut off (nginx's send_timeout)."""
    upstream = accepted.upstream
    client = ClientSide(send_timeout)
    transport.set_protocol(client)
    client.connection_made(transport)
    try:
        if early:
            client.data_received(early)
        client.start_reading()
        await _relay_frames(client, upstream, stats)
    except asyncio.CancelledError:
        # Shutdown's grace period is over.
        stats.close_code = GOING_AWAY
        await _close_quietly(upstream, client, GOING_AWAY, "proxy going away")
        raise
    finally:
        await _close_quietly(upstream, None, GOING_AWAY, "")
        transport.abort()  # a no-op once closed; else the client had its time


class ClientSide(asyncio.Protocol):
    """The client's end of a session: websockets' sans-I/O ServerProtocol on the socket.

    Whole messages arrive in `messages` (None once the client closed, failed or vanished);
    pings are answered as they come. A close from the client is answered only when `close()`
    is called, once the upstream has closed: the protocol queues its answer at once, and its
    bytes are held back until then. What the upstream has not taken yet is bounded in bytes:
    past QUEUE_HIGH_BYTES the client's socket is paused (TCP then pushes back on it)."""

    def __init__(self, send_timeout: float) -> None:
        from websockets.protocol import OPEN
        from websockets.server import ServerProtocol

        loop = asyncio.get_running_loop()
        self.protocol: ServerProtocol = ServerProtocol(state=OPEN, max_size=MAX_MESSAGE_BYTES)
        self.messages: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._send_timeout = send_timeout
        self._transport: asyncio.Transport | None = None
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._text = False
        self._queued = 0  # bytes in `messages`
        self.ended = False  # None is in `messages`: the client closed, failed or went
        self._discarding = False  # the relay is over: what the client sends is dropped
        self._answering = False  # a close from the client may be answered now
        self._paused = False  # reading, for messages the upstream has not taken
        self._can_write: asyncio.Future[None] | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._linger()  # not quiet yet
        self.protocol.receive_data(data)
        self._take(self.protocol.events_received())
        self._send()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._end()
        self._send()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        self.protocol.receive_eof()  # idempotent; the protocol is CLOSED now
        self._end()
        if not self.lost.done():
            self.lost.set_result(None)
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # -- the relay's side ---------------------------------------------------------------

    def start_reading(self) -> None:
        """Read from the client (paused since its handshake), unless what it sent with the
        handshake already filled the queue."""
        if not self._paused and self._transport is not None:
            self._transport.resume_reading()

    async def receive(self) -> str | bytes | None:
        """The next whole message from the client; None once it has closed or gone."""
        message = await self.messages.get()
        if message is not None:
            self._queued -= len(message)
            if self._paused and self._queued <= QUEUE_LOW_BYTES:
                self._resume()
        return message

    async def send(self, message: str | bytes) -> None:
        """Send one message; ConnectionError once the client's side is closed, or when the
        client took nothing for the send timeout (it is cut off)."""
        from websockets.exceptions import InvalidState
        from websockets.protocol import OPEN

        if self.protocol.state is not OPEN or self.lost.done():
            raise ConnectionResetError("the client's side of the session is closed")
        try:
            if isinstance(message, str):
                self.protocol.send_text(message.encode())
            else:
                self.protocol.send_binary(message)
        except InvalidState:
            raise ConnectionResetError("the client's side of the session is closed") from None
        self._send()
        waiter = self._can_write
        if waiter is not None and not waiter.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self._send_timeout)
            except TimeoutError:
                log.warning(
                    "a WebSocket client read nothing for %g s (PROXY_HEADER_TIMEOUT): cut off",
                    self._send_timeout,
                )
                if self._transport is not None:
                    self._transport.abort()
                raise ConnectionResetError("the client read nothing: cut off") from None

    @property
    def close_code(self) -> int:
        """The code of the client's close frame; 1006 if it sent none (RFC 6455 7.1.5)."""
        received = self.protocol.close_rcvd
        return received.code if received is not None else _ABNORMAL

    @property
    def close_reason(self) -> str:
        received = self.protocol.close_rcvd
        return received.reason if received is not None else ""

    @property
    def failed_with(self) -> int | None:
        """The code the proxy failed the client's side with (1007, 1009...), if it did."""
        sent = self.protocol.close_sent
        if sent is None or self.protocol.close_rcvd_then_sent:
            return None  # none sent, or the echo of the client's own close
        return sent.code

    async def close(self, code: int, reason: str) -> None:
        """Close with `code` (or answer the client's own close) and wait, for a while, for
        the client to end the connection. What it still sends meanwhile is read and dropped,
        so its own close is read in time."""
        from websockets.protocol import OPEN

        self._discarding = True
        self._answering = True
        if self._paused:
            self._resume()
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
        self._send()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), _CLOSE_TIMEOUT_SECONDS)

    # -- internals ----------------------------------------------------------------------

    def _take(self, events: Sequence[object]) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.protocol import OPEN

        for event in events:
            if self.protocol.state is not OPEN and self.protocol.close_rcvd is None:
                break  # failed (RFC 6455 7.1.7): nothing after the failure is passed on
            assert isinstance(event, Frame)
            if event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY:
                self._text = event.opcode is Opcode.TEXT
                self._fragments = [event.data]
            elif event.opcode is Opcode.CONT:
                self._fragments.append(event.data)
            else:
                continue  # a ping (answered by the protocol), a pong, or the close
            if event.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._message(data)
        if self.protocol.state is not OPEN:
            self._end()  # the client closed, or broke the protocol (failed: 1002, 1009...)

    def _message(self, data: bytes) -> None:
        if self._discarding:
            return
        message: str | bytes = data
        if self._text:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                self.protocol.fail(1007, "invalid UTF-8 in a text message")  # RFC 6455 8.1
                return
        self.messages.put_nowait(message)
        self._queued += len(message)
        if not self._paused and self._queued > QUEUE_HIGH_BYTES and self._transport:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.messages.put_nowait(None)

    def _linger(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        loop = asyncio.get_running_loop()
        self._lingering = loop.call_later(_LINGER_QUIET_SECONDS, self._end_tcp)

    def _end_tcp(self) -> None:
        self._lingering = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def _send(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.protocol.close_rcvd is not None and not self._answering:
            return  # the answer to the client's close waits for the upstream's (see class)
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif self.protocol.close_rcvd is None:
                # The proxy failed the connection (1009, 1007...; websockets then reads no
                # more frames): the client may still be sending a large message, and then
                # its close. Ending TCP now cuts it off mid-send, so the end waits until it
                # has been quiet for a moment, as nginx's lingering close does.
                self._linger()
            elif transport.can_write_eof():
                transport.write_eof()  # RFC 6455 7.1.1: the server ends TCP first
            else:
                transport.close()


async def _connect(
    client_headers: Sequence[tuple[str, str]],
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
            client_headers, token=token, host=settings.upstream_host
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


def _refusal(exc: InvalidStatus) -> Refusal:
    response = exc.response
    headers = [
        (name, value)
        for name, value in client_response_headers(list(response.headers.raw_items()))
        if name.lower() != "content-length"  # http1 frames the body it sends
    ]
    return Refusal(response.status_code, response.reason_phrase, headers, bytes(response.body))


async def _relay_frames(
    client: ClientSide, upstream: ClientConnection, stats: SessionStats
) -> None:
    inbound = asyncio.create_task(_client_to_upstream(client, upstream, stats))
    outbound = asyncio.create_task(_upstream_to_client(upstream, client, stats))
    tasks = {inbound, outbound}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if client.ended and not inbound.done():
            # The client closed (or failed, or went): what it sent before that still goes
            # upstream (the queue ends with None), while the upstream takes it.
            await asyncio.wait({inbound}, timeout=_CLOSE_TIMEOUT_SECONDS)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    if client.ended:
        # Told the upstream first, then the client answered: a client whose close is done
        # knows the upstream session is over. (The upstream may have closed just then too.)
        code = client.close_code
        stats.close_code = client.failed_with or code
        await _close_upstream(upstream, _sendable(code, GOING_AWAY), client.close_reason)
        await client.close(_sendable(code, GOING_AWAY), client.close_reason)
    else:
        code = upstream.close_code if upstream.close_code is not None else _ABNORMAL
        stats.close_code = code
        await client.close(_sendable(code, BAD_GATEWAY), upstream.close_reason or "")


async def _close_upstream(upstream: ClientConnection, code: int, reason: str) -> None:
    """Close the upstream session, reading (and dropping) what it still sends meanwhile:
    its close answer may be queued behind messages nobody takes any more, which websockets
    stops reading at its max_queue."""
    from websockets.exceptions import ConnectionClosed  # see above, at `log`

    async def drop() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in upstream:
                pass

    dropping = asyncio.create_task(drop())
    try:
        await upstream.close(code, reason)
    finally:
        dropping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dropping


async def _client_to_upstream(
    client: ClientSide, upstream: ClientConnection, stats: SessionStats
) -> None:
    from websockets.exceptions import ConnectionClosed  # see above, at `log`

    with contextlib.suppress(ConnectionClosed):
        while (message := await client.receive()) is not None:
            await upstream.send(message)
            stats.frames_in += 1


async def _upstream_to_client(
    upstream: ClientConnection, client: ClientSide, stats: SessionStats
) -> None:
    from websockets.exceptions import ConnectionClosed  # see above, at `log`

    with contextlib.suppress(ConnectionClosed, ConnectionError):
        async for message in upstream:
            await client.send(message)
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
    upstream: ClientConnection, client: ClientSide | None, code: int, reason: str
) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(_close_upstream(upstream, code, reason), 2)
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(code, reason), 2)
