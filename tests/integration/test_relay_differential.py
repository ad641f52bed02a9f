"""Seeded random exchanges through the relay, each checked at both sockets against the contract.

The hand-picked edge cases (test_relay_edges.py, test_framing.py) pin one behaviour each; this
mixes them the way real traffic does: pipelined and sequential requests on one connection,
writes split at random bytes, both request framings, every response framing, hop-by-hop and
credential headers in any letter case, repeated and latin-1 fields, HEAD/204/304, event
streams and upstream connections that close after an answer. Each exchange is checked against
a plain statement of the contract (DESIGN.md; forwarding.py's rules, restated here without its
shortcuts), not against the relay's code, so it guards any relay that replaces today's (issue 8).

A failure names its seed, connection and case, and the exact bytes sent.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest

from aoai_auth_proxy.testing import EntraStandIn
from aoai_auth_proxy.testing.pki import CertificateAuthority
from tests.conftest import ProxyFactory
from tests.integration.test_egress import ConnectProxy, use_proxy
from tests.integration.test_egress import connect_proxy as connect_proxy  # the fixture
from tests.integration.test_relay_edges import (
    HOST,
    TIMEOUT,
    Body,
    Client,
    Fields,
    RawUpstream,
    Received,
    Respond,
    parse_fields,
    values,
)
from tests.integration.test_relay_edges import upstream as upstream  # the fixture

CONNECTIONS = 12  # per seed
MAX_REQUESTS = 5  # per connection

# RFC 9110 7.6.1, plus what forwarding.py adds for requests (credentials, Host, Expect).
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
CREDENTIALS = {b"authorization", b"api-key", b"ocp-apim-subscription-key"}
FRAMING = {b"content-length", b"transfer-encoding"}
TCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
# Header values: visible ASCII, inner spaces and tabs, and obs-text (RFC 9110 5.5).
VALUE_BYTES = bytes(range(0x21, 0x7F)) + b" \t" + bytes(range(0x80, 0x100))
PATH_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~!$&'()*+,;=:@"
METHODS = [b"GET", b"POST", b"POST", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"HEAD"]
STATUSES = [
    (200, b"OK"),
    (200, b"OK"),
    (200, b"Fine And Dandy"),  # a reason phrase of the upstream's own
    (201, b"Created"),
    (204, b"No Content"),
    (304, b"Not Modified"),
    (400, b"Bad Request"),
    (404, b"Not Found"),
    (429, b"Too Many Requests"),
    (500, b"Internal Server Error"),
]


def _lower(fields: Fields) -> list[bytes]:
    return [name.lower() for name, _ in fields]


def end_to_end(fields: Fields, dropped: set[bytes]) -> Fields:
    """`fields` without `dropped` names, those a Connection header names, and framing, in
    order and as spelled: the rule every relay must keep, stated without shortcuts."""
    named = {
        option.strip().lower()
        for value in values(fields, b"connection")
        for option in value.split(b",")
    }
    return [
        (name, value) for name, value in fields if name.lower() not in dropped | named | FRAMING
    ]


def expected_target(target: bytes) -> bytes:
    """The request target minus `api-key` and `subscription-key` query parameters (any case
    or encoding); the `?` goes only when removing them emptied the query."""
    path, question, query = target.partition(b"?")
    if not question:
        return target
    kept = [
        part
        for part in query.split(b"&")
        if unquote(part.partition(b"=")[0].decode("latin-1")).lower()
        not in ("api-key", "subscription-key")
    ]
    if query and not kept:
        return path
    return path + b"?" + b"&".join(kept)


# -- what one exchange is made of ------------------------------------------------------------------


@dataclass
class Answer:
    """What the upstream writes back for one case."""

    status: int
    reason: bytes
    fields: Fields  # everything but framing
    body: bytes  # the entity, also when HEAD/204/304 means none is sent
    framing: str  # "length", "chunked", "close" or "none"
    chunks: list[bytes] = field(default_factory=list)  # for "chunked"
    keep_open: bool = True
    early_hints: bool = False  # a 103 first, which the proxy does not relay

    def wire(self, method: bytes) -> bytes:
        head = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * self.early_hints
        head += b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)
        head += b"".join(name + b": " + value + b"\r\n" for name, value in self.fields)
        if self.framing == "length":
            head += b"Content-Length: %d\r\n" % len(self.body)
        elif self.framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
        head += b"\r\n"
        if method == b"HEAD" or self.status in (204, 304):
            return head  # RFC 9112 6.3: never a body, whatever the framing fields say
        if self.framing == "chunked":
            wire = b"".join(
                b"%X%s\r\n%s\r\n" % (len(c), b";ext=v" if len(c) % 3 == 0 else b"", c)
                for c in self.chunks
            )
            return head + wire + b"0\r\nX-Trailer: t\r\n\r\n"
        return head + self.body


@dataclass
class Case:
    """One request, what the upstream answers, and how the client sends it."""

    number: int
    method: bytes
    target: bytes
    fields: Fields  # as the client sends them, framing excluded
    body: bytes
    chunked: bool
    expect: bool
    answer: Answer
    version: bytes = b"1.1"

    def wire(self) -> bytes:
        head = b"%s %s HTTP/%s\r\n" % (self.method, self.target, self.version) + HOST
        head += b"".join(name + b": " + value + b"\r\n" for name, value in self.fields)
        if self.expect:
            head += b"Expect: 100-continue\r\n"
        if self.chunked:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            step = max(1, len(self.body) // 3)
            pieces = [self.body[i : i + step] for i in range(0, len(self.body), step)]
            return (
                head
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
                + b"0\r\nX-Request-Trailer: t\r\n\r\n"
            )
        if self.body or self.method in (b"POST", b"PUT", b"PATCH"):
            head += b"Content-Length: %d\r\n" % len(self.body)
        return head + b"\r\n" + self.body

    @property
    def closes(self) -> bool:
        """The connection ends after this answer: the client asked, or spoke HTTP/1.0."""
        asked = any(v.lower() == b"close" for v in values(self.fields, b"connection"))
        return asked or self.version == b"1.0"


class Cases:
    """Random requests and answers from one seed."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.count = 0

    def token(self, low: int = 1, high: int = 12) -> bytes:
        return "".join(self.random.choices(TCHAR, k=self.random.randint(low, high))).encode()

    def value(self) -> bytes:
        if self.random.random() < 0.7:
            return "".join(self.random.choices(TCHAR, k=self.random.randint(0, 30))).encode()
        inner = bytes(self.random.choices(VALUE_BYTES, k=self.random.randint(1, 40)))
        return inner.strip(b" \t")  # OWS around a value is not part of it (RFC 9110 5.5)

    def body(self) -> bytes:
        size = self.random.choice(
            [0, 1, self.random.randint(2, 300), self.random.randint(300, 20_000)]
        )
        if self.random.random() < 0.1:
            size = self.random.randint(20_000, 200_000)
        return self.random.randbytes(size)

    def fields(self, extra: list[tuple[bytes, bytes]]) -> Fields:
        fields = [(b"X-" + self.token(), self.value()) for _ in range(self.random.randint(0, 6))]
        if fields and self.random.random() < 0.4:  # a repeated field, spelled another way
            name, _ = self.random.choice(fields)
            fields.append((name.swapcase(), self.value()))
        fields += extra
        self.random.shuffle(fields)
        return fields

    def target(self) -> bytes:
        deployment = "".join(self.random.choices(PATH_CHARS, k=self.random.randint(1, 16)))
        if self.random.random() < 0.3:  # percent-encoded bytes that are not / \ . or NUL
            deployment += "%" + self.random.choice(["20", "41", "7E", "c3%a9", "FF", "3F"])
        path = self.random.choice(
            [
                f"/openai/deployments/{deployment}/chat/completions",
                f"/openai/deployments/{deployment}/embeddings",
                f"/v1/{deployment}",
                "/openai/models",
            ]
        )
        parts = ["api-version=2024-10-21"] if self.random.random() < 0.8 else []
        for _ in range(self.random.randint(0, 3)):
            parts.append(self.random.choice(["a=1", "b=%26x", "empty=", "flag", "c=d=e", "q=a+b"]))
        for _ in range(self.random.choice([0, 0, 1, 2])):
            parts.append(
                self.random.choice(
                    ["api-key=s3", "API-Key=s3", "api%2Dkey=s3", "api-key", "subscription-key=s3"]
                )
            )
        self.random.shuffle(parts)
        query = "&".join(parts)
        if not parts:
            return path.encode() + (b"?" if self.random.random() < 0.1 else b"")
        return f"{path}?{query}".encode()

    def request_extras(self, *, last: bool) -> list[tuple[bytes, bytes]]:
        """Fields the relay must drop: credentials and hop-by-hop ones, in any case."""
        pool = [
            (b"api-key", b"client-key-1"),
            (b"API-KEY", b"client-key-2"),
            (b"Authorization", b"Bearer client-token"),
            (b"authorization", b"Basic dXNlcjpwYXNz"),
            (b"Ocp-Apim-Subscription-Key", b"sub-key"),
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Authorization", b"Basic cHJveHk6cHc="),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Trailer", b"X-Request-Trailer"),
        ]
        chosen = self.random.sample(pool, self.random.randint(0, 4))
        if self.random.random() < 0.25:  # a field the Connection header names is hop-by-hop
            name = b"X-Hop-" + self.token(1, 4)
            chosen += [(b"Connection", name.swapcase()), (name, b"per-hop")]
        if last and self.random.random() < 0.3:
            chosen.append((b"Connection", self.random.choice([b"close", b"Close"])))
        return chosen

    def answer(self, method: bytes) -> Answer:
        status, reason = self.random.choice(STATUSES)
        extras = self.random.sample(
            [
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"timeout=5, max=100"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Trailer", b"X-Trailer"),
                (b"Upgrade", b"h2c"),
                (b"Set-Cookie", b"a=1; Path=/"),
                (b"Set-Cookie", b"b=2; Path=/"),
                (b"apim-request-id", b"1b9c"),
            ],
            self.random.randint(0, 3),
        )
        if self.random.random() < 0.2:
            name = b"X-Hop-" + self.token(1, 4)
            extras += [(b"Connection", name), (name, b"per-hop")]
        body = self.body()
        if status in (204, 304):
            framing = "none"
            if status == 304 and self.random.random() < 0.5:
                framing = "length"  # the length of what a 200 would have carried
        else:
            framing = self.random.choice(["length", "length", "chunked", "close"])
        if framing != "none" and status != 304 and self.random.random() < 0.2:
            extras.append((b"Content-Type", b"text/event-stream"))
        keep_open = framing != "close"
        if keep_open and self.random.random() < 0.1:
            extras.append((b"Connection", b"close"))
            keep_open = False
        chunks: list[bytes] = []
        rest = body
        while rest:
            size = self.random.choice([1, 7, 100, 4096, 70_000])
            chunks.append(rest[:size])
            rest = rest[size:]
        fields = self.fields(extras)
        hints = self.random.random() < 0.1
        return Answer(status, reason, fields, body, framing, chunks, keep_open, hints)

    def case(self, *, last: bool) -> Case:
        self.count += 1
        method = self.random.choice(METHODS)
        body = b"" if method in (b"HEAD", b"GET") and self.random.random() < 0.8 else self.body()
        if method == b"HEAD":
            body = b""
        chunked = bool(body) and self.random.random() < 0.25
        expect = bool(body) and last and self.random.random() < 0.3
        # HTTP/1.0 (no chunked body, no 100 Continue): the last request of its connection
        version = (
            b"1.0" if last and not (chunked or expect) and self.random.random() < 0.15 else b"1.1"
        )
        fields = self.fields([*self.request_extras(last=last), (b"X-Case", b"%d" % self.count)])
        answer = self.answer(method)
        return Case(
            self.count, method, self.target(), fields, body, chunked, expect, answer, version
        )


