"""Property-based checks of the forwarding rules: whatever a client sends, the upstream host
never changes, client credentials never pass, and hop-by-hop headers never pass."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from aoai_auth_proxy.errors import BadRequest
from aoai_auth_proxy.forwarding import (
    CLIENT_CREDENTIALS,
    HOP_BY_HOP,
    client_response_headers,
    upstream_request_headers,
    upstream_url,
)

BASE = "https://res.openai.azure.com:443/openai/v1"
TRICKY = [
    "/",
    "//",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "@",
    ":",
    "?",
    "#",
    "&",
    "api-key=",
    "API-KEY=",
    "api%2Dkey=",
    "http:",
    "evil.example",
    "%00",
    "%25",
    ";",
    "=",
]
pieces = st.one_of(st.sampled_from(TRICKY), st.text(alphabet="abcXYZ09-_~.%", max_size=4))
targets = st.lists(pieces, max_size=12).map("".join)


def _case_variants(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))
    )


header_names = st.one_of(
    st.sampled_from(sorted(CLIENT_CREDENTIALS | HOP_BY_HOP | {"host", "expect"})).flatmap(
        _case_variants
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
)
header_values = st.text(alphabet="abc ,-=keep-alive", max_size=20)
headers = st.lists(st.tuples(header_names, header_values), max_size=12)


@settings(max_examples=500, deadline=None)
@given(target=targets)
def test_no_target_reaches_another_host_or_leaves_the_base_path(target: str) -> None:
    try:
        url = upstream_url(BASE, target)
    except BadRequest:
        return
    parsed = URL(url, encoded=True)  # as the relay hands it to the client library
    assert (parsed.scheme, parsed.host, parsed.port) == ("https", "res.openai.azure.com", 443)
    assert parsed.raw_path.startswith("/openai/v1/")
    assert ".." not in unquote(unquote(parsed.raw_path)).split("/")
    for name, _ in parse_qsl(parsed.raw_query_string, keep_blank_values=True):
        assert unquote(name).lower() != "api-key"


@settings(max_examples=500, deadline=None)
@given(client=headers)
def test_no_client_credential_or_hop_by_hop_header_passes(client: list[tuple[str, str]]) -> None:
    out = upstream_request_headers(client, token="the-token", host="res.openai.azure.com")
    named_by_connection = {
        token.strip().lower()
        for name, value in client
        if name.lower() == "connection"
        for token in value.split(",")
    }
    names = [name.lower() for name, _ in out]
    assert names.count("authorization") == 1
    assert ("Authorization", "Bearer the-token") in out
    assert names.count("host") == 1
    assert ("Host", "res.openai.azure.com") in out
    assert "api-key" not in names
    assert not (set(names) & HOP_BY_HOP)
    assert not (set(names) & named_by_connection)
    kept = [(n, v) for n, v in client if n.lower() in names and n.lower() not in ("host",)]
    assert [h for h in out if h[0].lower() not in ("host", "authorization")] == [
        h for h in kept if h[0].lower() != "authorization"
    ]


@settings(max_examples=300, deadline=None)
@given(upstream=headers)
def test_no_hop_by_hop_header_reaches_the_client(upstream: list[tuple[str, str]]) -> None:
    out = client_response_headers(upstream)
    names = {name.lower() for name, _ in out}
    assert not (names & HOP_BY_HOP)


def _named_by_connection(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


@settings(max_examples=500, deadline=None)
@given(given_headers=headers)
def test_the_header_filters_keep_exactly_what_the_plain_rule_keeps(
    given_headers: list[tuple[str, str]],
) -> None:
    # forwarding._kept lower-cases only names as long as a dropped one: the same result as
    # lower-casing every name, which is the rule as RFC 9110 7.6.1 states it.
    named = _named_by_connection(given_headers)
    hop = HOP_BY_HOP | named
    assert client_response_headers(given_headers) == [
        (n, v) for n, v in given_headers if n.lower() not in hop
    ]
    upstream = hop | CLIENT_CREDENTIALS | {"host", "expect"}
    assert upstream_request_headers(given_headers, token="t", host="h")[1:-1] == [
        (n, v) for n, v in given_headers if n.lower() not in upstream
    ]
