"""The application factory: wires settings, token source and upstream into an aiohttp app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .config import Settings
from .credentials import RefreshingTokenSource, TokenSource
from .errors import ProxyError
from .forwarding import redact_target
from .health import health_routes
from .lifecycle import Lifecycle
from .logs import log_cancelled
from .outbound import client_ssl_context
from .relay import AiohttpUpstream, Upstream, relay
from .signin import EntraTokenFetcher

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
TOKEN_SOURCE = web.AppKey("token_source", TokenSource)
UPSTREAM = web.AppKey("upstream", Upstream)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def default_token_source(settings: Settings) -> RefreshingTokenSource:
    """The configured Entra ID sign-in, its token refreshed in the background."""
    fetcher = EntraTokenFetcher(settings, client_ssl_context(settings.ca_file))
    return RefreshingTokenSource(fetcher, fetch_timeout=settings.token_timeout)


def default_upstream(settings: Settings) -> AiohttpUpstream:
    return AiohttpUpstream(
        client_ssl_context(settings.ca_file),
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )


def create_app(
    settings: Settings,
    *,
    token_source: TokenSource | None = None,
    upstream: Upstream | None = None,
) -> web.Application:
    """Build the proxy application; its token source and upstream open and close with it."""
    tokens = token_source if token_source is not None else default_token_source(settings)
    outbound = upstream if upstream is not None else default_upstream(settings)
    lifecycle = Lifecycle()

    app = web.Application(middlewares=[lifecycle.middleware(), log_cancelled, _proxy_errors])
    app[SETTINGS] = settings
    app[TOKEN_SOURCE] = tokens
    app[UPSTREAM] = outbound
    app[LIFECYCLE] = lifecycle

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await outbound.start()
            stack.push_async_callback(outbound.close)
            tokens.start()
            stack.push_async_callback(tokens.close)
            yield

    app.cleanup_ctx.append(resources)

    async def forward(request: web.Request) -> web.StreamResponse:
        return await relay(request, settings, tokens, outbound)

    app.add_routes(health_routes(tokens, lifecycle))
    # Every other method and path is forwarded; aiohttp's router does not normalise the raw
    # path we forward (relay reads request.raw_path).
    app.router.add_route("*", "/{path:.*}", forward)
    return app


@web.middleware
async def _proxy_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the proxy's own errors into OpenAI-shaped JSON the SDKs surface."""
    try:
        return await handler(request)
    except ProxyError as exc:
        log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            redact_target(request.raw_path),
            exc.status,
            exc.code,
            exc.message,
        )
        return web.Response(
            status=exc.status,
            body=exc.error_body(),
            content_type="application/json",
        )
