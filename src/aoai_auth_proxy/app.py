"""The application: the proxy's state in one object, built from the settings in one place.

`create_app` makes the token source, the upstream pool, TLS trust, the lifecycle, the metrics
and the inbound rules; `server.ProxyServer` listens with them (`http1.Frontend` on the proxy
port, and on the admin port when there is one) and opens and closes them with `start`/`close`.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Generic, TypeVar, cast

from .config import Settings
from .credentials import RefreshingTokenSource, TokenSource
from .inbound import InboundKeys, InboundRules, allowed_host_names
from .lifecycle import Lifecycle
from .metrics import Metrics
from .outbound import client_ssl_context
from .relay import Upstream
from .signin import EntraTokenFetcher
from .upstream import PooledUpstream

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Key(Generic[_T]):
    """A typed name for one part of the app: `app[TOKEN_SOURCE]` is a TokenSource."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


SETTINGS: Key[Settings] = Key("settings")
TOKEN_SOURCE: Key[TokenSource] = Key("token_source")
UPSTREAM: Key[Upstream] = Key("upstream")
LIFECYCLE: Key[Lifecycle] = Key("lifecycle")
METRICS: Key[Metrics] = Key("metrics")
# What may use the proxy port (Host names, keys).
INBOUND_RULES: Key[InboundRules] = Key("inbound_rules")
# TLS trust for the upstream (HTTP and WebSocket).
UPSTREAM_SSL: Key[ssl.SSLContext] = Key("upstream_ssl")


class ProxyApp:
    """The proxy's state. Parts are attributes, and also `app[KEY]` for the keys above."""

    def __init__(
        self,
        *,
        settings: Settings,
        token_source: TokenSource,
        upstream: Upstream,
        lifecycle: Lifecycle,
        metrics: Metrics,
        inbound_rules: InboundRules,
        upstream_ssl: ssl.SSLContext,
    ) -> None:
        self.settings = settings
        self.token_source = token_source
        self.upstream = upstream
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.inbound_rules = inbound_rules
        self.upstream_ssl = upstream_ssl
        self._resources: contextlib.AsyncExitStack | None = None

    def __getitem__(self, key: Key[_T]) -> _T:
        return cast(_T, getattr(self, key.name))

    async def start(self) -> None:
        """Open the upstream pool, then start fetching tokens."""
        async with contextlib.AsyncExitStack() as stack:
            await self.upstream.start()
            stack.push_async_callback(self.upstream.close)
            self.token_source.start()
            stack.push_async_callback(self.token_source.close)
            self._resources = stack.pop_all()

    async def close(self) -> None:
        """Stop the token source, then close the upstream pool (the reverse of `start`)."""
        resources, self._resources = self._resources, None
        if resources is not None:
            await resources.aclose()


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
) -> ProxyApp:
    """Build the proxy's state; `token_source` and `upstream` replace the real ones (tests)."""
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
    metrics.watch_token(tokens.status)
    hosts = allowed_host_names(settings.allowed_hosts, loopback_only=settings.binds_loopback_only)
    keys = InboundKeys(settings.api_keys) if settings.api_keys is not None else None
    return ProxyApp(
        settings=settings,
        token_source=tokens,
        upstream=outbound,
        lifecycle=Lifecycle(),
        metrics=metrics,
        inbound_rules=InboundRules(hosts, keys),
        upstream_ssl=upstream_ssl,
    )