# -- the upstream's and the client's ends ---------------------------------------------------------


def case_number(fields: Fields) -> int:
    return int(values(fields, b"x-case")[0])


def make_responder(cases: dict[int, Case], seed: int) -> Respond:
    split = random.Random(seed + 1)

    async def respond(received: Received, writer: asyncio.StreamWriter) -> bool:
        case = cases[case_number(received.fields)]
        wire = case.answer.wire(received.method)
        while wire:  # in pieces, each sent before the next is written
            size = split.choice([1, 2, 10, 200, len(wire)])
            writer.write(wire[:size])
            wire = wire[size:]
            await writer.drain()
            if split.random() < 0.3:
                await asyncio.sleep(0.001)
        return case.answer.keep_open

    return respond


@dataclass
class Answered:
    """One response as the client read it."""

    interim: list[bytes]  # 1xx heads
    head: bytes
    body: bytes
    framing: str


async def read_answer(client: Client, method: bytes) -> Answered:
    """The next response on `client`, after any interim (1xx) ones."""
    interim = []
    while True:
        head = await client.read_head()
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200:
            interim.append(head)
            continue
        break
    body = Body(client.reader, head, method=method)
    data = await body.read_all()
    return Answered(interim, head, data, body.framing)


async def send_split(client: Client, data: bytes, split: random.Random) -> None:
    while data:
        size = split.choice([1, 3, 50, 1000, len(data)])
        await client.send(data[:size])
        data = data[size:]
        if split.random() < 0.2:
            await asyncio.sleep(0.001)


