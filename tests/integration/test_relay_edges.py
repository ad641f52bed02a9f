"""HTTP/1.1 edge cases of the relay, seen only on the wire: what the client and upstream get."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import pytest_asyncio

from aoai_auth_proxy.testing import EntraStandIn, InvalidAccessToken
from tests.conftest import CLIENT_ID, ProxyFactory, eventually
from tests.integration.test_faults import reset

# Tested elsewhere, not repeated here: gzip bytes and Content-Length (test_forwarding), a single
# upstream header line over 8 KiB and a reset before the headers on a plain POST (test_faults),
# an oversized request target (test_hostile), a 4-byte Expect: 100-continue (test_framing).

AUDIENCE = "https://cognitiveservices.azure.com"
TIMEOUT = 5.0  # bound on every single wait of a test
HOST = b"Host: localhost\r\n"
KIB = 1024
MIB = 1024 * KIB
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")

Fields = list[tuple[bytes, bytes]]


def parse_fields(head: bytes) -> Fields:
    """The header fields of a message head (start line and final blank line excluded), as
    sent: name spelling, order and value bytes kept."""
    fields = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
    return fields


def values(fields: Fields, name: bytes) -> list[bytes]:
    return [value for n, value in fields if n.lower() == name.lower()]


# -- a raw upstream: full requests recorded, answers scripted per request --------------------------


@dataclass
class Received:
    """One request as the upstream read it."""

    connection: int  # which accepted TCP connection it came on, 0 for the first
    head: bytes  # request line and header fields, blank line included
    body: bytes  # decoded from whichever framing the proxy chose
    raw: bytes  # every byte of the request as it came, framing included
    client_id: str  # `appid` of the bearer token, "" when it did not verify

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    @property
    def fields(self) -> Fields:
        return parse_fields(self.head)

    def header_values(self, name: bytes) -> list[bytes]:
        return values(self.fields, name)


# Writes the answer to one request; returns whether the connection stays open.
Respond = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def reply(raw: bytes, *, close: bool = False) -> Respond:
    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return not close

    return respond


def sized(body: bytes, *extra: bytes, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\n"
        + b"".join(extra)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


async def echo(received: Received, writer: asyncio.StreamWriter) -> bool:
    """200 with the request line and the decoded request body as its body."""
    writer.write(sized(received.head.split(b"\r\n", 1)[0] + b"\n" + received.body))
    await writer.drain()
    return True


def reply_at(target: bytes, raw: bytes) -> Respond:
    """`raw` to requests for `target` (the connection kept), `echo` to every other."""
    answer = reply(raw)

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        if received.target == target:
            return await answer(received, writer)
        return await echo(received, writer)

    return respond


class RawUpstream:
    """A raw HTTP/1.1 upstream on loopback: reads every request in full (head and body, either
    framing), verifies its bearer token with the Entra stand-in, records it in `requests`, then
    lets `respond` write the answer. `connections` counts accepted TCP connections."""

    def __init__(self, entra: EntraStandIn, *, tls: ssl.SSLContext | None = None) -> None:
        self.entra = entra
        self.tls = tls  # serve HTTPS with this context
        self.respond: Respond = reply(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.requests: list[Received] = []
        self.connections = 0
        self.problems: list[str] = []  # requests it could not read: framing the proxy broke
        self.send_buffer: int | None = None  # SO_SNDBUF for accepted sockets
        self.receive_delay = 0.0  # seconds between reading a request's head and its body
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # the proxy, stopped later, still holds pooled connections; since Python 3.12
            # wait_closed() waits for every connection to end
            for writer in list(self._writers):
                writer.transport.abort()
            async with asyncio.timeout(TIMEOUT):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self._writers.add(writer)
        if self.send_buffer is not None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break  # closed between requests
                if self.receive_delay:
                    await asyncio.sleep(self.receive_delay)
                body, raw_body = await _read_body(reader, parse_fields(head))
                received = Received(number, head, body, head + raw_body, self._verify(head))
                self.requests.append(received)
                if received.client_id != CLIENT_ID:
                    writer.write(sized(b"bad token", status=b"401 Unauthorized"))
                    break
                if not await self.respond(received, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (AssertionError, ValueError, asyncio.LimitOverrunError) as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            writer.close()

    def _verify(self, head: bytes) -> str:
        for value in values(parse_fields(head), b"authorization"):
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                try:
                    claims = self.entra.verify_access_token(token.decode(), audience=AUDIENCE)
                except InvalidAccessToken:
                    return ""
                return str(claims["appid"])
        return ""


async def _read_body(reader: asyncio.StreamReader, fields: Fields) -> tuple[bytes, bytes]:
    """(decoded body, raw body bytes) of a request; refuses framing that is ambiguous."""
    encodings = values(fields, b"transfer-encoding")
    lengths = values(fields, b"content-length")
    assert not (encodings and lengths), "the proxy sent both Content-Length and chunked"
    if encodings:
        assert encodings == [b"chunked"], encodings
        body, raw = bytearray(), bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    raw += trailer
                raw += trailer
                return bytes(body), bytes(raw)
            data = await reader.readexactly(size + 2)
            raw += data
            body += data[:-2]
    if lengths:
        assert len(lengths) == 1, lengths
        data = await reader.readexactly(int(lengths[0]))
        return data, data
    return b"", b""


@pytest_asyncio.fixture
async def upstream(entra: EntraStandIn) -> AsyncIterator[RawUpstream]:
    raw = RawUpstream(entra)
    yield raw
    await raw.close()
    assert raw.problems == []
    assert all(r.client_id == CLIENT_ID for r in raw.requests), "a request without a valid token"


async def proxied(make_proxy: ProxyFactory, upstream: RawUpstream, **env: str) -> str:
    base = await upstream.start()
    return (await make_proxy(API_BASE_URL=base, **env)).url


# -- a raw client: one connection, responses read with whatever framing the proxy chose ------------


@dataclass
class Response:
    head: bytes  # status line and header fields as received, blank line included
    body: bytes  # decoded
    framing: str  # "length", "chunked", "close" or "none"
    trailers: bytes = b""

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    @property
    def fields(self) -> Fields:
        return parse_fields(self.head)

    def header_values(self, name: bytes) -> list[bytes]:
        return values(self.fields, name)

    def json(self) -> object:
        return json.loads(self.body)


class Body:
    """The body of one response, decoded as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, head: bytes, *, method: bytes) -> None:
        self._reader = reader
        status = int(head.split(b" ", 2)[1])
        fields = parse_fields(head)
        lengths = values(fields, b"content-length")
        encodings = b",".join(values(fields, b"transfer-encoding")).lower()
        self._left = 0  # of the whole body ("length") or of the current chunk ("chunked")
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            self.framing = "none"
        elif encodings:
            assert not lengths, "a response with both Content-Length and Transfer-Encoding"
            assert encodings.replace(b" ", b"").split(b",")[-1] == b"chunked", encodings
            self.framing = "chunked"
        elif lengths:
            assert len(set(lengths)) == 1, lengths
            self.framing = "length"
            self._left = int(lengths[0])
        else:
            self.framing = "close"
        self.done = self.framing == "none" or (self.framing == "length" and self._left == 0)
        self.trailers = b""

    async def read_some(self) -> bytes:
        """The next decoded bytes; b"" once the body has ended (then `done` is set)."""
        if self.done:
            return b""
        async with asyncio.timeout(TIMEOUT):
            if self.framing == "length":
                return await self._read_sized()
            if self.framing == "chunked":
                return await self._read_chunked()
            data = await self._reader.read(64 * KIB)
            self.done = not data
            return data

    async def _read_sized(self) -> bytes:
        data = await self._reader.read(min(self._left, 64 * KIB))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(data)
        self.done = self._left == 0
        return data

    async def _read_chunked(self) -> bytes:
        if self._left == 0:
            line = await self._reader.readuntil(b"\r\n")
            size = line[:-2].split(b";", 1)[0]
            assert _CHUNK_SIZE.fullmatch(size), f"bad chunk size line {line!r}"
            self._left = int(size, 16)
            if self._left == 0:
                while (trailer := await self._reader.readuntil(b"\r\n")) != b"\r\n":
                    self.trailers += trailer
                self.done = True
                return b""
        data = await self._reader.read(min(self._left, 64 * KIB))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(data)
        if self._left == 0:
            assert await self._reader.readexactly(2) == b"\r\n", "chunk not followed by CRLF"
        return data

    async def read_exactly(self, size: int) -> bytes:
        """Exactly `size` more decoded bytes (the body must not end before)."""
        data = b""
        while len(data) < size:
            piece = await self.read_some()
            assert piece, f"the body ended after {len(data)} of {size} bytes"
            data += piece
        return data

    async def read_all(self) -> bytes:
        data = bytearray()
        while not self.done:
            data += await self.read_some()
        return bytes(data)


