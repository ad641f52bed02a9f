"""The proxy as its users run it: a process with an environment, signals and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from aiohttp import web

from aoai_auth_proxy.testing import AzureOpenAIStandIn, ClientCertificate, EntraStandIn
from tests.conftest import CLIENT_ID, TENANT_ID, wait_ready

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
ECHO_BODY = {"messages": [{"role": "user", "content": "hi"}]}


class ProxyProcess:
    """`python -m aoai_auth_proxy` on an ephemeral port, its stderr collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.url = ""
        self._listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if match := re.search(r"listening on (http://[\d.]+:\d+)", line):
                self.url = match.group(1)
                self._listening.set()

    async def listening(self, timeout: float = 20.0) -> str:
        async with asyncio.timeout(timeout):
            waiter = asyncio.ensure_future(self._listening.wait())
            done, _ = await asyncio.wait(
                {waiter, asyncio.ensure_future(self.process.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter not in done:
                waiter.cancel()
                raise AssertionError("proxy exited:\n" + "\n".join(self.lines))
        return self.url

    async def wait(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


async def spawn(env: dict[str, str], *args: str) -> ProxyProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aoai_auth_proxy",
        *args,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE if args else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return ProxyProcess(process)


async def run_check(env: dict[str, str]) -> tuple[int | None, str, str]:
    """`aoai-auth-proxy check` as an operator runs it: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aoai_auth_proxy",
        "check",
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, out.decode(), err.decode()


async def _upload_hash(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    async for chunk in request.content.iter_any():
        digest.update(chunk)
    return web.json_response({"sha256": digest.hexdigest()})


@pytest.fixture
def upstream_routes() -> list[tuple[str, str, Any]]:
    return [("POST", "/upload", _upload_hash)]


@pytest_asyncio.fixture
async def running(proxy_env: dict[str, str]) -> AsyncIterator[ProxyProcess]:
    proxy = await spawn({**proxy_env, "PROXY_LOG_LEVEL": "DEBUG"})
    await proxy.listening()
    await wait_ready(proxy.url)
    yield proxy
    if proxy.process.returncode is None:
        proxy.process.kill()
        await proxy.wait()


async def test_bad_configuration_exits_2_naming_every_problem(tmp_path: Path) -> None:
    proxy = await spawn({"PORT": "99999", "AZURE_CERTIFICATE_PATH": str(tmp_path / "x.pem")})
    assert await proxy.wait() == 2
    assert "Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID" in proxy.log
    assert "API_BASE_URL" in proxy.log
    assert "PORT='99999' is invalid" in proxy.log
    assert f"certificate file {tmp_path / 'x.pem'} does not exist" in proxy.log


async def test_check_prints_identity_and_expiry_but_never_the_token(
    proxy_env: dict[str, str], client_certificate: ClientCertificate, entra: EntraStandIn
) -> None:
    code, out, err = await run_check(proxy_env)
    text = out
    assert code == 0, err
    for expected in (CLIENT_ID, TENANT_ID, "https://cognitiveservices.azure.com/.default"):
        assert expected in text
    assert client_certificate.thumbprint_sha1 in text
    assert "token:        OK, expires" in text
    assert entra.token_requests == 1
    assert "eyJ" not in text + err  # no JWT of any kind


async def test_check_names_the_credential_but_never_the_secret(
    proxy_env: dict[str, str], entra: EntraStandIn
) -> None:
    entra.register_secret(TENANT_ID, CLIENT_ID, "do-not-print-me")
    env = {**proxy_env, "AZURE_CERTIFICATE_PATH": "", "AZURE_CLIENT_SECRET": "do-not-print-me"}
    code, out, err = await run_check(env)
    assert code == 0, err
    assert "credential:   secret" in out
    assert "do-not-print-me" not in out + err


async def test_check_fails_with_the_entra_error(
    proxy_env: dict[str, str], entra: EntraStandIn
) -> None:
    env = {**proxy_env, "AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555"}
    code, _, err = await run_check(env)
    assert code == 1
    assert "AADSTS700016" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stream_longer_than_the_grace_period_is_cut_and_exit_is_0_in_time(
    proxy_env: dict[str, str], aoai: AzureOpenAIStandIn, signum: signal.Signals
) -> None:
    proxy = await spawn({**proxy_env, "PROXY_SHUTDOWN_TIMEOUT": "1"})
    url = await proxy.listening()
    await wait_ready(url)
    aoai.stream_delay = 0.5  # 8 words: a 4 s stream
    words = " ".join(f"w{i}" for i in range(8))
    body = {"messages": [{"role": "user", "content": words}], "stream": True}
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=body) as response,
    ):
        await response.content.readany()
        proxy.process.send_signal(signum)
        signalled = loop.time()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()  # cut, and visibly so
    assert await proxy.wait() == 0
    assert loop.time() - signalled < 3.0  # the 1 s grace plus clean-up, not twice the grace
    assert "cancelled 1 request(s) still running" in proxy.log
    assert "status=499" in proxy.log  # the cut request still has its access line


async def test_shutdown_delay_keeps_serving_with_readiness_503(
    proxy_env: dict[str, str],
) -> None:
    proxy = await spawn({**proxy_env, "PROXY_SHUTDOWN_DELAY": "1"})
    url = await proxy.listening()
    await wait_ready(url)
    proxy.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "/health") as health:
            assert health.status == 503
            assert (await health.json())["status"] == "draining"
        async with client.get(url + "/health/live") as live:
            assert live.status == 200
    assert await proxy.wait() == 0


async def test_an_address_that_cannot_be_bound_exits_1_with_a_message(
    proxy_env: dict[str, str],
) -> None:
    proxy = await spawn({**proxy_env, "HOST": "no-such-host.invalid"})
    assert await proxy.wait() == 1
    assert "cannot listen on no-such-host.invalid port 0" in proxy.log
    assert "Traceback" not in proxy.log


async def test_sigterm_lets_a_stream_finish_then_exits_0(
    running: ProxyProcess, aoai: AzureOpenAIStandIn
) -> None:
    aoai.stream_delay = 0.2
    body = {
        "messages": [{"role": "user", "content": "one two three four five six"}],
        "stream": True,
    }
    received = b""
    async with (
        aiohttp.ClientSession() as client,
        client.post(running.url + CHAT, json=body) as response,
    ):
        first = await response.content.readany()
        running.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # no new connections once draining began
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as other:
                await other.get(running.url + "/health")
        received = first + await response.content.read()
    assert received.endswith(b"data: [DONE]\n\n")
    assert await running.wait() == 0
    assert "shutting down" in running.log


async def test_upload_of_20_mb_streams_with_flat_memory(running: ProxyProcess) -> None:
    assert running.process.pid is not None
    process = psutil.Process(running.process.pid)
    before = process.memory_info().rss
    peak = before
    chunk = os.urandom(256 * 1024)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(80):  # 20 MiB
            digest.update(chunk)
            yield chunk

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.post(running.url + "/upload", data=body()) as response,
        ):
            result = await response.json()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert result == {"sha256": digest.hexdigest()}
    growth = peak - before
    assert growth < 8 * 1024 * 1024, f"proxy RSS grew {growth / 2**20:.1f} MiB for a 20 MiB body"


async def test_start_up_log_names_the_credential_and_warns_of_a_certificate_expiring_soon(
    running: ProxyProcess, client_certificate: ClientCertificate
) -> None:
    # the test certificate lives 7 days: inside the 30-day warning window
    assert f"signing in to Entra ID as client {CLIENT_ID} in tenant {TENANT_ID}" in running.log
    assert client_certificate.thumbprint_sha1 in running.log
    assert "it expires soon" in running.log


async def test_logs_carry_no_token_key_or_certificate(
    running: ProxyProcess, aoai: AzureOpenAIStandIn, client_certificate: ClientCertificate
) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(
                running.url + CHAT + "&api-key=query-secret",
                json={"messages": [{"role": "user", "content": "x"}]},
                headers={"api-key": "header-secret"},
            ) as response:
                assert response.status == 200
    running.process.send_signal(signal.SIGTERM)
    assert await running.wait() == 0
    token = (aoai.requests[-1].header("authorization") or "").removeprefix("Bearer ")
    assert token
    log = running.log
    assert "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 " in log
    for secret in ("query-secret", "header-secret", token, token[:40], "PRIVATE KEY"):
        assert secret not in log
    key_line = client_certificate.pem.decode().splitlines()[-2]
    assert key_line not in log


async def test_overload_is_refused_quickly_within_a_memory_bound_while_streams_flow(
    proxy_env: dict[str, str], aoai: AzureOpenAIStandIn
) -> None:
    proxy = await spawn({**proxy_env, "PROXY_MAX_CONNECTIONS": "40"})
    url = await proxy.listening()
    await wait_ready(url)
    assert proxy.process.pid is not None
    rss = psutil.Process(proxy.process.pid).memory_info
    aoai.stream_delay = 0.1
    words = " ".join(f"w{i}" for i in range(30))  # 3-second streams
    body = {"messages": [{"role": "user", "content": words}], "stream": True}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:
        streams = [await client.post(url + CHAT, json=body) for _ in range(40)]
        for stream in streams:
            await stream.content.readany()
        before = rss().rss
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = 0
        for _ in range(8):  # 400 connections over the limit, in bounded batches
            answers = await asyncio.gather(
                *(client.get(url + "/health") for _ in range(50)), return_exceptions=True
            )
            for answer in answers:
                if isinstance(answer, aiohttp.ClientResponse):
                    refused += answer.status == 503
                    answer.release()
        flood_seconds = loop.time() - started
        growth = rss().rss - before
        for stream in streams:
            assert (await stream.content.read()).endswith(b"data: [DONE]\n\n")
            stream.release()
    assert refused >= 390  # a clear 503 each (a few may race a stream's end)
    assert flood_seconds < 10
    assert growth < 16 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB under overload"
    proxy.process.send_signal(signal.SIGTERM)
    assert await proxy.wait() == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_workers_share_the_port_and_stop_together(
    proxy_env: dict[str, str], aoai: AzureOpenAIStandIn
) -> None:
    port = _free_port()
    proxy = await spawn({**proxy_env, "PORT": str(port), "PROXY_WORKERS": "2"})
    url = await proxy.listening()
    await wait_ready(url)
    supervisor = psutil.Process(proxy.process.pid)
    workers = supervisor.children()
    assert len(workers) == 2
    # 24 connections held open at once: SO_REUSEPORT spreads them over both listeners (all
    # on one worker has a chance of 2**-23).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=24)) as client:

        async def call() -> int:
            async with client.post(url + CHAT, json=ECHO_BODY) as response:
                await response.read()
                return response.status

        assert await asyncio.gather(*(call() for _ in range(24))) == [200] * 24
        served = [
            sum(c.laddr.port == port for c in w.net_connections() if c.status == "ESTABLISHED")
            for w in workers
        ]
        assert all(count > 0 for count in served), served
    proxy.process.send_signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert sum("listening on" in line for line in proxy.lines) == 2


async def test_a_worker_that_cannot_start_stops_the_supervisor_with_1(
    proxy_env: dict[str, str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # no SO_REUSEPORT: the workers cannot share this port
        port = taken.getsockname()[1]
        proxy = await spawn({**proxy_env, "PORT": str(port), "PROXY_WORKERS": "2"})
        assert await proxy.wait() == 1
    assert any("cannot listen" in line for line in proxy.lines), proxy.log
