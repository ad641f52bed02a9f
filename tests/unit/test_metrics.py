"""The per-request series export exactly what prometheus_client's own Counter and Histogram
would for the same requests (metrics.RequestSeries), and labels stay bounded."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from aoai_auth_proxy.metrics import (
    LATENCY_BUCKETS,
    MAX_DEPLOYMENT_LABELS,
    OTHER,
    PREFIX,
    Metrics,
    RequestSeries,
)

# (method, code, deployment, seconds, ttfb): bucket edges, values past the last bucket, no
# TTFB (a request refused before the upstream), and two deployments.
REQUESTS = [
    ("POST", "200", "gpt-4o", 0.01, 0.004),
    ("POST", "200", "gpt-4o", 0.0100001, 0.01),
    ("POST", "429", "gpt-4o", 0.3, 0.3),
    ("GET", "200", "", 2.5, 2.0),
    ("POST", "502", "embed", 700.0, None),
    ("POST", "200", "embed", 0.0, 0.0),
]


def _reference() -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter(
        f"{PREFIX}_requests",
        "Requests answered, by method, status code and deployment.",
        ["method", "code", "deployment"],
        registry=registry,
    )
    duration = Histogram(
        f"{PREFIX}_request_duration_seconds",
        "Time from request to the end of the response.",
        ["deployment"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    ttfb = Histogram(
        f"{PREFIX}_upstream_ttfb_seconds",
        "Time until the upstream's status line and headers.",
        ["deployment"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    for method, code, deployment, seconds, first_byte in REQUESTS:
        requests.labels(method, code, deployment).inc()
        duration.labels(deployment).observe(seconds)
        series = ttfb.labels(deployment)
        if first_byte is not None:
            series.observe(first_byte)
    return generate_latest(registry)


def _ours() -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    series = RequestSeries()
    registry.register(series)
    for method, code, deployment, seconds, first_byte in REQUESTS:
        series.count(method, code, deployment, seconds, first_byte)
    return generate_latest(registry)


def _without_created_values(page: bytes) -> list[str]:
    # `_created` samples carry the time each series began: equal in form, not in value.
    lines = page.decode().splitlines()
    return sorted(re.sub(r"(_created\{.*\}) \S+$", r"\1 <time>", line) for line in lines)


def test_request_series_export_what_prometheus_client_exports() -> None:
    assert _without_created_values(_ours()) == _without_created_values(_reference())


def test_in_flight_is_read_when_scraped() -> None:
    metrics = Metrics()
    metrics.in_flight += 2
    page, _ = metrics.exposition()
    assert f"{PREFIX}_in_flight_requests 2.0" in page.decode().splitlines()


def test_deployment_labels_stay_bounded_and_are_remembered_per_path() -> None:
    metrics = Metrics()
    names = [
        metrics.deployment(f"/openai/deployments/d{i}/chat/completions")
        for i in range(MAX_DEPLOYMENT_LABELS + 5)
    ]
    assert names[:MAX_DEPLOYMENT_LABELS] == [f"d{i}" for i in range(MAX_DEPLOYMENT_LABELS)]
    assert set(names[MAX_DEPLOYMENT_LABELS:]) == {OTHER}
    # The same path keeps its label, even once the label set is full.
    assert metrics.deployment("/openai/deployments/d0/chat/completions") == "d0"
    assert metrics.deployment("/v1/chat/completions") == ""