class Client:
    """One raw TCP connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, *, receive_buffer: int | None = None) -> Client:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        async with asyncio.timeout(TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            # a large limit: oversized heads must reach the assertions, not trip the reader
            reader, writer = await asyncio.open_connection(sock=sock, limit=MIB)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def read_head(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def read_response(self, *, method: bytes = b"GET") -> Response:
        head = await self.read_head()
        body = Body(self.reader, head, method=method)
        data = await body.read_all()
        return Response(head, data, body.framing, body.trailers)

    async def request(self, raw: bytes, *, method: bytes = b"GET") -> Response:
        await self.send(raw)
        return await self.read_response(method=method)

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.writer.wait_closed()
        except (ConnectionError, TimeoutError):
            pass


async def exchange(url: str, raw: bytes, *, method: bytes = b"GET") -> Response:
    """One request on a new connection."""
    client = await Client.connect(url)
    try:
        return await client.request(raw, method=method)
    finally:
        await client.close()


def get(path: bytes = b"/x", *headers: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"".join(headers) + b"\r\n"


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\n"
        + HOST
        + b"".join(headers)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


# -- chunked response framing and timing -----------------------------------------------------------

CHUNKS = [b"a", b"bcd", bytes(range(256)) * 256, b"hello"]  # 1 B, 3 B, 64 KiB, then 5 B
WIRE_CHUNKS = [
    b"1\r\na\r\n",
    b"3\r\nbcd\r\n",
    b"10000\r\n" + CHUNKS[2] + b"\r\n",
    b"5;ext=1\r\nhello\r\n",  # a chunk extension, which the proxy must not pass on as data
]


async def test_chunks_of_odd_sizes_reach_the_client_each_before_the_next_is_sent(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    released = [asyncio.Event() for _ in WIRE_CHUNKS]

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for wire, release in zip(WIRE_CHUNKS, released, strict=True):
            writer.write(wire)
            await writer.drain()
            await asyncio.wait_for(release.wait(), TIMEOUT)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    upstream.respond = respond
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        await client.send(get())
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 200")
        body = Body(client.reader, head, method=b"GET")
        for n, (chunk, release) in enumerate(zip(CHUNKS, released, strict=True)):
            try:
                received = await body.read_exactly(len(chunk))
            except TimeoutError:
                pytest.fail(f"chunk {n} ({len(chunk)} bytes) was held back by the proxy")
            assert received == chunk, f"chunk {n}"
            release.set()
        assert await body.read_all() == b""
    finally:
        await client.close()


# -- trailers --------------------------------------------------------------------------------------


async def test_response_trailers_do_not_become_headers_and_the_body_is_intact(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = reply_at(
        b"/trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
    )
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        response = await client.request(get(b"/trailers"))
        # the response ended where the upstream's did: the connection serves the next one
        after = await client.request(get(b"/after"))
    finally:
        await client.close()
    assert response.status == 200
    assert response.body == b"hello world"
    names = [name.lower() for name, _ in response.fields]
    assert b"x-checksum" not in names
    assert b"x-other" not in names
    assert after.status == 200
    assert after.body == b"GET /after HTTP/1.1\n"


# -- repeated headers and letter case --------------------------------------------------------------


async def test_repeated_response_headers_keep_order_values_and_letter_case(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = reply(
        sized(b"ok", b"X-A: 1\r\n", b"x-MiXeD-Case: m\r\n", b"x-a: 2\r\n", b"X-A: 3\r\n")
    )
    response = await exchange(await proxied(make_proxy, upstream), get())
    assert response.status == 200
    kept = [(n, v) for n, v in response.fields if n.lower() in (b"x-a", b"x-mixed-case")]
    assert kept == [(b"X-A", b"1"), (b"x-MiXeD-Case", b"m"), (b"x-a", b"2"), (b"X-A", b"3")]
    assert response.body == b"ok"


# -- nothing added ---------------------------------------------------------------------------------


async def test_the_proxy_adds_no_header_the_upstream_did_not_send(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = reply(sized(b"ok", b"X-Only: 1\r\n"))
    response = await exchange(await proxied(make_proxy, upstream), get())
    assert response.status == 200
    assert response.body == b"ok"
    names = {name.lower() for name, _ in response.fields}
    # framing and connection management belong to this hop; anything else was invented
    added = names - {b"x-only", b"content-length", b"transfer-encoding", b"connection"}
    added -= {b"keep-alive"}
    assert added == set(), f"the proxy added {sorted(added)} to {response.head!r}"


async def test_a_304_keeps_its_content_length_and_has_no_body(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = reply_at(
        b"/cached", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n'
    )
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        response = await client.request(get(b"/cached", b'If-None-Match: "v1"\r\n'))
        after = await client.request(get(b"/after"))  # no body bytes were left in between
    finally:
        await client.close()
    assert response.status == 304
    assert response.header_values(b"etag") == [b'"v1"']
    assert response.header_values(b"content-length") == [b"10"], response.head
    assert after.body == b"GET /after HTTP/1.1\n"


# -- HEAD ------------------------------------------------------------------------------------------


async def test_head_keeps_content_length_sends_no_body_and_the_connection_serves_a_get(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        length = b"Content-Length: 1234\r\nContent-Type: application/octet-stream\r\n\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\n" + length)
        if received.method != b"HEAD":
            writer.write(b"x" * 1234)
        await writer.drain()
        return True

    upstream.respond = respond
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        head = await client.request(b"HEAD /sized HTTP/1.1\r\n" + HOST + b"\r\n", method=b"HEAD")
        # a body sent after the HEAD answer would be read here as the next status line
        following = await client.request(get(b"/sized"))
    finally:
        await client.close()
    assert head.status == 200
    assert head.header_values(b"content-length") == [b"1234"]
    assert following.status == 200
    assert following.header_values(b"content-length") == [b"1234"]
    assert following.body == b"x" * 1234
    assert [r.method for r in upstream.requests] == [b"HEAD", b"GET"]


# -- pipelining ------------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = echo
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        await client.send(get(b"/one") + post(b"/two", b"second body") + get(b"/three"))
        responses = [await client.read_response() for _ in range(3)]
    finally:
        await client.close()
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.body for r in responses] == [
        b"GET /one HTTP/1.1\n",
        b"POST /two HTTP/1.1\nsecond body",
        b"GET /three HTTP/1.1\n",
    ]
    seen = sorted((r.method, r.target, r.body) for r in upstream.requests)
    assert seen == sorted(
        [(b"GET", b"/one", b""), (b"POST", b"/two", b"second body"), (b"GET", b"/three", b"")]
    )


# -- request bodies --------------------------------------------------------------------------------

BIG_CHUNK = bytes(range(256)) * 40  # 10 KiB


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        pytest.param(
            b"POST /up HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"1\r\na\r\n3;ext=1\r\nbcd\r\n2800\r\n"
            + BIG_CHUNK
            + b"\r\n0\r\n\r\n",
            b"abcd" + BIG_CHUNK,
            id="chunked",
        ),
        pytest.param(post(b"/up", b""), b"", id="content-length-0"),
        pytest.param(b"POST /up HTTP/1.1\r\n" + HOST + b"\r\n", b"", id="no-body"),
    ],
)
async def test_request_bodies_reach_the_upstream_byte_for_byte(
    make_proxy: ProxyFactory, upstream: RawUpstream, raw: bytes, body: bytes
) -> None:
    upstream.respond = echo
    response = await exchange(await proxied(make_proxy, upstream), raw)
    assert response.status == 200
    assert response.body == b"POST /up HTTP/1.1\n" + body
    (seen,) = upstream.requests
    assert seen.body == body


async def test_concurrent_bodies_both_ways_stay_apart_and_intact(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    # Under uvloop every client connection reads into one shared buffer, and every upstream
    # connection into another (readbuffer.py): reads of eight connections interleave there.
    upstream.respond = echo
    url = await proxied(make_proxy, upstream)
    bodies = [hashlib.sha512(b"%d" % n).digest() * (MIB // 64 + 7 * n) for n in range(8)]

    async def round_trip(n: int) -> Response:
        path = b"/up/%d" % n
        client = await Client.connect(url)
        try:
            # sent in slices, so reads of all the connections alternate in the proxy
            head, body = post(path, bodies[n]).split(b"\r\n\r\n", 1)
            await client.send(head + b"\r\n\r\n")
            for start in range(0, len(body), 100 * KIB):
                await client.send(body[start : start + 100 * KIB])
                await asyncio.sleep(0)
            return await client.read_response()
        finally:
            await client.close()

    async with asyncio.timeout(TIMEOUT * 4):
        responses = await asyncio.gather(*(round_trip(n) for n in range(8)))
    for n, response in enumerate(responses):
        assert response.status == 200
        assert response.body == b"POST /up/%d HTTP/1.1\n" % n + bodies[n]
    assert sorted(seen.body for seen in upstream.requests) == sorted(bodies)


# -- Expect: 100-continue with a large body --------------------------------------------------------


async def test_expect_100_continue_with_a_1_mib_body_arrives_intact_without_expect(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    body = hashlib.sha256(b"expect").digest() * (MIB // 32)
    upstream.respond = reply(sized(b"ok"))
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        await client.send(
            b"POST /big HTTP/1.1\r\n"
            + HOST
            + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        interim = await client.read_head()
        assert interim.startswith(b"HTTP/1.1 100")
        await client.send(body)
        response = await client.read_response()
    finally:
        await client.close()
    assert response.status == 200
    assert response.body == b"ok"
    (seen,) = upstream.requests
    assert len(seen.body) == len(body)
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(body).digest()
    assert seen.header_values(b"expect") == []


# -- close-delimited upstream response -------------------------------------------------------------


async def test_a_close_delimited_answer_reaches_a_keep_alive_client_correctly_framed(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        if received.target == b"/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            for part in (b"until ", b"the ", b"end"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.02)
            return False  # the body ends when the connection does
        return await echo(received, writer)

    upstream.respond = respond
    url = await proxied(make_proxy, upstream)
    # framing "close" only completes if the proxy closes; "chunked"/"length" complete in-band
    response = await exchange(url, get(b"/until-close"))
    assert response.status == 200
    assert response.body == b"until the end"
    assert response.framing in ("chunked", "close", "length")
    again = await exchange(url, get(b"/next"))
    assert again.status == 200
    assert again.body == b"GET /next HTTP/1.1\n"


async def test_a_close_delimited_answer_on_a_pooled_connection_ends_with_the_close(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    # The first request opens the upstream connection; the second finds it idle in the pool
    # and goes the express way, where the body's end is the upstream's EOF, not an error.
    until_close = reply(b"HTTP/1.1 404 Not Found\r\nX-A: b\r\n\r\nbye", close=True)

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        if received.target == b"/until-close":
            return await until_close(received, writer)
        return await echo(received, writer)

    upstream.respond = respond
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        first = await client.request(get(b"/first"))
        answer = await client.request(get(b"/until-close"))
        after = await client.request(get(b"/after"))
    finally:
        await client.close()
    assert first.status == 200
    assert (answer.status, answer.body, answer.framing) == (404, b"bye", "chunked")
    assert after.body == b"GET /after HTTP/1.1\n"
    assert [r.connection for r in upstream.requests] == [0, 0, 1]


EARLY_ANSWER = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize("then", ["half-closes", "stops-reading"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_answer_before_the_body_is_read_reaches_the_client_at_once(
    make_proxy: ProxyFactory, then: str, framing: str
) -> None:
    # An upstream may answer (413, 401) before it reads the body, then close or stop
    # reading (RFC 9112 9.3). The answer goes to the client as it is, the rest of the body
    # is not sent on, and the client's connection closes after it.
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(EARLY_ANSWER)
        await writer.drain()
        if then == "stops-reading":
            await release.wait()
        else:  # half-close and discard what still comes, so that its close sends no reset
            writer.write_eof()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(1):
                    while await reader.read(64 * KIB):
                        pass
        writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it fills at once
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = await asyncio.start_server(serve, sock=sock)
    url = (await make_proxy(API_BASE_URL=f"http://127.0.0.1:{sock.getsockname()[1]}")).url
    size = 32 * MIB
    if framing == "length":
        head = b"POST /up HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % size
    else:
        head = b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    block = b"x" * (64 * KIB)
    piece = b"10000\r\n" + block + b"\r\n" if framing == "chunked" else block
    client = await Client.connect(url)

    async def send_body() -> None:  # until the proxy stops reading it
        client.writer.write(head)
        for _ in range(size // len(block)):
            client.writer.write(piece)
            await client.writer.drain()

    sending = asyncio.create_task(send_body())
    try:
        answer = await client.read_response(method=b"POST")
        assert answer.status == 413
        assert answer.body == b"{}"
        assert answer.header_values(b"connection") == [b"close"]
        assert not sending.done() or sending.exception() is not None, "the whole body was read"
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        client.writer.transport.abort()
        release.set()
        server.close()
        for writer in writers:
            writer.transport.abort()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_closed()


async def request_by(way: str, client: Client, raw: bytes) -> Response:
    """The answer to `raw` relayed the express way (an upstream connection is idle in the pool:
    a first request opened it) or the task way (the proxy's first request, on a new one)."""
    if way == "express":
        assert (await client.request(get(b"/first"))).status == 200
    return await client.request(raw)


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        pytest.param(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc", 204, b"", id="204"
        ),
        pytest.param(sized(b"abc") + b"JUNK", 200, b"abc", id="sized"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nJUNK",
            200,
            b"abc",
            id="chunked",
        ),
    ],
)
@pytest.mark.parametrize("way", ["task", "express"])
async def test_bytes_after_a_whole_answer_do_not_spoil_it_and_the_connection_is_not_reused(
    make_proxy: ProxyFactory, upstream: RawUpstream, raw: bytes, status: int, body: bytes, way: str
) -> None:
    upstream.respond = reply_at(b"/junk", raw)
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        answer = await request_by(way, client, get(b"/junk"))
        after = await client.request(get(b"/after"))
    finally:
        await client.close()
    assert (answer.status, answer.body) == (status, body)
    assert after.body == b"GET /after HTTP/1.1\n"
    assert upstream.requests[-1].connection != upstream.requests[-2].connection


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, gzip", b"deflate"])
@pytest.mark.parametrize("way", ["task", "express"])
async def test_a_response_transfer_coding_other_than_chunked_is_a_502_json(
    make_proxy: ProxyFactory, upstream: RawUpstream, coding: bytes, way: str
) -> None:
    # Relayed under a plain chunked framing, its bytes would reach the client undecoded.
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    upstream.respond = reply_at(b"/coded", raw)
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        answer = await request_by(way, client, get(b"/coded"))
    finally:
        await client.close()
    assert answer.status == 502
    assert "Transfer-Encoding" in answer.json()["error"]["message"]  # type: ignore[index]


