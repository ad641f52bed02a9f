"""Forwarding rules: where a request goes and which headers cross the proxy (pure, no I/O).

Everything here is a plain function over strings, so every rule is unit-tested without sockets
and the relay (`relay.py`) only wires them to I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from .errors import BadRequest, MethodNotImplemented, ProxyError

Headers = Sequence[tuple[str, str]]

# RFC 9110 7.6.1: hop-by-hop fields apply to one connection only and are never forwarded,
# nor is any field the Connection header names. Trailer (hop-by-hop in RFC 2616 13.5.1) and
# Proxy-* are for this hop as well; `Expect: 100-continue` is answered by the proxy itself, as
# nginx does.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's own credentials never reach Azure: an `api-key` on a keyless (Entra-only)
# resource is refused with 403 AuthenticationTypeDisabled (DESIGN.md section 5).
# Ocp-Apim-Subscription-Key is the other key header Azure AI services accept.
CLIENT_CREDENTIALS = frozenset({"authorization", "api-key", "ocp-apim-subscription-key"})
_REPLACED_BY_PROXY = frozenset({"host", "expect"})
# API Management also takes its key as `subscription-key=` in the query, as it takes the
# Ocp-Apim-Subscription-Key header.
CREDENTIAL_QUERY_PARAMETERS = frozenset({"api-key", "subscription-key"})


# TRACE echoes the request it received, the proxy's bearer token included, back to the client
# (RFC 9110 9.3.8); CONNECT would make the proxy a tunnel to anywhere.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})


def method_problem(method: str) -> ProxyError | None:
    """501 for a method the proxy never forwards (RFC 9110 9.1)."""
    if method in REFUSED_METHODS:
        return MethodNotImplemented(f"The proxy does not forward {method} requests")
    return None


def upstream_url(base_url: str, raw_target: str) -> str:
    """`base_url` + the request's path + its raw query, byte for byte, minus credentials.

    Raises BadRequest for any target that could leave the base URL: absolute-form and
    authority-form targets (RFC 9112 3.2.2-3.2.3), `//host` paths, dot segments in any
    encoding (RFC 3986 5.2.4), backslashes, and encoded slashes or NULs that a server
    further along could decode into one of those.
    """
    if not raw_target.startswith("/"):
        raise BadRequest("Only origin-form request targets (/path?query) are accepted")
    if "#" in raw_target:
        raise BadRequest("A request target must not carry a fragment")
    path, question, query = raw_target.partition("?")
    if path.startswith("//"):
        raise BadRequest("A request path must not start with //")
    if "%" in path or "\\" in path or "/." in path or "\x00" in path:  # else nothing to find
        for segment in path.split("/"):
            decoded = unquote(unquote(segment))  # twice: a double-encoded %252e is a dot too
            if decoded in (".", "..") or any(c in decoded for c in "/\\\x00"):
                raise BadRequest(f"Request path segment {segment!r} is not allowed")
    suffix = ""
    if question:
        kept = strip_credential_parameters(query)
        # "?" stays when the client sent it, unless removing a credential emptied the query.
        suffix = f"?{kept}" if kept or not query else ""
    return f"{base_url}{path}{suffix}"


def strip_credential_parameters(query: str) -> str:
    """Remove `api-key=` and `subscription-key=` parameters (any letter case), keep every
    other byte of the query."""
    if "%" not in query:
        # Nothing percent-encoded: a parameter can only be a credential if the query says
        # so. The usual query (api-version=...) is kept without splitting it; this runs twice
        # per request (the upstream URL, the access line).
        lowered = query.lower()
        for name in CREDENTIAL_QUERY_PARAMETERS:  # a loop: any() over a generator makes one
            if name in lowered:
                break
        else:
            return query
    kept = [
        part
        for part in query.split("&")
        if unquote(part.partition("=")[0]).lower() not in CREDENTIAL_QUERY_PARAMETERS
    ]
    return "&".join(kept)


def redact_target(raw_target: str) -> str:
    """The request target as it may appear in a log line: credential parameters removed.

    A target that is not origin-form is never logged: an app whose HTTP_PROXY points here
    would send whole foreign URLs, with their userinfo and signed query strings.
    """
    if not raw_target.startswith("/"):
        return "<non-origin-form target>"
    path, question, query = raw_target.partition("?")
    if not question:
        return path
    query = strip_credential_parameters(query)
    return f"{path}?{query}" if query else path


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The options named by every Connection header, lower case (RFC 9110 7.6.1)."""
    tokens: set[str] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == "connection":  # runs for every request
            tokens.update(connection_options(value))
    return tokens


def connection_options(value: str) -> list[str]:
    """The options one Connection header's value names, lower case."""
    return [token.strip().lower() for token in value.split(",")]


def upstream_request_headers(headers: Headers, *, token: str, host: str) -> list[tuple[str, str]]:
    """Client headers as sent upstream: credentials, hop-by-hop and `Host` replaced.

    Every other header keeps its order, letter case and repetitions.
    """
    forwarded = [("Host", host)]
    forwarded += _kept(headers, _DROPPED_UPSTREAM, _DROPPED_UPSTREAM_LENGTHS)
    forwarded.append(("Authorization", f"Bearer {token}"))
    return forwarded


def upstream_request_id(headers: Headers) -> str | None:
    """The upstream's id of a request, for its access line: API Management's first."""
    found: str | None = None
    for name, value in headers:
        if len(name) in (12, 15):  # runs for every response: skip the lower() of others
            lowered = name.lower()
            if lowered == "apim-request-id" and value:
                return value
            if lowered == "x-request-id" and not found:
                found = value
    return found


def client_response_headers(headers: Headers) -> list[tuple[str, str]]:
    """Upstream response headers as sent to the client: only hop-by-hop ones dropped."""
    return _kept(headers, HOP_BY_HOP, _HOP_BY_HOP_LENGTHS)


def _kept(
    headers: Headers, always: frozenset[str], lengths: frozenset[int]
) -> list[tuple[str, str]]:
    """`headers` without those named in `always` or by the Connection header, in order.

    One pass: a name whose length no dropped name has is kept without being lower-cased
    (most are; this runs for every request and every response). `always` holds
    "connection", so each Connection header is looked at; only one naming a field outside
    `always` (not nginx's `keep-alive`) costs a second pass."""
    kept: list[tuple[str, str]] = []
    named: set[str] | None = None
    for name, value in headers:
        if len(name) in lengths:
            lowered = name.lower()
            if lowered in always:
                if lowered == "connection":
                    for option in connection_options(value):
                        if option and option not in always:
                            if named is None:
                                named = set()
                            named.add(option)
                continue
        kept.append((name, value))
    if named:
        return [(name, value) for name, value in kept if name.lower() not in named]
    return kept


_DROPPED_UPSTREAM = HOP_BY_HOP | CLIENT_CREDENTIALS | _REPLACED_BY_PROXY
_DROPPED_UPSTREAM_LENGTHS = frozenset(len(name) for name in _DROPPED_UPSTREAM)
_HOP_BY_HOP_LENGTHS = frozenset(len(name) for name in HOP_BY_HOP)
