"""Prometheus metrics: one registry per app, bounded labels, nothing per request that grows."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .credentials import TokenStatus
from .logs import SESSION_STATS, UPSTREAM_TIMING, SessionStats, UpstreamTiming

PREFIX = "aoai_proxy"
# LLM calls span from a 10 ms embedding to a 10-minute reasoning stream.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Deployment names come from request paths, i.e. from clients: keep the label set bounded.
MAX_DEPLOYMENT_LABELS = 50
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DEPLOYMENT = re.compile(r"^/(?:openai/)?deployments/([^/?]+)/")
_AADSTS = re.compile(r"AADSTS(\d+)")


def deployment_of(path: str) -> str:
    """The deployment named by an Azure-style path, or "" (v1 paths carry it in the body)."""
    match = _DEPLOYMENT.match(path)
    return match.group(1) if match else ""


def aadsts_code(message: str) -> str:
    """The AADSTS error code in an Entra message ("AADSTS700016"), or "none"."""
    match = _AADSTS.search(message)
    return f"AADSTS{match.group(1)}" if match else "none"


class Metrics:
    """Every series the proxy exports, on a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by method, status code and deployment.",
            ["method", "code", "deployment"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to the end of the response.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            f"{PREFIX}_upstream_ttfb_seconds",
            "Time until the upstream's status line and headers.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_duration = Histogram(
            f"{PREFIX}_stream_duration_seconds",
            "Duration of server-sent-event streams.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests", "Requests being served now.", registry=r
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream failures, by kind (connect, tls, timeout, reset, protocol).",
            ["kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_upstream_rate_limited",
            "429 answers passed through from the upstream.",
            ["deployment"],
            registry=r,
        )
        self.websocket_sessions = Counter(
            f"{PREFIX}_websocket_sessions",
            "WebSocket sessions ended, by close code (1000-1015, else other).",
            ["close_code"],
            registry=r,
        )
        self.websocket_frames = Counter(
            f"{PREFIX}_websocket_frames",
            "WebSocket messages relayed, by direction (in: client to upstream).",
            ["direction"],
            registry=r,
        )
        self.websocket_duration = Histogram(
            f"{PREFIX}_websocket_session_duration_seconds",
            "Duration of WebSocket sessions.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "Connections answered 503 at once because PROXY_MAX_CONNECTIONS were open.",
            registry=r,
        )
        self.token_refreshes = Counter(
            f"{PREFIX}_token_refreshes",
            "Token fetches from Entra ID, by result and AADSTS code on failure.",
            ["result", "code"],
            registry=r,
        )
        self.token_expiry = Gauge(
            f"{PREFIX}_token_expires_in_seconds",
            "Seconds until the held token expires (negative: expired; absent: none yet).",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            f"{PREFIX}_certificate_expiry_timestamp_seconds",
            "When the client certificate in use expires (Unix time).",
            ["thumbprint"],
            registry=r,
        )
        self._deployments: set[str] = set()
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram, Histogram]] = {}

    def deployment(self, path: str) -> str:
        """A bounded label for `path`: the first MAX_DEPLOYMENT_LABELS names, then "other"."""
        name = deployment_of(path)
        if not name or name in self._deployments:
            return name
        if len(self._deployments) >= MAX_DEPLOYMENT_LABELS:
            return OTHER
        self._deployments.add(name)
        return name

    def watch_token(self, status: Callable[[], TokenStatus]) -> None:
        """Report the token's remaining life at scrape time."""

        def remaining() -> float:
            expires_on = status().expires_on
            return expires_on - time.time() if expires_on is not None else float("nan")

        self.token_expiry.set_function(remaining)

    def token_fetched(self, error: str | None) -> None:
        if error is None:
            self.token_refreshes.labels("success", "none").inc()
        else:
            self.token_refreshes.labels("failure", aadsts_code(error)).inc()

    def certificate_loaded(self, thumbprint: str, not_after: float) -> None:
        self.certificate_expiry.clear()  # one series: the certificate in use now
        self.certificate_expiry.labels(thumbprint).set(not_after)

    def middleware(self, *, exempt: frozenset[str]) -> Middleware:
        """Observe every forwarded request (not the probes and /metrics in `exempt`)."""

        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in exempt:
                return await handler(request)
            deployment = self.deployment(request.path)
            started = time.monotonic()
            code = "500"
            streamed = False
            self.in_flight.inc()
            try:
                response = await handler(request)
                code = str(response.status)
                streamed = response.content_type == "text/event-stream"
                return response
            except asyncio.CancelledError:
                code = "499"
                raise
            except web.HTTPException as exc:
                code = str(exc.status)
                raise
            finally:
                self.in_flight.dec()
                self._observe(request, deployment, code, time.monotonic() - started, streamed)

        return observe

    def _observe(
        self, request: web.Request, deployment: str, code: str, seconds: float, streamed: bool
    ) -> None:
        self.observe(
            request.method,
            deployment,
            code,
            seconds,
            streamed=streamed,
            timing=request.get(UPSTREAM_TIMING),
            session=request.get(SESSION_STATS),
        )

    def observe(
        self,
        method: str,
        deployment: str,
        code: str,
        seconds: float,
        *,
        streamed: bool,
        timing: UpstreamTiming | None,
        session: SessionStats | None = None,
    ) -> None:
        """Count one answered request (whichever server answered it)."""
        method = method if method in METHODS else OTHER
        key = (method, code, deployment)
        children = self._children.get(key)
        if children is None:
            # labels() takes a lock and builds a tuple on every call: the label sets are
            # bounded (METHODS x status codes x MAX_DEPLOYMENT_LABELS), so keep the children.
            children = self._children[key] = (
                self.requests.labels(method, code, deployment),
                self.duration.labels(deployment),
                self.ttfb.labels(deployment),
            )
        requests, duration, ttfb = children
        requests.inc()
        duration.observe(seconds)
        if streamed:
            self.stream_duration.labels(deployment).observe(seconds)
        if code == "429":
            self.rate_limited.labels(deployment).inc()
        if session is not None:
            close = session.close_code
            label = str(close) if close is not None and 1000 <= close <= 1015 else OTHER
            self.websocket_sessions.labels(label).inc()
            self.websocket_frames.labels("in").inc(session.frames_in)
            self.websocket_frames.labels("out").inc(session.frames_out)
            self.websocket_duration.observe(seconds)
        if timing is not None:
            if timing.ttfb is not None:
                ttfb.observe(timing.ttfb)
            if timing.error_kind is not None:
                self.upstream_errors.labels(timing.error_kind).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The page /metrics serves, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def handler(self, request: web.Request) -> web.Response:
        """GET /metrics in Prometheus text format."""
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
