"""Egress: HTTPS_PROXY/NO_PROXY for the token endpoint and the upstream, through a real CONNECT
proxy (proxy.py, from PyPI) and a scripted one on loopback; private CAs; TLS verification never
silently off.

The token path and the upstream share one client (`upstream.PooledUpstream`; azure-identity
uses it through `tokenhttp`), which reads the variables as urllib does (`egress`:
`getproxies()`/`proxy_bypass()`, lowercase winning) when it opens a connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from aoai_auth_proxy.config import load_settings
from aoai_auth_proxy.errors import ConfigError
from aoai_auth_proxy.testing import AzureOpenAIStandIn, CertificateAuthority, EntraStandIn
from tests.conftest import ProxyFactory, RunningProxy, start_proxy, wait_ready
from tests.integration.test_relay_edges import RawUpstream, parse_fields, reply, sized, values

EMBEDDINGS = "/openai/deployments/e/embeddings?api-version=2024-10-21"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
# proxy.py's own access log, one line per client connection when it closes:
# "127.0.0.1:50412 - CONNECT 127.0.0.1:39629 - 5218 bytes - 41.27ms"
CONNECT_LINE = re.compile(r" - CONNECT (\S+) - ")
ACCEPT_LINE = re.compile(r"Work#\d+ accepted from ")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - another process's log file is the only signal
            await asyncio.sleep(0.02)


@dataclass
class ConnectProxy:
    """proxy.py in a subprocess, observed through its debug log. It runs one acceptor process,
    which logs "accepted from" for each connection in order, and a CONNECT line when it ends."""

    port: int
    log: Path
    closed: int = field(default_factory=closed_port)  # where sync() probes CONNECT to
    probes: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tunnels(self) -> set[str]:
        """host:port of every CONNECT tunnel proxy.py has closed, probes excluded."""
        return set(CONNECT_LINE.findall(self.log.read_text())) - {f"127.0.0.1:{self.closed}"}

    def accepted(self) -> int:
        """Client connections proxy.py accepted, probes excluded."""
        return len(ACCEPT_LINE.findall(self.log.read_text())) - self.probes

    async def sync(self) -> None:
        """CONNECT to a closed port and wait until proxy.py has logged it: by then it has
        logged accepting every connection that came before."""
        self.probes += 1
        target = f"127.0.0.1:{self.closed}"
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await asyncio.wait_for(reader.read(), 5)  # proxy.py answers 502 and closes
        writer.close()
        await writer.wait_closed()
        await eventually(lambda: self.log.read_text().count(f" CONNECT {target} ") == self.probes)


@pytest_asyncio.fixture
async def connect_proxy(tmp_path: Path) -> AsyncIterator[ConnectProxy]:
    """proxy.py listening on 127.0.0.1 and answering; stopped after the test, even on failure."""
    home = tmp_path / "proxy.py"  # proxy.py creates ~/.proxy: keep it out of the real home
    home.mkdir()
    port_file, log, output = home / "port", home / "proxy.log", home / "output.txt"
    with output.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0"),
            *("--port-file", str(port_file), "--log-file", str(log), "--log-level", "d"),
            *("--num-workers", "1", "--num-acceptors", "1"),
            env={**os.environ, "HOME": str(home)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its acceptor process shares its process group
        )
    try:
        # It writes the port file once it listens; a first probe proves that it answers.
        await eventually(lambda: port_file.exists() or process.returncode is not None, 10)
        if process.returncode is not None:
            raise RuntimeError(f"proxy.py exited: {output.read_text()}")
        await eventually(lambda: port_file.read_text().strip().isdigit())
        running = ConnectProxy(int(port_file.read_text()), log)
        await running.sync()
        yield running
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is None:
                os.killpg(process.pid, sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 5)


def use_proxy(
    monkeypatch: pytest.MonkeyPatch, url: str, no_proxy: str = "", variable: str = "HTTPS_PROXY"
) -> None:
    """Set HTTPS_PROXY (or `variable`), and NO_PROXY, and nothing else: urllib lets a lowercase
    variable win over its uppercase twin, so the lowercase ones are removed."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv(variable, url)
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", no_proxy)


async def post(proxy: RunningProxy) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,  # trust_env=False: the test itself goes direct
        session.post(proxy.url + EMBEDDINGS, json={"input": "x"}) as r,
    ):
        body: dict[str, Any] = await r.json()
        return r.status, body