async def test_an_early_2xx_answer_keeps_the_body_flow_controlled(make_proxy: ProxyFactory) -> None:
    # An upstream may answer 200 at once and read the body afterwards (full duplex). The
    # proxy goes on sending it, at the pace the upstream reads: the client is held back,
    # not buffered in the proxy's memory.
    release, drained = asyncio.Event(), asyncio.Event()
    received = 0
    size = 32 * MIB

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # the proxy fills the socket's buffers and waits to send
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await release.wait()
        while received < size and (data := await reader.read(MIB)):
            received += len(data)
        drained.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = (await make_proxy(API_BASE_URL=f"http://127.0.0.1:{port}")).url
    client = await Client.connect(url)

    async def send_body() -> None:
        client.writer.write(b"POST /up HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % size)
        block = b"x" * MIB
        for _ in range(size // MIB):
            client.writer.write(block)
            await client.writer.drain()

    sending = asyncio.create_task(send_body())
    try:
        await asyncio.sleep(1.5)
        assert not sending.done(), "the proxy took the whole body while the upstream read none"
        release.set()
        async with asyncio.timeout(30):
            await sending
            answer = await client.read_response(method=b"POST")
            await drained.wait()
        assert (answer.status, answer.body) == (200, b"ok")
        assert received == size
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        await client.close()
        server.close()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_closed()


# -- backpressure from a slow client ---------------------------------------------------------------

BIG_RESPONSE = 64 * MIB
BLOCK = hashlib.sha256(b"block").digest() * 2048  # 64 KiB


@dataclass
class Progress:
    sent: int = 0  # bytes the upstream's writer accepted (drain() returned)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


async def test_a_client_that_does_not_read_stalls_the_upstream(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    progress = Progress()
    sent = hashlib.sha256()

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_RESPONSE)
        for n in range(BIG_RESPONSE // len(BLOCK)):
            block = n.to_bytes(4, "big") + BLOCK[4:]  # every block distinct
            sent.update(block)
            writer.write(block)
            await writer.drain()
            progress.sent += len(block)
        progress.finished.set()
        return True

    upstream.respond = respond
    upstream.send_buffer = 64 * KIB
    client = await Client.connect(await proxied(make_proxy, upstream), receive_buffer=64 * KIB)
    try:
        await client.send(get(b"/big"))
        await asyncio.sleep(1.0)  # the client reads nothing
        stalled_at = progress.sent
        assert 0 < stalled_at < 16 * MIB, f"the upstream wrote {stalled_at} bytes meanwhile"
        assert not progress.finished.is_set()
        digest = hashlib.sha256()
        size = 0
        async with asyncio.timeout(30):
            head = await client.read_head()
            body = Body(client.reader, head, method=b"GET")
            while not body.done:
                piece = await body.read_some()
                digest.update(piece)
                size += len(piece)
        await asyncio.wait_for(progress.finished.wait(), TIMEOUT)
    finally:
        await client.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert size == BIG_RESPONSE
    assert digest.hexdigest() == sent.hexdigest()


async def until(condition: Callable[[], bool], *, seconds: float) -> None:
    """Poll `condition` until it holds; TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the proxy's state has no event to wait on
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("way", ["task", "express"])
async def test_a_client_that_reads_nothing_for_the_header_timeout_is_cut_off(
    make_proxy: ProxyFactory, upstream: RawUpstream, way: str
) -> None:
    # nginx's send_timeout: a client that leaves its answer unread does not hold the upstream
    # request (and its buffers) for ever. The express way must not blame the upstream.
    progress = Progress()

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        if received.target != b"/big":
            return await echo(received, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_RESPONSE)
        for _ in range(BIG_RESPONSE // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
            progress.sent += len(BLOCK)
        return True

    upstream.respond = respond
    upstream.send_buffer = 64 * KIB
    url = await proxied(make_proxy, upstream, PROXY_HEADER_TIMEOUT="1", PROXY_READ_TIMEOUT="30")
    client = await Client.connect(url, receive_buffer=64 * KIB)
    try:
        if way == "express":  # a pooled upstream connection is idle: the express way takes it
            assert (await client.request(get(b"/first"))).status == 200
        await client.send(get(b"/big"))
        await until(lambda: progress.sent > 0, seconds=TIMEOUT)
        # reads nothing: within the timeout (and slack) the proxy lets the upstream go
        await until(lambda: upstream.open_connections == 0, seconds=4.0)
        assert progress.sent < BIG_RESPONSE
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionError):
                while await client.reader.read(MIB):
                    pass  # what the buffers held, then the end
    finally:
        await client.close()


STALLED_BODIES = [
    pytest.param(post(b"/up", b"0123456789")[:-9], id="kept-body"),
    pytest.param(
        b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
        id="streamed-body",
    ),
    pytest.param(
        b"POST /up HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        id="after-100-continue",
    ),
]


@pytest.mark.parametrize("raw", STALLED_BODIES)
async def test_a_request_body_that_stalls_for_the_header_timeout_is_408(
    make_proxy: ProxyFactory,
    upstream: RawUpstream,
    raw: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # nginx's client_body_timeout: a body that stops coming does not hold the connection
    # (and an upstream connection) for ever.
    upstream.respond = echo
    url = await proxied(make_proxy, upstream, PROXY_HEADER_TIMEOUT="1")
    client = await Client.connect(url)
    try:
        await client.send(raw)
        head = await client.read_head()
        if head.startswith(b"HTTP/1.1 100 "):
            head = await client.read_head()
        body = await Body(client.reader, head, method=b"POST").read_all()
        async with asyncio.timeout(TIMEOUT):
            assert await client.reader.read() == b""  # and closed
    finally:
        await client.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert upstream.requests == []  # none whole: a streamed one was cut off upstream too
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_body_the_proxy_stops_reading_for_a_slow_upstream_is_not_a_408(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    # The proxy pauses the client while the upstream is slow to take a streamed body: that
    # pause is not the client's, whatever PROXY_HEADER_TIMEOUT says.
    upstream.respond = echo
    upstream.receive_delay = 2.5  # before it reads a request's body
    url = await proxied(make_proxy, upstream, PROXY_HEADER_TIMEOUT="1")
    body = bytes(range(256)) * (32 * KIB)  # 8 MiB: far over the proxy's buffers
    pieces = [body[i : i + 64 * KIB] for i in range(0, len(body), 64 * KIB)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    head = b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    client = await Client.connect(url)
    try:
        client.writer.write(head + chunks + b"0\r\n\r\n")
        async with asyncio.timeout(TIMEOUT + 5):
            response = await client.read_response(method=b"POST")
    finally:
        await client.close()
    assert response.status == 200
    assert response.body == b"POST /up HTTP/1.1\n" + body


async def test_a_slow_but_steady_body_is_not_cut_off(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = echo
    url = await proxied(make_proxy, upstream, PROXY_HEADER_TIMEOUT="1")
    client = await Client.connect(url)
    try:
        await client.send(post(b"/up", b"abcdef")[:-6])
        for byte in b"abcdef":  # 1.5 s in all, never 1 s without a byte
            await asyncio.sleep(0.25)
            await client.send(bytes([byte]))
        response = await client.read_response(method=b"POST")
    finally:
        await client.close()
    assert response.body == b"POST /up HTTP/1.1\nabcdef"


# -- non-UTF-8 header bytes ------------------------------------------------------------------------


async def test_latin_1_bytes_in_a_response_header_reach_the_client_unchanged(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = reply(sized(b"ok", b"X-Raw: caf\xe9 \xff!\r\n"))
    response = await exchange(await proxied(make_proxy, upstream), get())
    assert response.status == 200
    assert response.header_values(b"x-raw") == [b"caf\xe9 \xff!"], response.head


async def test_latin_1_bytes_in_a_request_header_reach_the_upstream_unchanged(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = echo
    response = await exchange(
        await proxied(make_proxy, upstream), get(b"/x", b"X-Raw: caf\xe9 \xff!\r\n")
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.header_values(b"x-raw") == [b"caf\xe9 \xff!"], seen.head


# -- upstream connection reuse ---------------------------------------------------------------------


async def test_sequential_requests_reuse_pooled_upstream_connections(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    upstream.respond = echo
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        for n in range(20):
            path = b"/r%d" % n
            response = await client.request(get(path))
            assert response.body == b"GET " + path + b" HTTP/1.1\n"
    finally:
        await client.close()
    assert len(upstream.requests) == 20
    assert upstream.connections <= 2, f"{upstream.connections} upstream connections"


async def test_a_burst_leaves_at_most_256_idle_upstream_connections(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    burst = 300
    released = asyncio.Event()

    async def held(received: Received, writer: asyncio.StreamWriter) -> bool:
        await released.wait()  # all 300 are open upstream at once
        return await echo(received, writer)

    upstream.respond = held
    url = await proxied(make_proxy, upstream)
    connector = aiohttp.TCPConnector(limit=burst)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(n: int) -> int:
            async with session.get(f"{url}/burst/{n}") as response:
                await response.read()
                return response.status

        async def open_upstream() -> int:
            return upstream.open_connections

        calls = asyncio.gather(*(call(n) for n in range(burst)))
        assert await eventually(open_upstream, burst), upstream.open_connections
        released.set()
        assert await asyncio.wait_for(calls, TIMEOUT) == [200] * burst
    # like nginx's `keepalive 256`: the pool keeps 256 and closes the rest
    assert await eventually(open_upstream, 256), upstream.open_connections


# -- an upstream closing a pooled connection -------------------------------------------------------


async def _close_after_answer(received: Received, writer: asyncio.StreamWriter) -> bool:
    await echo(received, writer)
    return False  # a FIN right behind a keep-alive answer


async def _reset_when_idle(received: Received, writer: asyncio.StreamWriter) -> bool:
    await echo(received, writer)
    await asyncio.sleep(0.1)  # the proxy has read the answer and pooled the connection
    reset(writer)
    return False


async def _connection_close(received: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        sized(received.head.split(b"\r\n", 1)[0] + b"\n" + received.body, b"Connection: close\r\n")
    )
    await writer.drain()
    return False


@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(_connection_close, id="connection-close"),
        pytest.param(_close_after_answer, id="fin-after-answer"),
        pytest.param(_reset_when_idle, id="reset-when-idle"),
    ],
)
async def test_an_upstream_closing_its_connection_does_not_fail_the_next_request(
    make_proxy: ProxyFactory, upstream: RawUpstream, respond: Respond
) -> None:
    upstream.respond = respond
    client = await Client.connect(await proxied(make_proxy, upstream))
    try:
        first = await client.request(get(b"/first"))
        await asyncio.sleep(0.3)
        # a POST, which the proxy could not safely send again on a connection found dead
        second = await client.request(post(b"/second", b"payload"))
    finally:
        await client.close()
    assert first.status == 200
    assert second.status == 200
    assert second.body == b"POST /second HTTP/1.1\npayload"
    assert [(r.target, r.body) for r in upstream.requests] == [
        (b"/first", b""),
        (b"/second", b"payload"),
    ]
    assert upstream.connections == 2


# -- a reset before any response bytes -------------------------------------------------------------


async def test_a_post_reset_before_any_answer_is_a_502_json_and_never_sent_twice(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        reset(writer)  # the whole request was read: the upstream may have acted on it
        return False

    upstream.respond = respond
    body = json.dumps({"messages": [{"role": "user", "content": "once"}]}).encode()
    # the proxy's first upstream request: a fresh connection, not a stale pooled one
    response = await exchange(
        await proxied(make_proxy, upstream),
        post(b"/openai/chat", body, b"Content-Type: application/json\r\n"),
    )
    await asyncio.sleep(0.3)  # room for a late second attempt to show
    assert response.status == 502
    assert response.header_values(b"content-type")[0].startswith(b"application/json")
    error = response.json()
    assert isinstance(error, dict)
    assert error["error"]["type"] == "proxy_error"
    assert [(r.method, r.body) for r in upstream.requests] == [(b"POST", body)]
    assert upstream.connections == 1


# -- oversized upstream headers --------------------------------------------------------------------


async def test_upstream_headers_totalling_more_than_64_kib_are_a_502_json(
    make_proxy: ProxyFactory, upstream: RawUpstream
) -> None:
    # each line is well under 8 KiB and the count well under 128: only a cap on the total
    # stops the proxy from holding (and handing on) this much per response
    fields = [b"X-Big-%d: %s\r\n" % (n, b"v" * 4000) for n in range(20)]  # 80 KB
    upstream.respond = reply(sized(b"ok", *fields))
    response = await exchange(await proxied(make_proxy, upstream), get())
    assert response.status == 502, response.head[:200]
    error = response.json()
    assert isinstance(error, dict)
    assert error["error"]["type"] == "proxy_error"
