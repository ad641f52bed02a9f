"""Which egress proxy carries a connection: the variables as urllib reads them."""

from __future__ import annotations

import base64
import re
import urllib.request

import pytest

from aoai_auth_proxy.egress import EgressProxy, egress_proxy, parse_proxy_url, setting


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp:3128", EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")),
        ("http://proxy.corp", EgressProxy("proxy.corp", 80, "HTTPS_PROXY")),
        ("HTTP://Proxy.Corp:3128/", EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")),
        (" http://proxy.corp:3128 ", EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")),
        ("http://[::1]:3128", EgressProxy("::1", 3128, "HTTPS_PROXY")),
        (
            "http://svc%40corp:p%3As%2Fs@proxy:8080",  # percent-encoded userinfo (RFC 3986 3.2.1)
            EgressProxy("proxy", 8080, "HTTPS_PROXY", basic("svc@corp:p:s/s")),
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
        (" ", "HTTPS_PROXY=' ' is not a proxy URL"),
        ("socks5://proxy:1080", "HTTPS_PROXY='socks5://proxy:1080' is not a proxy URL"),
        ("http://u:secret@proxy:port", "HTTPS_PROXY='http://<credentials>@proxy:port' is not a"),
        ("http://:3128", "HTTPS_PROXY='http://:3128' is not a proxy URL"),
        # what other clients (websockets) refuse with the whole URL in their message
        ("http://u:secret@proxy:3128/pac", "HTTPS_PROXY='http://<credentials>@proxy:3128/pac' is"),
        ("http://proxy:3128?x=1", "HTTPS_PROXY='http://proxy:3128?x=1' is not a proxy URL"),
        ("http://proxy:3128#top", "HTTPS_PROXY='http://proxy:3128#top' is not a proxy URL"),
        # an unencoded "/" or "[" in the password: hidden all the same
        ("http://svc:Pa/secret@proxy:3128", "HTTPS_PROXY='http://<credentials>@proxy:3128' is"),
        ("http://svc:[secret]@proxy:3128", "HTTPS_PROXY='http://<credentials>@proxy:3128' is"),
        ("http://svc:8080/secret@proxy:3128", "HTTPS_PROXY='http://<credentials>@proxy:3128' is"),
        # RFC 7617 leaves the charset open: sent two ways by two clients, so refused
        ("http://svc:p%C3%A4secret@proxy:3128", "HTTPS_PROXY='http://<credentials>@proxy:3128'"),
        ("http://s%3Av:secret@proxy:3128", "HTTPS_PROXY='http://<credentials>@proxy:3128': the"),
    ],
)
def test_a_bad_proxy_url_is_named_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(says)) as raised:
        parse_proxy_url(url, "HTTPS_PROXY")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("http://proxy.corp:3128/", "http://proxy.corp:3128"),
        ("http://proxy.corp", "http://proxy.corp:80"),
        ("http://only-user@[::1]:8080", "http://only-user:@[::1]:8080"),  # websockets needs ":"
        ("http://svc%40corp:p%3As@proxy:1", "http://svc%40corp:p%3As@proxy:1"),  # still encoded
    ],
)
def test_other_clients_get_the_proxy_url_normalised(url: str, normalised: str) -> None:
    assert parse_proxy_url(url, "HTTPS_PROXY").url == normalised


def test_a_proxy_is_named_by_address_only() -> None:
    proxy = parse_proxy_url("http://u:secret@[fd00::1]:3128", "https_proxy")
    assert proxy.named == "[fd00::1]:3128 (HTTPS_PROXY)"
    assert "secret" not in repr(proxy)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://upper:1"}, ("HTTPS_PROXY", "http://upper:1")),
        ({"HTTPS_PROXY": ""}, None),
        (
            {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"},
            ("https_proxy", "http://lower:2"),
        ),
        ({"HTTPS_PROXY": "http://upper:1", "https_proxy": ""}, None),  # set empty: no proxy
        ({"HTTPS_PROXY": " "}, ("HTTPS_PROXY", " ")),  # a value, if not a URL: start-up says so
        ({"HTTP_PROXY": "http://plain:3", "ALL_PROXY": "http://all:4"}, None),
    ],
)
def test_the_variable_used_is_urllibs(
    environ: dict[str, str], expected: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert setting(environ, "https") == expected
    # the same choice urllib makes
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    urllib_choice = urllib.request.getproxies_environment().get("https")
    assert urllib_choice == (None if expected is None else expected[1])


def test_the_scheme_picks_the_variable() -> None:
    environ = {"HTTPS_PROXY": "http://secure:1", "HTTP_PROXY": "http://plain:2"}
    assert egress_proxy("https", "res.openai.azure.com", environ) == EgressProxy(
        "secure", 1, "HTTPS_PROXY"
    )
    assert egress_proxy("wss", "res.openai.azure.com", environ) == EgressProxy(
        "secure", 1, "HTTPS_PROXY"
    )
    assert egress_proxy("http", "res.openai.azure.com", environ) == EgressProxy(
        "plain", 2, "HTTP_PROXY"
    )
    assert egress_proxy("ws", "res.openai.azure.com", environ) == EgressProxy(
        "plain", 2, "HTTP_PROXY"
    )
    assert egress_proxy("https", "res.openai.azure.com", {}) is None


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
def test_no_proxy_is_matched_per_host(no_proxy: str, host: str, direct: bool) -> None:
    for names in (("HTTPS_PROXY", "NO_PROXY"), ("https_proxy", "no_proxy")):
        environ = {names[0]: "http://proxy:3128", names[1]: no_proxy}
        assert (egress_proxy("https", host, environ) is None) is direct
    # an empty lowercase no_proxy overrides the uppercase one, as in urllib
    environ = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*", "no_proxy": ""}
    assert egress_proxy("https", "res.openai.azure.com", environ) is not None