# -- the checks ------------------------------------------------------------------------------------


def check_upstream_saw(case: Case, received: Received, upstream_host: bytes) -> None:
    assert received.method == case.method
    assert received.target == expected_target(case.target)
    assert received.body == case.body
    sent = [(b"Host", b"localhost"), *case.fields]
    dropped = HOP_BY_HOP | CREDENTIALS | {b"host", b"expect"}
    seen = received.fields
    assert end_to_end(seen, {b"host", b"authorization"}) == end_to_end(sent, dropped)
    assert values(seen, b"host") == [upstream_host]
    assert len(values(seen, b"authorization")) == 1  # the bearer; RawUpstream verified it
    lengths = values(seen, b"content-length")
    assert lengths in ([], [b"%d" % len(case.body)])
    if not case.body and case.method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        assert not values(seen, b"transfer-encoding")


def check_client_got(case: Case, got: Answered) -> None:
    answer = case.answer
    assert got.head.split(b"\r\n", 1)[0] == b"HTTP/1.1 %d %s" % (answer.status, answer.reason)
    # Only the proxy's own 100 Continue, only when asked for; never the upstream's 103.
    assert all(head.startswith(b"HTTP/1.1 100 ") for head in got.interim)
    assert case.expect or got.interim == []
    if case.version == b"1.0":  # RFC 9112 7.1: no chunked answer to an HTTP/1.0 request
        assert got.framing != "chunked"
    fields = parse_fields(got.head)
    # The proxy's own Connection header is about the client's connection only.
    assert set(values(fields, b"connection")) <= {b"close", b"keep-alive"}
    assert end_to_end(fields, {b"connection"}) == end_to_end(answer.fields, HOP_BY_HOP)
    assert not set(_lower(fields)) & (HOP_BY_HOP - {b"transfer-encoding", b"connection"})
    no_body = case.method == b"HEAD" or answer.status in (204, 304)
    assert got.body == (b"" if no_body else answer.body)
    if answer.framing == "length" and (case.method == b"HEAD" or not no_body):
        assert values(fields, b"content-length") == [b"%d" % len(answer.body)]
    if answer.framing == "chunked" and not no_body:
        assert got.framing in ("chunked", "close")


