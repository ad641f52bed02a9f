"""The application factories: the proxy app, and the admin app (probes and metrics only)."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from .config import Settings
from .credentials import RefreshingTokenSource, TokenSource
from .errors import BadRequest
from .health import HEALTH_PATHS, health_routes
from .inbound import InboundKeys, InboundRules, allowed_host_names
from .lifecycle import Lifecycle
from .metrics import Metrics
from .middlewares import (
    log_cancelled,
    observe,
    proxy_errors,
    require_host,
    require_key,
    require_sound_framing,
    track,
)
from .outbound import client_ssl_context
from .relay import Upstream, relay
from .signin import EntraTokenFetcher
from .upstream import PooledUpstream
from .websocket import is_websocket_upgrade, relay_websocket

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
TOKEN_SOURCE = web.AppKey("token_source", TokenSource)
UPSTREAM = web.AppKey("upstream", Upstream)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
# What may use the proxy port, for the server that answers on it (http1.py) as well.
INBOUND_RULES = web.AppKey("inbound_rules", InboundRules)
METRICS_PATH = "/metrics"


def default_token_source(
    settings: Settings, metrics: Metrics, ssl_context: ssl.SSLContext
) -> RefreshingTokenSource:
    """The configured Entra ID sign-in (TLS trust `ssl_context`), its token refreshed in the
    background."""
    fetcher = EntraTokenFetcher(
        settings,
        ssl_context,
        on_certificate=lambda c: metrics.certificate_loaded(
            c.thumbprint_sha1, c.not_after.timestamp()
        ),
    )
    return RefreshingTokenSource(
        fetcher, fetch_timeout=settings.token_timeout, on_fetch=metrics.token_fetched
    )


def default_upstream(settings: Settings, ssl_context: ssl.SSLContext) -> Upstream:
    """The raw keep-alive pool (through HTTPS_PROXY where that applies: see `egress`)."""
    return PooledUpstream(
        ssl_context, connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
    )


def create_app(
    settings: Settings,
    *,
    token_source: TokenSource | None = None,
    upstream: Upstream | None = None,
) -> web.Application:
    """Build the proxy application; its token source and upstream open and close with it.

    The app holds the proxy's state; `http1.py` serves the proxy port from it, and hands the
    connections it does not serve itself (WebSocket upgrades) to this app's routes."""
    metrics = Metrics()
    # TLS trust: Entra's, and the upstream's (HTTP and WebSocket), one context when they
    # trust the same CAs: each holds its own copy of the system's (about 0.9 MB, issue 8).
    entra_ssl = client_ssl_context(settings.ca_file)
    upstream_ssl = (
        entra_ssl
        if settings.upstream_ca_file is None
        else client_ssl_context(settings.ca_file, settings.upstream_ca_file)
    )
    tokens = (
        token_source
        if token_source is not None
        else default_token_source(settings, metrics, entra_ssl)
    )
    outbound = upstream if upstream is not None else default_upstream(settings, upstream_ssl)
    lifecycle = Lifecycle()
    metrics.watch_token(tokens.status)

    reserved = frozenset((*HEALTH_PATHS, METRICS_PATH))
    middlewares = [
        track(lifecycle),
        observe(metrics, exempt=reserved),
        log_cancelled,
        proxy_errors,
        require_sound_framing,
    ]
    hosts = allowed_host_names(settings.allowed_hosts, loopback_only=settings.binds_loopback_only)
    if hosts is not None:
        middlewares.append(require_host(hosts))
    keys = InboundKeys(settings.api_keys) if settings.api_keys is not None else None
    if keys is not None:
        # Probes stay open: kubelet and load balancers cannot send a key.
        middlewares.append(require_key(keys, exempt=HEALTH_PATHS))
    app = web.Application(middlewares=middlewares)
    app[INBOUND_RULES] = InboundRules(hosts, keys)
    app[SETTINGS] = settings
    app[TOKEN_SOURCE] = tokens
    app[UPSTREAM] = outbound
    app[LIFECYCLE] = lifecycle
    app[METRICS] = metrics

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await outbound.start()
            stack.push_async_callback(outbound.close)
            tokens.start()
            stack.push_async_callback(tokens.close)
            yield

    app.cleanup_ctx.append(resources)

    async def forward(request: web.Request) -> web.StreamResponse:
        if is_websocket_upgrade(request):
            return await relay_websocket(request, settings, tokens, upstream_ssl)
        if "Upgrade" in request.headers:
            # h2c and other upgrades through a proxy are a known smuggling path: refuse them
            # rather than drop the header and let the two ends disagree on the protocol.
            raise BadRequest(f"Upgrade to {request.headers['Upgrade']!r} is not supported")
        return await relay(request, settings, tokens, outbound)

    app.add_routes(health_routes(tokens, lifecycle))
    app.router.add_get(METRICS_PATH, metrics.handler)
    # Every other method and path is forwarded; aiohttp's router does not normalise the raw
    # path we forward (relay reads request.raw_path).
    app.router.add_route("*", "/{path:.*}", forward)
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """Probes and /metrics of `app` for a separate listener (PROXY_ADMIN_PORT): kubelet and
    Prometheus reach them while the proxy port stays on 127.0.0.1. Nothing is forwarded."""
    admin = web.Application()
    admin.add_routes(health_routes(app[TOKEN_SOURCE], app[LIFECYCLE]))
    admin.router.add_get(METRICS_PATH, app[METRICS].handler)
    return admin
