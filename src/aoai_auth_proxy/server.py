"""The proxy's lifecycle in one place: listen, become ready, drain, stop.

Shutdown order, as uvicorn and cloud-sql-proxy do it: readiness turns 503 at once; after
PROXY_SHUTDOWN_DELAY (time for endpoints to stop routing here) the listener closes and idle
keep-alive connections with it; in-flight requests and streams get PROXY_SHUTDOWN_TIMEOUT to
finish; what is left is cancelled; then the token source and upstream pool close, and last the
admin listener, which answers probes (503) until then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .app import (
    INBOUND_RULES,
    LIFECYCLE,
    METRICS,
    TOKEN_SOURCE,
    UPSTREAM,
    create_admin_app,
    create_app,
)
from .config import Settings
from .errors import ERROR_TYPE
from .http1 import Frontend
from .logs import ACCESS_LOGGER, install_malformed_request_filter
from .middlewares import AccessLogger

log = logging.getLogger(__name__)

# After our own drain, aiohttp's cleanup only closes what is already finished or cancelled.
_CLEANUP_TIMEOUT_SECONDS = 1.0
_READY_POLL_SECONDS = 0.05
# A refused connection gets this long to send its request head before the 503 goes out.
_REFUSE_READ_SECONDS = 1.0


class ProxyServer:
    """The proxy listener and the optional admin listener: `await start()`, `await stop()`."""

    def __init__(self, settings: Settings, app: web.Application | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else create_app(settings)
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log_class=AccessLogger,
            access_log=logging.getLogger(ACCESS_LOGGER),
            # A client that goes away cancels its handler, and with it the upstream request.
            handler_cancellation=True,
            # aiohttp's keep-alive timer also bounds how long a client may take to send a
            # request's headers (a slow-header client is closed), as client_header_timeout.
            keepalive_timeout=settings.header_timeout,
            shutdown_timeout=_CLEANUP_TIMEOUT_SECONDS,
        )
        self._admin: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.frontend: Frontend | None = None
        self.url = ""
        self.admin_url = ""

    async def start(self) -> str:
        """Open resources and listen; returns the URL. OSError if an address cannot be bound."""
        settings = self.settings
        install_malformed_request_filter()
        await self._runner.setup()  # the app's resources: token source, upstream pool
        try:
            self._listener = await self._listen()
            self.url = _url(self._listener)
            if settings.admin_port is not None:
                self._admin = web.AppRunner(create_admin_app(self.app), access_log=None)
                await self._admin.setup()
                await web.TCPSite(
                    self._admin,
                    settings.admin_host,
                    settings.admin_port,
                    reuse_port=settings.workers > 1 or None,
                ).start()
                self.admin_url = _runner_url(self._admin)
        except BaseException:
            await self._cleanup()
            raise
        return self.url

    async def _listen(self) -> asyncio.Server:
        """The proxy port: http1.py serves it; connections over PROXY_MAX_CONNECTIONS get
        an immediate 503, like Envoy's overload manager, so existing streams keep flowing
        and no client waits in an accept queue."""
        app, settings = self.app, self.settings
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        rules = app[INBOUND_RULES]

        def hand_over() -> asyncio.Protocol:
            # What web.Server.__call__ builds, with a handler class that answers 431.
            return _RequestHandler(server, loop=loop, **server._kwargs)

        frontend = self.frontend = Frontend(
            settings,
            token_source=app[TOKEN_SOURCE],
            upstream=app[UPSTREAM],
            lifecycle=app[LIFECYCLE],
            metrics=app[METRICS],
            keys=rules.keys,
            hosts=rules.hosts,
            hand_over=hand_over,
            access_log=logging.getLogger(ACCESS_LOGGER),
        )
        limit = settings.max_connections
        refused = app[METRICS].connections_refused

        def factory() -> asyncio.BaseProtocol:
            if len(frontend.connections) + len(server.connections) >= limit:
                refused.inc()
                return _Refuse(limit)
            return frontend.connection()

        # With PROXY_WORKERS the kernel spreads new connections over the workers' listeners
        # (SO_REUSEPORT), with no accept lock and no hand-off between processes.
        return await loop.create_server(
            factory,
            settings.host,
            settings.port,
            reuse_address=True,
            reuse_port=settings.workers > 1 or None,
            backlog=1024,
        )

    async def wait_ready(self, stop: asyncio.Event) -> bool:
        """Wait until the first token is held (True) or `stop` is set (False)."""
        source = self.app[TOKEN_SOURCE]
        while not stop.is_set():
            if source.status().ready:
                return True
            try:
                await asyncio.wait_for(stop.wait(), _READY_POLL_SECONDS)
            except TimeoutError:
                continue
        return False

    async def stop(self) -> None:
        """Drain (see the module docstring) and release everything."""
        settings = self.settings
        lifecycle = self.app[LIFECYCLE]
        lifecycle.draining = True
        if settings.shutdown_delay > 0:
            log.info("shutting down: readiness is 503, closing in %g s", settings.shutdown_delay)
            await asyncio.sleep(settings.shutdown_delay)
        if self._listener is not None:
            self._listener.close()
        if self.frontend is not None:
            self.frontend.close_idle()  # idle keep-alive connections close now
        if self._runner.server is not None:
            self._runner.server.pre_shutdown()  # and those handed to aiohttp (WebSocket)
        if lifecycle.inflight:
            log.info(
                "shutting down: %d request(s) in flight, waiting up to %g s",
                lifecycle.inflight,
                settings.shutdown_timeout,
            )
        if not await lifecycle.wait_idle(settings.shutdown_timeout):
            cut = lifecycle.cancel_inflight()
            log.warning("shutdown grace period over: cancelled %d request(s) still running", cut)
            await lifecycle.wait_idle(_CLEANUP_TIMEOUT_SECONDS)
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self.frontend is not None:
            self.frontend.abort_all()
        await self._runner.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()


def _url(listener: asyncio.Server) -> str:
    host, port = listener.sockets[0].getsockname()[:2]
    return _shown(host, port)


def _runner_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return _shown(host, port)


def _shown(host: str, port: int) -> str:
    shown = "127.0.0.1" if host == "0.0.0.0" else host  # noqa: S104 - display only
    return f"http://{shown}:{port}"


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, answering oversized request headers with 431 (RFC 6585
    5) instead of a generic 400, so clients can tell what to shrink."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
        )
        if status == 400 and too_large:
            status = 431
        return super().handle_error(request, status, exc, message)


class _Refuse(asyncio.Protocol):
    """Answers 503 once the request head is in (or after a second), then half-closes and
    discards what the client still sends: closing with unread data would send a reset that
    can destroy the 503 before the client reads it."""

    def __init__(self, limit: int) -> None:
        message = f"The proxy is at its connection limit (PROXY_MAX_CONNECTIONS={limit})"
        body = json.dumps(
            {"error": {"message": message, "type": ERROR_TYPE, "code": "too_many_connections"}}
        ).encode()
        self._answer: bytes | None = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self._tail = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have their methods.
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(_REFUSE_READ_SECONDS, self._respond)

    def data_received(self, data: bytes) -> None:
        window = self._tail + data
        self._tail = window[-3:]
        if self._answer is not None and b"\r\n\r\n" in window:
            self._respond()

    def _respond(self) -> None:
        transport, answer = self._transport, self._answer
        if transport is None or transport.is_closing():
            return
        if answer is None:  # answered already: the client had its second, close now
            transport.close()
            return
        self._answer = None
        transport.write(answer)
        transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(_REFUSE_READ_SECONDS, self._respond)

    def eof_received(self) -> bool:
        return False  # the client is done too: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
