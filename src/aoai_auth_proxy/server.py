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

from .app import ProxyApp, create_app
from .config import Settings
from .errors import ERROR_TYPE
from .http1 import Frontend
from .logs import ACCESS_LOGGER

log = logging.getLogger(__name__)

# What is still running once the grace period is over gets this long to end after being cut.
_CLEANUP_TIMEOUT_SECONDS = 1.0
_READY_POLL_SECONDS = 0.05
# A refused connection gets this long to send its request head before the 503 goes out.
_REFUSE_READ_SECONDS = 1.0


class ProxyServer:
    """The proxy listener and the optional admin listener: `await start()`, `await stop()`."""

    def __init__(self, settings: Settings, app: ProxyApp | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else create_app(settings)
        self._listener: asyncio.Server | None = None
        self._admin_listener: asyncio.Server | None = None
        self.frontend: Frontend | None = None
        self._admin: Frontend | None = None
        self.url = ""
        self.admin_url = ""

    async def start(self) -> str:
        """Open resources and listen; returns the URL. OSError if an address cannot be bound."""
        settings = self.settings
        await self.app.start()  # the token source and the upstream pool
        try:
            self._listener = await self._listen()
            self.url = _url(self._listener)
            if settings.admin_port is not None:
                admin = self._admin = self._frontend(admin=True)
                self._admin_listener = await asyncio.get_running_loop().create_server(
                    admin.connection,
                    settings.admin_host,
                    settings.admin_port,
                    reuse_address=True,
                    reuse_port=settings.workers > 1 or None,
                )
                self.admin_url = _url(self._admin_listener)
        except BaseException:
            await self._cleanup()
            raise
        return self.url

    def _frontend(self, *, admin: bool = False) -> Frontend:
        app = self.app
        rules = app.inbound_rules
        return Frontend(
            self.settings,
            token_source=app.token_source,
            upstream=app.upstream,
            lifecycle=app.lifecycle,
            metrics=app.metrics,
            keys=None if admin else rules.keys,
            hosts=None if admin else rules.hosts,
            upstream_ssl=app.upstream_ssl,
            access_log=logging.getLogger(ACCESS_LOGGER),
            admin=admin,
        )

    async def _listen(self) -> asyncio.Server:
        """The proxy port: http1.py serves it; connections over PROXY_MAX_CONNECTIONS get
        an immediate 503, like Envoy's overload manager, so existing streams keep flowing
        and no client waits in an accept queue."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        frontend = self.frontend = self._frontend()
        limit = settings.max_connections
        refused = self.app.metrics.connections_refused

        def factory() -> asyncio.BaseProtocol:
            # WebSocket sessions count too: their connection stays in `connections`.
            if len(frontend.connections) >= limit:
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
        source = self.app.token_source
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
        lifecycle = self.app.lifecycle
        lifecycle.draining = True
        if settings.shutdown_delay > 0:
            log.info("shutting down: readiness is 503, closing in %g s", settings.shutdown_delay)
            await asyncio.sleep(settings.shutdown_delay)
        if self._listener is not None:
            self._listener.close()
        if self.frontend is not None:
            self.frontend.close_idle()  # idle keep-alive connections close now
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
        await self.app.close()
        # Last: the admin port answers probes (503, draining) until everything else is done.
        if self._admin_listener is not None:
            self._admin_listener.close()
        if self._admin is not None:
            self._admin.abort_all()


def _url(listener: asyncio.Server) -> str:
    host, port = listener.sockets[0].getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else host  # noqa: S104 - display only
    return f"http://{shown}:{port}"


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
