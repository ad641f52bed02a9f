"""Prometheus metrics: one registry per app, bounded labels, nothing per request that grows."""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

from .credentials import TokenStatus
from .logs import SessionStats, UpstreamTiming

PREFIX = "aoai_proxy"
# LLM calls span from a 10 ms embedding to a 10-minute reasoning stream.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Deployment names come from request paths, i.e. from clients: keep the label set bounded.
MAX_DEPLOYMENT_LABELS = 50
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The `le` labels of LATENCY_BUCKETS as prometheus_client writes them (its floatToGoString).
_LE = (*(repr(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")
# Paths whose deployment label is remembered (the regex runs once per path, not per request).
MAX_CACHED_PATHS = 1024
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
        # The three series every request updates, kept as plain numbers (RequestSeries).
        self.series = RequestSeries()
        r.register(self.series)
        self.stream_duration = Histogram(
            f"{PREFIX}_stream_duration_seconds",
            "Duration of server-sent-event streams.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Requests being served now: a plain count, read by the gauge when scraped.
        self.in_flight = 0
        Gauge(
            f"{PREFIX}_in_flight_requests", "Requests being served now.", registry=r
        ).set_function(lambda: self.in_flight)
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
        self._labels: dict[str, str] = {}

    def deployment(self, path: str) -> str:
        """A bounded label for `path`: the first MAX_DEPLOYMENT_LABELS names, then "other"."""
        label = self._labels.get(path)
        if label is None:
            label = self._deployment(path)
            if len(self._labels) < MAX_CACHED_PATHS:
                self._labels[path] = label
        return label

    def _deployment(self, path: str) -> str:
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
        ttfb = timing.ttfb if timing is not None else None
        self.series.count(method, code, deployment, seconds, ttfb)
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
        if timing is not None and timing.error_kind is not None:
            self.upstream_errors.labels(timing.error_kind).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The page /metrics serves, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Tally:
    """One histogram's numbers: counts per bucket (the last for +Inf), their sum, and when
    the series began (the `_created` sample prometheus_client's own histograms export)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound holds the value (le: less than or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Count:
    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class RequestSeries:
    """aoai_proxy_requests_total, aoai_proxy_request_duration_seconds and
    aoai_proxy_upstream_ttfb_seconds, with the names, labels, buckets and samples
    prometheus_client's Counter and Histogram export, counted in plain numbers and turned
    into samples when scraped: prometheus_client's children take a lock and run Python for
    each count, about a tenth of a relayed request's CPU (issue 8). Counted and scraped on
    the event loop's thread only."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], _Count] = {}
        self._duration: dict[str, _Tally] = {}
        self._ttfb: dict[str, _Tally] = {}

    def count(
        self, method: str, code: str, deployment: str, seconds: float, ttfb: float | None
    ) -> None:
        key = (method, code, deployment)
        requests = self._requests.get(key)
        if requests is None:
            requests = self._requests[key] = _Count()
        requests.value += 1
        duration = self._duration.get(deployment)
        if duration is None:
            duration = self._duration[deployment] = _Tally(LATENCY_BUCKETS)
            self._ttfb[deployment] = _Tally(LATENCY_BUCKETS)
        duration.observe(seconds)
        if ttfb is not None:
            self._ttfb[deployment].observe(ttfb)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Requests answered, by method, status code and deployment.",
            labels=["method", "code", "deployment"],
        )
        for (method, code, deployment), count in self._requests.items():
            requests.add_metric([method, code, deployment], count.value, created=count.created)
        yield requests
        yield _histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to the end of the response.",
            self._duration,
        )
        yield _histogram(
            f"{PREFIX}_upstream_ttfb_seconds",
            "Time until the upstream's status line and headers.",
            self._ttfb,
        )


def _histogram(name: str, documentation: str, tallies: dict[str, _Tally]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=["deployment"])
    for deployment, tally in tallies.items():
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(_LE, tally.counts, strict=True):
            running += count
            buckets.append((le, running))
        family.add_metric([deployment], buckets, tally.sum)
        family.samples.append(Sample(f"{name}_created", {"deployment": deployment}, tally.created))
    return family
