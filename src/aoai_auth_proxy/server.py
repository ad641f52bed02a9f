"""The proxy's lifecycle in one place: listen, become ready, drain, stop.

Shutdown order, as uvicorn and cloud-sql-proxy do it: readiness turns 503 at once; after
PROXY_SHUTDOWN_DELAY (time for endpoints to stop routing here) the listener closes and idle
keep-alive connections with it; in-flight requests and streams get PROXY_SHUTDOWN_TIMEOUT to
finish; what is left is cancelled; then the token source and upstream pool close.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .app import LIFECYCLE, TOKEN_SOURCE, create_app
from .config import Settings
from .logs import ACCESS_LOGGER, AccessLogger

log = logging.getLogger(__name__)

# After our own drain, aiohttp's cleanup only closes what is already finished or cancelled.
_CLEANUP_TIMEOUT_SECONDS = 1.0
_READY_POLL_SECONDS = 0.05


class ProxyServer:
    """One proxy listener: `await start()`, then `await stop()` (which drains)."""

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
            shutdown_timeout=_CLEANUP_TIMEOUT_SECONDS,
        )
        self.url = ""

    async def start(self) -> str:
        """Open resources and listen; returns the URL. OSError if the address cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        shown = "127.0.0.1" if host == "0.0.0.0" else host  # noqa: S104 - display only
        self.url = f"http://{shown}:{port}"
        return self.url

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
        for site in list(self._runner.sites):
            await site.stop()
        if self._runner.server is not None:
            self._runner.server.pre_shutdown()  # idle keep-alive connections close now
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
        await self._runner.cleanup()
