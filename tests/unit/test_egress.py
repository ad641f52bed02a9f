"""Which egress proxy carries a connection: the variables as urllib and aiohttp read them."""

from __future__ import annotations

import base64
import re

import pytest

from aoai_auth_proxy.egress import EgressProxy, egress_proxy, parse_proxy_url

VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp:3128", EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")),
        ("http://proxy.corp", EgressProxy("proxy.corp", 80, "HTTPS_PROXY")),
        ("HTTP://Proxy.Corp:3128/", EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")),
        ("http://[::1]:3128", EgressProxy("::1", 3128, "HTTPS_PROXY")),
        (
            "http://svc%40corp:p%3Ass@proxy:8080",  # percent-encoded userinfo (RFC 3986 3.2.1)
            EgressProxy("proxy", 8080, "HTTPS_PROXY", basic("svc@corp:p:ss")),
        ),
        (
            "http://only-user@proxy:8080",
            EgressProxy("proxy", 8080, "HTTPS_PROXY", basic("only-user:")),
        ),
    ],
)
def test_a_proxy_url_names_host_port_and_credentials(url: str, expected: EgressProxy) -> None:
    proxy = parse_proxy_url(url, "https_proxy")
    assert proxy == expected
    assert proxy.authorization == expected.authorization


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "https://u:secret@proxy:3128",
            "HTTPS_PROXY='https://<credentials>@proxy:3128': a proxy reached over TLS",
        ),
        ("proxy.corp:3128", "HTTPS_PROXY='proxy.corp:3128' is not a proxy URL: use http://"),
        ("socks5://proxy:1080", "HTTPS_PROXY='socks5://proxy:1080' is not a proxy URL"),
        (
            "http://u:secret@proxy:port",
            "HTTPS_PROXY='http://<credentials>@proxy:port' is not a proxy",
        ),
        ("http://:3128", "HTTPS_PROXY='http://:3128' is not a proxy URL"),
    ],
)
def test_a_bad_proxy_url_is_named_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(says)) as raised:
        parse_proxy_url(url, "HTTPS_PROXY")
    assert "secret" not in str(raised.value)


def test_a_proxy_is_named_by_address_only() -> None:
    proxy = parse_proxy_url("http://u:secret@[fd00::1]:3128", "HTTPS_PROXY")
    assert proxy.address == "[fd00::1]:3128"
    assert "secret" not in repr(proxy)


def test_the_scheme_picks_the_variable_and_lowercase_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert egress_proxy("https", "res.openai.azure.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    monkeypatch.setenv("HTTP_PROXY", "http://plain:2")
    monkeypatch.setenv("ALL_PROXY", "http://all:3")  # not read, as aiohttp does not
    assert egress_proxy("https", "res.openai.azure.com") == EgressProxy("upper", 1, "HTTPS_PROXY")
    assert egress_proxy("http", "res.openai.azure.com") == EgressProxy("plain", 2, "HTTP_PROXY")
    monkeypatch.setenv("https_proxy", "http://lower:4")
    assert egress_proxy("https", "res.openai.azure.com") == EgressProxy("lower", 4, "HTTPS_PROXY")
    assert egress_proxy("ws", "res.openai.azure.com") is None


@pytest.mark.parametrize(
    ("no_proxy", "host", "direct"),
    [
        ("", "res.openai.azure.com", False),
        ("*", "res.openai.azure.com", True),
        ("openai.azure.com", "res.openai.azure.com", True),  # a domain suffix
        (".azure.com", "res.openai.azure.com", True),
        ("other.example,127.0.0.1", "127.0.0.1", True),
        ("other.example", "res.openai.azure.com", False),
    ],
)
def test_no_proxy_is_matched_per_host(
    no_proxy: str, host: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert (egress_proxy("https", host) is None) is direct