@pytest.mark.parametrize(
    ("no_proxy", "upstream_host", "tunnelled"),
    [
        ("", "127.0.0.1", {"entra", "aoai"}),
        ("127.0.0.1", "127.0.0.1", set()),
        ("localhost", "localhost", {"entra"}),  # NO_PROXY is per host: only the upstream direct
    ],
    ids=["both-tunnelled", "no-proxy-bypasses-both", "no-proxy-bypasses-upstream"],
)
async def test_token_fetch_and_upstream_honour_https_proxy_and_no_proxy(
    no_proxy: str,
    upstream_host: str,
    tunnelled: set[str],
    proxy_env: dict[str, str],
    connect_proxy: ConnectProxy,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_proxy(monkeypatch, connect_proxy.url, no_proxy)
    base_url = f"https://{upstream_host}:{aoai.port}"
    running = await start_proxy(load_settings({**proxy_env, "API_BASE_URL": base_url}))
    try:
        await wait_ready(running.url)
        status, _ = await post(running)
        assert status == 200
    finally:
        await running.stop()  # closes the pooled upstream tunnel: proxy.py logs it then

    targets = {"entra": f"127.0.0.1:{entra.port}", "aoai": f"{upstream_host}:{aoai.port}"}
    expected = {targets[name] for name in tunnelled}
    await eventually(lambda: expected <= connect_proxy.tunnels())
    await connect_proxy.sync()
    assert connect_proxy.tunnels() == expected
    assert connect_proxy.accepted() == len(expected)  # one connection per tunnel, no others


@pytest.mark.parametrize(
    ("token_timeout", "says"),
    [
        ("2", "Entra ID did not answer within 2 s"),  # cut short before azure-core gives up
        (
            "8",
            "cannot reach Entra ID at https://127.0.0.1:{entra}: Cannot connect to the egress "
            "proxy 127.0.0.1:{dead} (HTTPS_PROXY) for token endpoint https://127.0.0.1:{entra}",
        ),  # names the proxy it could not reach, and the variable that chose it
    ],
    ids=["token-timeout", "azure-core-gives-up"],
)
async def test_unreachable_https_proxy_answers_503_json_without_hanging(
    token_timeout: str,
    says: str,
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead = closed_port()
    use_proxy(monkeypatch, f"http://127.0.0.1:{dead}")
    # The token is fetched first and cannot get out; azure-core retries a refused connection
    # for about 5 s (backoff 0.8 s, 3 retries) before it raises.
    proxy = await make_proxy(ready=False, PROXY_TOKEN_TIMEOUT=token_timeout)
    async with asyncio.timeout(float(token_timeout) + 2):
        status, body = await post(proxy)
    assert status == 503
    assert body["error"]["type"] == "proxy_error"
    assert body["error"]["code"] == "no_valid_token"
    assert says.format(entra=entra.port, dead=dead) in body["error"]["message"]
    assert aoai.requests == []


async def test_unreachable_https_proxy_for_the_upstream_only_answers_502_json(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = closed_port()
    use_proxy(monkeypatch, f"http://127.0.0.1:{dead}", no_proxy="127.0.0.1")  # Entra direct
    proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
    async with asyncio.timeout(5):
        status, body = await post(proxy)
    assert status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    # says that the egress proxy, not the upstream, is what cannot be reached
    assert body["error"]["message"].startswith(
        f"Cannot connect to the egress proxy 127.0.0.1:{dead} (HTTPS_PROXY) for upstream "
        "https://localhost:"
    )
    assert aoai.requests == []


# What ScriptedProxy answers to CONNECT, but "tunnel" and "silent".
ANSWERS = {
    "refuse": b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n',
    "garbage": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "stray": b"HTTP/1.1 200 Connection established\r\n\r\n\x00",
    "stray-after-length": b"HTTP/1.1 200 Connection established\r\nContent-Length: 0\r\n\r\n\x16",
    "upgrade": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    "close": b"HTTP/1.1 200 Connection established\r\n\r\n",  # then closes
}
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ScriptedProxy:
    """An egress proxy on loopback that records each request head it gets and answers as
    `answer` says: "tunnel" (200, then a byte pipe to the CONNECT target), "interim-tunnel"
    (the same after a 100), "silent" (nothing), or one of ANSWERS, then waits for the client
    to close ("close" closes at once)."""

    def __init__(self, answer: str = "tunnel") -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.answer in ("tunnel", "interim-tunnel"):
                host, _, port = head.split(b" ")[1].decode().rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                if self.answer == "interim-tunnel":
                    writer.write(INTERIM)
                writer.write(ESTABLISHED)
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
                return
            writer.write(ANSWERS.get(self.answer, b""))
            if self.answer != "close":
                await reader.read()  # until the proxy gives up
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def values_of(head: bytes, name: bytes) -> list[bytes]:
    return values(parse_fields(head), name)


async def test_a_tunnel_carries_the_proxy_credentials_on_connect_only(
    make_proxy: ProxyFactory,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedProxy() as egress:
        # user "svc@corp", password "p:ss w0rd", percent-encoded in the URL (RFC 3986 3.2.1)
        use_proxy(monkeypatch, egress.url("svc%40corp:p%3Ass%20w0rd@"), no_proxy="127.0.0.1")
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        for _ in range(2):
            status, _ = await post(proxy)
            assert status == 200
    [head] = egress.heads  # one tunnel, kept alive for both requests
    assert head.startswith(f"CONNECT localhost:{aoai.port} HTTP/1.1\r\n".encode())
    assert values_of(head, b"host") == [f"localhost:{aoai.port}".encode()]
    credentials = base64.b64encode(b"svc@corp:p:ss w0rd")
    assert values_of(head, b"proxy-authorization") == [b"Basic " + credentials]
    assert len(aoai.requests) == 2
    for request in aoai.requests:  # inside the tunnel, the origin never sees them
        assert "proxy-authorization" not in {name.lower() for name, _ in request.headers}
    assert "w0rd" not in caplog.text


@pytest.mark.parametrize("userinfo", ["", "svc:s3cret@"], ids=["no-credentials", "credentials"])
async def test_the_token_fetch_tunnels_with_the_url_credentials_only_never_netrc(
    userinfo: str,
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # aiohttp's trust_env (the token path's client before) added ~/.netrc's login for a host
    # whose URL had none: on this test it sent Entra a Basic Authorization it refused
    # (AADSTS900144), credentials the operator never gave the proxy.
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc))
    async with ScriptedProxy() as egress:
        # Entra (127.0.0.1) through the proxy, the upstream (localhost) direct.
        use_proxy(monkeypatch, egress.url(userinfo), no_proxy="localhost")
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        status, _ = await post(proxy)
        assert status == 200
    [head] = egress.heads
    assert head.startswith(f"CONNECT 127.0.0.1:{entra.port} HTTP/1.1\r\n".encode())
    expected = [b"Basic " + base64.b64encode(b"svc:s3cret")] if userinfo else []
    assert values_of(head, b"proxy-authorization") == expected
    assert entra.token_requests == 1


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        (
            "refuse",
            502,
            "did not open a tunnel to upstream https://localhost:{port}: it answered 407 Proxy "
            "Authentication Required; give its credentials in the proxy URL",
        ),
        ("garbage", 502, "did not open a tunnel to upstream https://localhost:{port}: invalid"),
        ("stray", 502, "it sent bytes after opening the tunnel"),
        ("stray-after-length", 502, "it sent bytes after opening the tunnel"),
        ("upgrade", 502, "it answered 101 Switching Protocols"),
        ("close", 502, "broke the tunnel to upstream https://localhost:{port}: "),
        ("silent", 504, "Cannot connect to upstream https://localhost:{port} through the egress"),
    ],
)
async def test_a_proxy_that_does_not_open_the_tunnel_is_a_json_error_naming_it(
    answer: str,
    status: int,
    says: str,
    make_proxy: ProxyFactory,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedProxy(answer) as egress:
        use_proxy(monkeypatch, egress.url("svc:secret-pw@"), no_proxy="127.0.0.1")
        proxy = await make_proxy(
            API_BASE_URL=f"https://localhost:{aoai.port}", PROXY_CONNECT_TIMEOUT="1"
        )
        async with asyncio.timeout(5):
            got, body = await post(proxy)
    assert got == status
    assert body["error"]["code"] == (
        "upstream_timeout" if status == 504 else "upstream_unreachable"
    )
    message = body["error"]["message"]
    assert says.format(port=aoai.port) in message
    assert f"egress proxy 127.0.0.1:{egress.port} (HTTPS_PROXY)" in message
    assert "secret-pw" not in message + caplog.text
    assert not message.endswith(": ")  # a cause is given
    assert "Fatal error" not in caplog.text  # nothing escaped to the event loop
    assert aoai.requests == []


async def test_an_interim_answer_before_the_tunnel_opens_is_skipped(
    make_proxy: ProxyFactory, aoai: AzureOpenAIStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ScriptedProxy("interim-tunnel") as egress:
        use_proxy(monkeypatch, egress.url(), no_proxy="127.0.0.1")
        proxy = await make_proxy(API_BASE_URL=f"https://localhost:{aoai.port}")
        status, _ = await post(proxy)
    assert status == 200
    assert len(egress.heads) == 1


async def test_an_http_upstream_is_asked_for_in_absolute_form_through_http_proxy(
    make_proxy: ProxyFactory, entra: EntraStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recording upstream plays the proxy: what it reads is what the proxy would.
    recorder = RawUpstream(entra)
    recorder.respond = reply(sized(b"{}", b"Content-Type: application/json\r\n"))
    port = (await recorder.start()).rpartition(":")[2]
    try:
        use_proxy(monkeypatch, f"http://svc:pw@127.0.0.1:{port}", variable="HTTP_PROXY")
        # never resolved: the proxy is asked for it
        proxy = await make_proxy(API_BASE_URL="http://aoai.example.invalid:8080")
        for _ in range(2):
            status, _ = await post(proxy)
            assert status == 200
    finally:
        await recorder.close()
    assert recorder.connections == 1  # kept alive
    for request in recorder.requests:
        line = request.head.split(b"\r\n")[0]
        assert line == f"POST http://aoai.example.invalid:8080{EMBEDDINGS} HTTP/1.1".encode()
        assert values_of(request.head, b"host") == [b"aoai.example.invalid:8080"]
        assert values_of(request.head, b"proxy-authorization") == [
            b"Basic " + base64.b64encode(b"svc:pw")
        ]


async def test_an_http_proxys_407_is_a_502_not_the_clients_to_answer(
    make_proxy: ProxyFactory, entra: EntraStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RawUpstream(entra)  # plays the HTTP proxy
    recorder.respond = reply(ANSWERS["refuse"])
    port = (await recorder.start()).rpartition(":")[2]
    try:
        use_proxy(monkeypatch, f"http://svc:pw@127.0.0.1:{port}", variable="HTTP_PROXY")
        proxy = await make_proxy(API_BASE_URL="http://aoai.example.invalid:8080")
        status, body = await post(proxy)
    finally:
        await recorder.close()
    assert status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert (
        f"the egress proxy 127.0.0.1:{port} (HTTP_PROXY) answered 407 Proxy Authentication "
        "Required; give its credentials in the proxy URL" in body["error"]["message"]
    )


@pytest_asyncio.fixture
async def private_upstream(
    entra: EntraStandIn, tmp_path: Path
) -> AsyncIterator[tuple[AzureOpenAIStandIn, Path]]:
    """An Azure OpenAI stand-in whose certificate comes from a CA other than Entra's (the one
    SSL_CERT_FILE trusts in proxy_env), and that CA's file."""
    other_ca = CertificateAuthority.create("other CA")
    async with AzureOpenAIStandIn(entra, other_ca) as stand_in:
        yield stand_in, other_ca.write_ca_file(tmp_path / "other-ca.pem")


async def test_upstream_ca_file_trusts_a_private_upstream_ca(
    make_proxy: ProxyFactory, private_upstream: tuple[AzureOpenAIStandIn, Path]
) -> None:
    upstream, ca_file = private_upstream
    proxy = await make_proxy(API_BASE_URL=upstream.base_url, PROXY_UPSTREAM_CA_FILE=str(ca_file))
    status, _ = await post(proxy)
    assert status == 200
    assert len(upstream.requests) == 1


async def test_an_untrusted_upstream_certificate_is_a_502_never_an_unverified_connection(
    make_proxy: ProxyFactory, private_upstream: tuple[AzureOpenAIStandIn, Path]
) -> None:
    upstream, _ = private_upstream
    proxy = await make_proxy(API_BASE_URL=upstream.base_url)
    status, body = await post(proxy)
    assert status == 502
    assert body["error"]["type"] == "proxy_error"
    assert body["error"]["code"] == "upstream_unreachable"
    message = body["error"]["message"]
    assert message.startswith(f"TLS with upstream {upstream.base_url} failed: ")
    assert "certificate verify failed" in message
    assert "PROXY_UPSTREAM_CA_FILE" in message  # says how to fix it
    assert upstream.requests == []


async def test_upstream_ca_file_is_not_trusted_for_the_token_endpoint(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn, ca_file: Path
) -> None:
    # The same CA as Entra's, but given for the upstream only: the token fetch must refuse it
    # (azure-core retries for about 5 s before it says why).
    proxy = await make_proxy(
        ready=False, SSL_CERT_FILE="", PROXY_UPSTREAM_CA_FILE=str(ca_file), PROXY_TOKEN_TIMEOUT="8"
    )
    async with asyncio.timeout(10):
        status, body = await post(proxy)
    assert status == 503
    assert body["error"]["code"] == "no_valid_token"
    message = body["error"]["message"]
    assert f"cannot reach Entra ID at {entra.authority}: " in message
    assert "certificate verify failed" in message
    assert aoai.requests == []


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"not a certificate\n", "no certificate or crl found"), (None, "No such file")],
    ids=["not-pem", "missing"],
)
def test_bad_upstream_ca_file_is_a_configuration_error(
    content: bytes | None, why: str, proxy_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "upstream-ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_settings({**proxy_env, "PROXY_UPSTREAM_CA_FILE": str(path)})
    [problem] = raised.value.problems
    assert problem.startswith(f"PROXY_UPSTREAM_CA_FILE={str(path)!r} is not a readable PEM CA ")
    assert why in problem
