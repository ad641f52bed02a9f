"""The token path's transport (`tokenhttp.PoolTransport`) at the socket: what azure-core's
request becomes on the wire, how answers and failures come back to azure-core.

azure-identity over it, against the Entra and managed identity stand-ins, is tested by
test_credentials, test_tokens and test_egress; here are the edges those do not reach.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.rest import HttpRequest

from aoai_auth_proxy.tokenhttp import MAX_ANSWER_BYTES, PoolTransport
from aoai_auth_proxy.upstream import PooledUpstream
from tests.integration.test_egress import closed_port
from tests.integration.test_relay_edges import parse_fields, values

# Reads one request head and body (Content-Length framed) and writes the answer it is given.
Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


class TokenEndpoint:
    """A raw HTTP/1.1 server on loopback: records each request (head, body) and answers it
    with `answer`."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0  # accepted
        self.open = 0  # not yet closed by the client
        self.answer: Answer = _write(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = values(parse_fields(head), b"content-length")
                body = await reader.readexactly(int(length[0])) if length else b""
                self.requests.append((head, body))
                await self.answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def _write(raw: bytes, *, then_close: bool = False) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        if then_close:
            writer.close()

    return answer


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    server = TokenEndpoint()
    await server.start()
    yield server
    await server.close()


def transport() -> PoolTransport:
    pool = PooledUpstream(
        ssl.create_default_context(),
        connect_timeout=5,
        read_timeout=5,
        peer="token endpoint",
        ca_settings="SSL_CERT_FILE",
    )
    return PoolTransport(pool)


async def test_a_form_post_goes_out_as_azure_core_built_it(endpoint: TokenEndpoint) -> None:
    token = json.dumps({"access_token": "t", "expires_in": 3600}).encode()
    endpoint.answer = _write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"X-Ms-Request-Id: a\r\nx-ms-request-id: b\r\nContent-Length: %d\r\n\r\n%b"
        % (len(token), token)
    )
    request = HttpRequest(
        "POST",
        f"{endpoint.url}/tenant/oauth2/v2.0/token?x=1",
        data={"grant_type": "client_credentials", "scope": ["a b", "c"], "empty": ""},
        headers={"User-Agent": "azsdk-python-identity", "Host": "spoofed"},
    )
    async with transport() as pool_transport:
        response = await pool_transport.send(request)
    [(head, body)] = endpoint.requests
    assert head.startswith(b"POST /tenant/oauth2/v2.0/token?x=1 HTTP/1.1\r\n")
    fields = parse_fields(head)
    assert values(fields, b"host") == [endpoint.url.removeprefix("http://").encode()]
    assert values(fields, b"content-type") == [b"application/x-www-form-urlencoded"]
    assert values(fields, b"content-length") == [str(len(body)).encode()]
    assert values(fields, b"user-agent") == [b"azsdk-python-identity"]
    # nothing a client library adds on its own: the answer stays as the endpoint sent it
    assert values(fields, b"accept-encoding") == []
    assert values(fields, b"transfer-encoding") == []
    assert body == b"grant_type=client_credentials&scope=a+b&scope=c"  # empty fields dropped
    assert response.status_code == 200
    assert response.reason == "OK"
    assert response.json() == {"access_token": "t", "expires_in": 3600}
    assert response.content == token
    assert await response.read() == token
    assert response.encoding == "utf-8"
    assert response.headers["x-ms-request-id"] == "a, b"  # RFC 9110 5.3
    assert response.url == request.url
    response.raise_for_status()


async def test_an_error_answer_is_handed_to_azure_core_with_its_body(
    endpoint: TokenEndpoint,
) -> None:
    error = b'{"error": "invalid_client", "error_description": "AADSTS7000215: bad"}'
    endpoint.answer = _write(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(error), error)
    )
    async with transport() as pool_transport:
        response = await pool_transport.send(HttpRequest("GET", endpoint.url + "/t"))
    assert response.status_code == 401
    assert "AADSTS7000215" in response.text()
    with pytest.raises(HttpResponseError):
        response.raise_for_status()


async def test_an_answer_over_the_limit_is_a_response_error_not_kept(
    endpoint: TokenEndpoint,
) -> None:
    size = MAX_ANSWER_BYTES + 1
    endpoint.answer = _write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (size, b"x" * size)
    )
    async with transport() as pool_transport:
        with pytest.raises(ServiceResponseError, match=f"more than {MAX_ANSWER_BYTES} bytes"):
            await pool_transport.send(HttpRequest("GET", endpoint.url + "/t"))


async def test_an_answer_cut_off_is_a_response_error(endpoint: TokenEndpoint) -> None:
    endpoint.answer = _write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", then_close=True
    )
    async with transport() as pool_transport:
        with pytest.raises(
            ServiceResponseError,
            match=r"Token endpoint \S+ broke off its response: it closed the connection",
        ):
            await pool_transport.send(HttpRequest("GET", endpoint.url + "/t"))


async def test_a_refused_connection_is_a_request_error_azure_core_may_retry() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with transport() as pool_transport:
        with pytest.raises(ServiceRequestError, match=f"Cannot connect to token endpoint {url}"):
            await pool_transport.send(HttpRequest("GET", url + "/t"))


async def test_keep_alive_connections_are_reused_and_closed_with_the_transport(
    endpoint: TokenEndpoint,
) -> None:
    endpoint.answer = _write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    async with transport() as pool_transport:
        for _ in range(3):
            response = await pool_transport.send(HttpRequest("GET", endpoint.url + "/t"))
            assert response.json() == {}
        assert endpoint.connections == 1
        assert endpoint.open == 1
    async with asyncio.timeout(5):
        while endpoint.open:  # noqa: ASYNC110 - the server's read ending is the only signal
            await asyncio.sleep(0.01)
    assert len(endpoint.requests) == 3


async def test_a_credential_asking_for_tls_without_verification_is_refused(
    endpoint: TokenEndpoint,
) -> None:
    # azure-identity's Service Fabric managed identity asks for connection_verify=False.
    async with transport() as pool_transport:
        with pytest.raises(ServiceRequestError, match="without verification"):
            await pool_transport.send(
                HttpRequest("GET", endpoint.url + "/t"), connection_verify=False
            )
    assert endpoint.requests == []
