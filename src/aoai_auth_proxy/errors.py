"""The proxy's error tree: every error it answers with carries its HTTP status and code.

    ProxyError                     base; never raised itself
    ├── BadRequest          400    the request cannot be forwarded as sent (e.g. another host)
    │   ├── MisdirectedHost 400    the Host header names a host this proxy does not answer to
    │   ├── BadFraming      400    the request's framing is ambiguous (smuggling shapes)
    │   ├── UriTooLong      414    the request target is longer than the proxy accepts
    │   └── ExpectationFailed 417  an Expect other than 100-continue
    ├── HeadersTooLarge     431    the request's header section is larger than the proxy accepts
    ├── UnsupportedCoding   501    a transfer coding other than chunked
    ├── Unauthorized        401    the inbound key is missing or wrong
    ├── NotFound            404    not a path the admin port serves (it forwards nothing)
    ├── BadGateway          502    the upstream could not be reached or broke off
    ├── NoValidToken        503    no unexpired Entra token is held (message carries AADSTS...)
    ├── NotReady            503    the proxy is starting or draining
    └── GatewayTimeout      504    the upstream did not answer within the idle timeout

    ConfigError                    bad configuration; the CLI exits with status 2
    TokenAcquisitionError          one token fetch from Entra failed (wrapped by NoValidToken)

Third-party exceptions are converted into these in one place each: the upstream client's
failures in `upstream._head_error` and `_mid_body_error` (connect failures where it connects,
`PooledUpstream._connect`), azure-identity's in `signin.EntraTokenFetcher.fetch` (anything
else a fetch raises, in `credentials.RefreshingTokenSource`), so handlers see only this tree.
Clients get `error_body()`: short OpenAI-shaped JSON the SDKs surface; logs get the cause chain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

ERROR_TYPE = "proxy_error"


class ProxyError(Exception):
    """An error the proxy answers itself, in the OpenAI error shape."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "proxy_error"
    # The connection's framing cannot be trusted after this error: nothing more is read from it.
    closes_connection: ClassVar[bool] = False

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # for upstream failures: connect, tls, timeout, reset or protocol

    def error_body(self) -> bytes:
        """The OpenAI-shaped JSON the SDKs parse: {"error": {"message", "type", "code"}}."""
        body = {"error": {"message": self.message, "type": ERROR_TYPE, "code": self.code}}
        return json.dumps(body).encode()


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request_target"


class MisdirectedHost(BadRequest):
    code = "host_not_allowed"


class BadFraming(BadRequest):
    code = "ambiguous_framing"
    closes_connection = True


class UriTooLong(BadRequest):
    status = 414
    code = "request_target_too_long"
    closes_connection = True


class ExpectationFailed(BadRequest):
    status = 417
    code = "expectation_failed"


class HeadersTooLarge(ProxyError):
    status = 431
    code = "request_headers_too_large"
    closes_connection = True


class UnsupportedCoding(ProxyError):
    status = 501
    code = "unsupported_transfer_coding"
    closes_connection = True


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    closes_connection = True


class MethodNotImplemented(ProxyError):
    status = 501
    code = "method_not_supported"


class VersionNotSupported(ProxyError):
    status = 505
    code = "http_version_not_supported"
    closes_connection = True


class Unauthorized(ProxyError):
    status = 401
    code = "invalid_proxy_api_key"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class BadGateway(ProxyError):
    status = 502
    code = "upstream_unreachable"


class NoValidToken(ProxyError):
    status = 503
    code = "no_valid_token"


class NotReady(ProxyError):
    status = 503
    code = "not_ready"


class GatewayTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class ConfigError(Exception):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class TokenAcquisitionError(Exception):
    """Entra ID refused or could not be reached; the message is safe to show (no secrets)."""
