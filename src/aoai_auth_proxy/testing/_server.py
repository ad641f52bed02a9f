"""Serves a stand-in's aiohttp application on a local socket, over TLS unless told otherwise."""

from __future__ import annotations

import ipaddress
import ssl
from types import TracebackType
from typing import Any, Self

from aiohttp import web

# A stand-in that closes while a test still streams from it gives in-flight handlers this long
# (seconds) before they are cancelled; tests should not wait a minute, aiohttp's default.
SHUTDOWN_TIMEOUT = 0.5


def url_host(host: str) -> str:
    """The host as it goes into a URL that reaches it: a wildcard bind is reached on loopback,
    IPv6 literals are bracketed (RFC 3986 section 3.2.2)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - translating a wildcard bind, not binding one
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{address}]" if address.version == 6 else host


def certificate_hosts(host: str) -> tuple[str, ...]:
    """The names a stand-in bound to `host` is reached by, for its server certificate."""
    return tuple(dict.fromkeys((url_host(host).strip("[]"), "127.0.0.1", "localhost")))


class LocalServer:
    """One aiohttp application on one listening socket; `start()` then `close()`."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        **server_options: Any,
    ) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._ssl_context = ssl_context
        self._server_options = server_options
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in is not started: call `await start()` first")
        return self._port

    @property
    def origin(self) -> str:
        """`scheme://host:port`, with no trailing slash."""
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{url_host(self._host)}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the stand-in is already started")
        runner = web.AppRunner(
            self._app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            **self._server_options,
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self._host, self._requested_port, ssl_context=self._ssl_context
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # Port 0 asks the kernel for a free port; read back the one it chose.
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


class StandIn:
    """The lifecycle every stand-in shares: `start()`, `close()`, `async with`, `port`.

    Subclasses set `self._server` and may extend `start()`/`close()` (calling super)."""

    _server: LocalServer

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._server.port
