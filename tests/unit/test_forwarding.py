"""The pure forwarding rules: target URL, credential stripping, hop-by-hop headers."""

from __future__ import annotations

import pytest

from aoai_auth_proxy.errors import BadRequest
from aoai_auth_proxy.forwarding import (
    client_response_headers,
    redact_target,
    upstream_request_headers,
    upstream_request_id,
    upstream_url,
)

BASE = "https://res.openai.azure.com"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/openai/models", f"{BASE}/openai/models"),
        (
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            f"{BASE}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        ),
        # raw bytes are kept: encoded characters, odd order, empty values, a trailing "?"
        ("/a%20b/c?x=%2F&y=&z=1&x=2", f"{BASE}/a%20b/c?x=%2F&y=&z=1&x=2"),
        ("/path?", f"{BASE}/path?"),
        ("/", f"{BASE}/"),
        ("/a//b", f"{BASE}/a//b"),
        ("/file.v1/..name", f"{BASE}/file.v1/..name"),
    ],
)
def test_target_is_base_plus_raw_path_and_query(target: str, expected: str) -> None:
    assert upstream_url(BASE, target) == expected


def test_base_path_prefix_is_kept() -> None:
    base = "https://res.openai.azure.com/openai/v1"
    assert upstream_url(base, "/chat/completions") == f"{base}/chat/completions"


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/openai/models",  # absolute-form
        "evil.example:443",  # authority-form (CONNECT)
        "*",  # asterisk-form
        "//evil.example/openai",
        "/openai/../admin",
        "/openai/./models",
        "/..",
        "/openai/%2e%2e/admin",
        "/openai/%2E%2e/admin",
        "/openai/.%2e/admin",
        "/openai/%252e%252e/admin",  # double-encoded
        "/openai/..%2fadmin",
        "/openai/%2f%2fevil.example",
        "/openai\\..\\admin",
        "/openai/%5c..%5cadmin",
        "/openai/%00",
        "/openai/models#frag",
    ],
)
def test_targets_that_could_leave_the_base_are_refused(target: str) -> None:
    with pytest.raises(BadRequest) as raised:
        upstream_url(BASE, target)
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/m?api-key=secret", "/m"),
        ("/m?api-version=1&api-key=secret", "/m?api-version=1"),
        ("/m?API-KEY=secret&b=2", "/m?b=2"),
        ("/m?api%2Dkey=secret&b=2", "/m?b=2"),
        ("/m?api-key&b=2", "/m?b=2"),
        ("/m?xapi-key=1", "/m?xapi-key=1"),
        ("/m?subscription-key=secret&b=2", "/m?b=2"),  # API Management's query form
        ("/m?b=2&Subscription-Key=secret", "/m?b=2"),
    ],
)
def test_api_key_query_parameter_never_reaches_upstream(target: str, expected: str) -> None:
    assert upstream_url(BASE, target) == BASE + expected
    assert redact_target(target) == expected


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in headers]


def test_client_credentials_are_replaced_by_the_bearer_token_in_any_case() -> None:
    incoming = [
        ("API-KEY", "k1"),
        ("Api-Key", "k2"),
        ("authorization", "Bearer client"),
        ("AUTHORIZATION", "Basic x"),
        ("Ocp-Apim-Subscription-Key", "k3"),
        ("Content-Type", "application/json"),
    ]
    out = upstream_request_headers(incoming, token="tok", host="res.openai.azure.com")
    assert ("Authorization", "Bearer tok") in out
    assert _names(out).count("authorization") == 1
    assert "api-key" not in _names(out)
    assert "ocp-apim-subscription-key" not in _names(out)
    assert ("Content-Type", "application/json") in out


def test_host_is_the_upstream_and_appears_once() -> None:
    out = upstream_request_headers(
        [("Host", "localhost:8080"), ("host", "evil")], token="t", host="res:443"
    )
    assert [h for h in out if h[0].lower() == "host"] == [("Host", "res:443")]


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    incoming = [
        ("Connection", "keep-alive, X-Private, Upgrade"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "x"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Private", "hop"),
        ("Expect", "100-continue"),
        ("X-Keep", "end-to-end"),
    ]
    out = upstream_request_headers(incoming, token="t", host="h")
    assert _names(out) == ["host", "x-keep", "authorization"]


def test_repeated_headers_keep_order_and_letter_case() -> None:
    incoming = [("X-Multi", "1"), ("x-ms-client-request-id", "abc"), ("X-Multi", "2")]
    out = upstream_request_headers(incoming, token="t", host="h")
    assert out[1:-1] == incoming


def test_response_headers_keep_cookies_and_rate_limits_but_not_hop_by_hop() -> None:
    upstream = [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("retry-after-ms", "10"),
        ("x-ratelimit-remaining-tokens", "99"),
        ("apim-request-id", "r1"),
        ("Content-Encoding", "gzip"),
    ]
    out = client_response_headers(upstream)
    assert out == [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("retry-after-ms", "10"),
        ("x-ratelimit-remaining-tokens", "99"),
        ("apim-request-id", "r1"),
        ("Content-Encoding", "gzip"),
    ]


def test_targets_that_are_not_origin_form_are_never_logged() -> None:
    assert redact_target("http://user:s3cret@evil.example/x?sig=abc") == "<non-origin-form target>"
    assert redact_target("evil.example:443") == "<non-origin-form target>"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-Request-Id", "x1"), ("Apim-Request-Id", "a1")], "a1"),  # API Management's first
        ([("x-request-id", "x1")], "x1"),
        ([("apim-request-id", ""), ("x-request-id", "x1")], "x1"),  # an empty one is no id
        ([("content-type", "application/json"), ("x-ms-region", "East US")], None),
        ([("x-request-id", "x1"), ("x-request-id", "x2")], "x1"),
    ],
)
def test_the_upstream_request_id_prefers_api_management(
    headers: list[tuple[str, str]], expected: str | None
) -> None:
    assert upstream_request_id(headers) == expected