# -- the test --------------------------------------------------------------------------------------


def plan(seed: int) -> list[tuple[str, list[Case]]]:
    cases = Cases(seed)
    connections = []
    for _ in range(CONNECTIONS):
        mode = cases.random.choice(["sequential", "pipelined"])
        count = cases.random.randint(1, MAX_REQUESTS)
        connections.append((mode, [cases.case(last=n == count - 1) for n in range(count)]))
    return connections


@pytest.mark.parametrize(
    ("seed", "replay_max", "tls"),
    [(1, None, False), (2, None, False), (3, "1024", False), (4, "0", False), (5, None, True)],
    ids=[
        "seed1",
        "seed2",
        "seed3-bodies-over-1k-stream",
        "seed4-every-body-streams",
        "seed5-tls-upstream",
    ],
)
async def test_random_exchanges_keep_the_contract_at_both_ends(
    make_proxy: ProxyFactory,
    upstream: RawUpstream,
    ca: CertificateAuthority,
    seed: int,
    replay_max: str | None,
    tls: bool,
) -> None:
    if tls:
        upstream.tls = ca.issue_server_certificate(("127.0.0.1",)).ssl_context()
    env = {} if replay_max is None else {"PROXY_REPLAY_MAX_BYTES": replay_max}
    await exercise(make_proxy, upstream, seed, env=env)


