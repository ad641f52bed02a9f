"""Which egress proxy (HTTPS_PROXY/HTTP_PROXY, less NO_PROXY) carries a connection to an origin.

The variables are read by urllib's rules, for the upstream, the token endpoint (`tokenhttp`)
and WebSocket sessions alike: a lowercase variable wins over its uppercase twin, and an empty
lowercase one means no proxy; NO_PROXY is matched per host
(`urllib.request.proxy_bypass_environment`); ALL_PROXY is not used. `load_settings` checks the
very values used here, so a proxy URL that passed start-up never fails later. A proxy is
reached over plain HTTP (`http://[user:password@]host[:port]`): an HTTPS origin goes through it
in a CONNECT tunnel (RFC 9110 9.3.6) with TLS to the origin inside, end to end; an HTTP origin
is asked for in absolute form (RFC 9112 3.2.2). Credentials in the URL become
`Proxy-Authorization: Basic` (RFC 7617) and never appear in a message: a proxy is named by
host and port, a bad URL with its credentials replaced.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# The variables naming the proxy for each origin scheme (ws and wss use http's and https's),
# and the bypass list; the lowercase one wins (urllib's rule).
VARIABLES = {
    "https": ("https_proxy", "HTTPS_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY"),
    "no": ("no_proxy", "NO_PROXY"),
}
# What a proxy's 407 means for this proxy's user (said in each client's error).
REFUSED_407 = (
    "answered 407 Proxy Authentication Required; give its credentials in the proxy URL: "
    "http://user:password@host:port"
)
# NO_PROXY matching as urllib's proxy_bypass() does it on Linux (and requests, aiohttp and
# curl-alikes through it); in CPython's urllib.request since 3.0, absent from typeshed.
_proxy_bypass_environment: Callable[[str, Mapping[str, str]], bool] = (
    urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
)


@dataclass(frozen=True)
class EgressProxy:
    """An HTTP proxy on the way to an origin."""

    host: str
    port: int
    variable: str  # which variable named it, for messages: "HTTPS_PROXY"
    authorization: str | None = field(default=None, repr=False)  # a secret
    url: str = field(default="", repr=False, compare=False)  # holds the credentials

    @property
    def address(self) -> str:
        """host:port, as messages name the proxy (never with its credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def named(self) -> str:
        """How messages name it: "proxy.corp:3128 (HTTPS_PROXY)"."""
        return f"{self.address} ({self.variable})"


def setting(environ: Mapping[str, str], kind: str) -> tuple[str, str] | None:
    """(variable, value) that urllib's getproxies_environment() would use for `kind` ("https",
    "http" or "no"), or None: the lowercase variable when it is set at all (empty: none)."""
    lower, upper = VARIABLES[kind]
    if lower in environ:
        return (lower, environ[lower]) if environ[lower] else None
    return (upper, environ[upper]) if environ.get(upper) else None


def parse_proxy_url(url: str, variable: str) -> EgressProxy:
    """The proxy a variable names; ValueError, saying what to write, if it names none."""
    shown = f"{variable}={_without_credentials(url)!r}"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a bad port, or brackets that are not an IPv6 address
        parts, port = urllib.parse.urlsplit(""), -1
    if parts.scheme.lower() == "https":
        # TLS to the proxy would wrap the tunnel's TLS in a second layer: not supported.
        raise ValueError(
            f"{shown}: a proxy reached over TLS is not supported; use http://host:port "
            "(the tunnel to Azure is still TLS end to end)"
        )
    if (
        parts.scheme.lower() != "http"
        or not parts.hostname
        or port == -1
        or parts.path not in ("", "/")  # also where a "/" in an unencoded password lands
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{shown} is not a proxy URL: use http://[user:password@]host[:port], with any "
            "reserved character of the user or password percent-encoded"
        )
    authorization, userinfo = None, ""
    if parts.username is not None:
        userinfo = f"{parts.username}:{parts.password or ''}@"  # still percent-encoded
        user = urllib.parse.unquote_to_bytes(parts.username)
        password = urllib.parse.unquote_to_bytes(parts.password or "")
        if not (user + password).isascii():
            # RFC 7617 leaves the charset to the proxy: aiohttp would send latin-1, a browser
            # UTF-8. Refused rather than sent one way a proxy may not expect.
            raise ValueError(f"{shown}: the proxy user and password must be ASCII")
        if b":" in user:
            raise ValueError(f"{shown}: the proxy user cannot contain ':' (RFC 7617 2)")
        authorization = "Basic " + base64.b64encode(user + b":" + password).decode("ascii")
    proxy = EgressProxy(parts.hostname, port or 80, variable.upper(), authorization)
    # For other clients (websockets): normalised, with the empty password a user-only URL
    # implies (websockets refuses a user without one).
    return dataclasses.replace(proxy, url=f"http://{userinfo}{proxy.address}")


def _without_credentials(url: str) -> str:
    """The URL as a message may show it: everything between the scheme and the last "@"
    (where a password ends, whatever it holds) replaced."""
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    at = url.rfind("@")
    return url if at < start else f"{url[:start]}<credentials>{url[at:]}"


def egress_proxy(
    scheme: str, host: str, environ: Mapping[str, str] | None = None
) -> EgressProxy | None:
    """The proxy that carries a connection to `scheme://host` ("ws"/"wss" as "http"/"https"),
    from `environ` (this process's environment, read now: per connection, as urllib reads it
    per request), or None to go direct."""
    if environ is None:
        environ = os.environ
    kind = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    found = setting(environ, kind) if kind in ("https", "http") else None
    if found is None:
        return None
    bypass = setting(environ, "no")
    if bypass is not None and _proxy_bypass_environment(host, {"no": bypass[1]}):
        return None
    return parse_proxy_url(found[1], found[0])
