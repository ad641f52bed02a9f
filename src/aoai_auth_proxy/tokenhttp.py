"""The token path's HTTP client: azure-core's transport interface over the proxy's own pool.

azure-identity sends its requests through whichever transport the credential is given. On
`upstream.PooledUpstream`, a token fetch takes the same route the upstream's requests do: the
same egress proxy rules (`egress`: HTTPS_PROXY/HTTP_PROXY less NO_PROXY, refused URLs named
at start-up), the same TLS verification, errors worded the same way, and no second HTTP
client in the process (issue 8: aiohttp's client was the token path's only use of it).
Unlike aiohttp's `trust_env`, nothing is read from ~/.netrc: a credential for the egress
proxy comes from its URL only, as for the upstream.

What azure-core expects of a transport, and this one does: the request as given (no
redirects followed, no body re-encoded, no Accept-Encoding added, so no decompression);
`ServiceRequestError` when the request could not be sent, `ServiceResponseError` when the
answer broke off (azure-core's retry policy sends again only what it may: IMDS's GETs, never
a token POST); the answer read whole before `send` returns (a token answer is a few KB;
MAX_ANSWER_BYTES bounds a wrong one). TLS is always verified: a credential that asks for it
off (`connection_verify=False`, Service Fabric's managed identity) is refused, by name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import AsyncHttpTransport
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.core.utils import CaseInsensitiveDict

from .errors import ProxyError
from .relay import UpstreamRequest
from .upstream import PooledUpstream, split_url

# An answer from a token endpoint or IMDS is a few KB; anything past this is not one.
MAX_ANSWER_BYTES = 1024 * 1024
# Failures of ours that mean the request never reached the endpoint.
_NOT_SENT = frozenset({"connect", "tls"})


class PoolTransport(AsyncHttpTransport[HttpRequest, AsyncHttpResponse]):
    """azure-core's AsyncHttpTransport on a PooledUpstream of its own (`signin` names it
    "token endpoint" in errors); closing the transport closes the pool's connections."""

    def __init__(self, pool: PooledUpstream) -> None:
        self._pool = pool

    async def __aenter__(self) -> PoolTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self._pool.close()

    async def send(self, request: HttpRequest, **kwargs: Any) -> AsyncHttpResponse:
        """Send `request` and read its answer whole. The pool's timeouts apply
        (PROXY_CONNECT_TIMEOUT, then PROXY_TOKEN_TIMEOUT, which bounds the fetch as a whole),
        not a credential's own `connection_timeout`/`read_timeout`."""
        if kwargs.get("connection_verify") is False:
            raise ServiceRequestError(
                "the credential asked for TLS to the token endpoint without verification, "
                "which the proxy never does (a Service Fabric managed identity is not supported)"
            )
        origin, _ = split_url(request.url)
        headers = [("Host", origin.partition("://")[2])]
        headers.extend((k, v) for k, v in request.headers.items() if k.lower() != "host")
        outbound = UpstreamRequest(request.method, request.url, headers, _body(request))
        try:
            async with self._pool.open(outbound) as response:
                pieces: list[bytes] = []
                size = 0
                async for piece in response.chunks():
                    size += len(piece)
                    if size > MAX_ANSWER_BYTES:
                        raise ServiceResponseError(
                            f"{self._pool.named(origin)} answered with more than "
                            f"{MAX_ANSWER_BYTES} bytes"
                        )
                    pieces.append(piece)
                return TokenAnswer(
                    request, response.status, response.reason, response.headers, b"".join(pieces)
                )
        except ProxyError as error:
            if error.kind in _NOT_SENT:
                raise ServiceRequestError(str(error), error=error) from None
            raise ServiceResponseError(str(error), error=error) from None


def _body(request: HttpRequest) -> bytes | None:
    content = request.content
    if content is None:
        return None
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, dict):
        # A form: azure-core sets its Content-Type and leaves the encoding to the transport,
        # as aiohttp and requests do it (application/x-www-form-urlencoded, lists repeated).
        return urlencode(content, doseq=True).encode("ascii")
    raise TypeError(f"cannot send a {type(content).__name__} body to Entra ID")


class TokenAnswer(AsyncHttpResponse):
    """azure-core's AsyncHttpResponse over an answer already read whole."""

    def __init__(
        self,
        request: HttpRequest,
        status: int,
        reason: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> None:
        self._request = request
        self._status = status
        self._reason = reason
        fields = CaseInsensitiveDict()
        for name, value in headers:
            # Repeated fields combine as RFC 9110 5.3 says a recipient may.
            fields[name] = f"{fields[name]}, {value}" if name in fields else value
        self._headers = fields
        self._body = body
        self._encoding: str | None = None

    @property
    def request(self) -> HttpRequest:
        return self._request

    @property
    def status_code(self) -> int:
        return self._status

    @property
    def headers(self) -> MutableMapping[str, str]:
        return self._headers

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def content_type(self) -> str | None:
        return self._headers.get("Content-Type")

    @property
    def is_closed(self) -> bool:
        return True

    @property
    def is_stream_consumed(self) -> bool:
        return True

    @property
    def encoding(self) -> str | None:
        if self._encoding is None:
            for parameter in (self.content_type or "").split(";")[1:]:
                name, _, value = parameter.strip().partition("=")
                if name.lower() == "charset" and value:
                    self._encoding = value.strip('"')
        return self._encoding

    @encoding.setter
    def encoding(self, value: str | None) -> None:
        self._encoding = value

    @property
    def url(self) -> str:
        return self._request.url

    @property
    def content(self) -> bytes:
        return self._body

    def text(self, encoding: str | None = None) -> str:
        return self._body.decode(encoding or self.encoding or "utf-8-sig", errors="replace")

    def json(self) -> Any:
        return json.loads(self._body) if self._body else None

    def raise_for_status(self) -> None:
        if self._status >= 400:
            raise HttpResponseError(response=self)

    async def read(self) -> bytes:
        return self._body

    async def iter_raw(self, **kwargs: Any) -> AsyncIterator[bytes]:
        yield self._body

    async def iter_bytes(self, **kwargs: Any) -> AsyncIterator[bytes]:
        yield self._body

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> TokenAnswer:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"<TokenAnswer: {self._status} {self._reason}>"