async def test_random_exchanges_through_an_https_proxy_keep_the_contract(
    make_proxy: ProxyFactory,
    upstream: RawUpstream,
    ca: CertificateAuthority,
    connect_proxy: ConnectProxy,
    entra: EntraStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HTTPS_PROXY carries the upstream's traffic: every connection is a CONNECT tunnel.
    upstream.tls = ca.issue_server_certificate(("127.0.0.1",)).ssl_context()
    use_proxy(monkeypatch, connect_proxy.url)
    await exercise(make_proxy, upstream, 6)
    await connect_proxy.sync()
    # Every upstream connection came through proxy.py, as did each token fetch (one each).
    assert connect_proxy.accepted() == upstream.connections + entra.token_requests


async def exercise(
    make_proxy: ProxyFactory,
    upstream: RawUpstream,
    seed: int,
    *,
    env: dict[str, str] | None = None,
) -> None:
    """Run `plan(seed)` through a proxy in front of `upstream`, checking every exchange."""
    connections = plan(seed)
    by_number = {case.number: case for _, cases in connections for case in cases}
    upstream.respond = make_responder(by_number, seed)
    base = await upstream.start()
    url = (await make_proxy(API_BASE_URL=base, **(env or {}))).url
    upstream_host = base.partition("://")[2].encode()
    split = random.Random(seed + 2)
    for index, (mode, cases) in enumerate(connections):
        client = await Client.connect(url)
        client.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if mode == "pipelined":
                await send_split(client, b"".join(c.wire() for c in cases), split)
            for case in cases:
                where = f"seed {seed}, connection {index} ({mode}), case {case.number}"
                where += f": {case.wire()[:2000]!r}"
                if mode == "sequential":
                    await send_split(client, case.wire(), split)
                try:
                    got = await read_answer(client, case.method)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
                    pytest.fail(f"no complete answer ({exc!r}) for {where}")
                try:
                    check_client_got(case, got)
                except AssertionError as exc:
                    raise AssertionError(f"client side, {where}") from exc
            if cases[-1].closes:  # the proxy closes after the answer
                async with asyncio.timeout(TIMEOUT):
                    assert await client.reader.read() == b""
        finally:
            await client.close()

    received = {case_number(r.fields): r for r in upstream.requests}
    assert sorted(received) == sorted(by_number), "each request reaches the upstream once"
    for number, case in by_number.items():
        try:
            check_upstream_saw(case, received[number], upstream_host)
        except AssertionError as exc:
            raise AssertionError(
                f"upstream side, seed {seed}, case {number}: {case.wire()[:2000]!r}"
            ) from exc
