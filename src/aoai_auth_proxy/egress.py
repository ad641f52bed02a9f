"""Which egress proxy (HTTPS_PROXY/HTTP_PROXY, less NO_PROXY) carries a connection to an origin.

The variables are read as urllib reads them, and as aiohttp's `trust_env` (the token path)
reads them: the lowercase variable wins over its uppercase twin, NO_PROXY is matched per host
(`urllib.request.proxy_bypass`), and ALL_PROXY is not used. A proxy is reached over plain
HTTP (`http://[user:password@]host[:port]`): an HTTPS origin goes through it in a CONNECT
tunnel (RFC 9110 9.3.6) with TLS to the origin inside, end to end; an HTTP origin is asked for
in absolute form (RFC 9112 3.2.2). Credentials in the URL become `Proxy-Authorization: Basic`
(RFC 9110 11.7.1) and never appear in a message: a proxy is named by host and port only.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

# The variables naming the proxy for each origin scheme; the lowercase one wins (urllib's rule).
VARIABLES = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}


@dataclass(frozen=True)
class EgressProxy:
    """An HTTP proxy on the way to an origin."""

    host: str
    port: int
    variable: str  # which variable named it, for messages: "HTTPS_PROXY"
    authorization: str | None = field(default=None, repr=False)  # a secret

    @property
    def address(self) -> str:
        """host:port, as messages name the proxy (never with its credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_proxy_url(url: str, variable: str) -> EgressProxy:
    """The proxy a variable names; ValueError, saying what to write, if it names none."""
    parts = urllib.parse.urlsplit(url.strip())
    shown = f"{variable}={_without_credentials(url.strip())!r}"
    if parts.scheme.lower() == "https":
        # aiohttp (the token path) cannot speak TLS to a proxy either; it would go direct.
        raise ValueError(
            f"{shown}: a proxy reached over TLS is not supported; use http://host:port "
            "(the tunnel to Azure is still TLS end to end)"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() != "http" or not parts.hostname or port == -1:
        raise ValueError(f"{shown} is not a proxy URL: use http://[user:password@]host[:port]")
    authorization = None
    if parts.username is not None:
        # RFC 7617: user-id ":" password, percent-decoded from the URL's userinfo.
        user, password = parts.username, parts.password or ""
        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return EgressProxy(parts.hostname, port or 80, variable.upper(), authorization)


def _without_credentials(url: str) -> str:
    """The URL as a message may show it: userinfo (a password) replaced."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "<credentials>@" + authority.rpartition("@")[2]
    return f"{scheme}{separator}{authority}{slash}{path}"


def egress_proxy(scheme: str, host: str) -> EgressProxy | None:
    """The proxy that carries a connection to `scheme://host` (from this process's
    environment, read now, as aiohttp reads it per request), or None to go direct."""
    url = urllib.request.getproxies_environment().get(scheme)  # lowercase already won
    if not url or scheme not in VARIABLES:
        return None
    # On Linux proxy_bypass is proxy_bypass_environment: NO_PROXY, as aiohttp reads it.
    if urllib.request.proxy_bypass(host):
        return None
    return parse_proxy_url(url, VARIABLES[scheme][-1])
