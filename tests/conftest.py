"""Fixtures shared by every test layer: a throw-away CA, the Entra and Azure OpenAI stand-ins,
and a proxy running exactly as `aoai-auth-proxy serve` runs it, on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio
import uvloop

import aoai_auth_proxy
from aoai_auth_proxy.app import ProxyApp
from aoai_auth_proxy.config import Settings, load_settings
from aoai_auth_proxy.server import ProxyServer
from aoai_auth_proxy.testing import (
    AzureOpenAIStandIn,
    CertificateAuthority,
    ClientCertificate,
    EntraStandIn,
)


def _compiled_modules() -> dict[str, Path]:
    """The package's modules built by mypyc in place (`make native`), with their extension."""
    package = Path(aoai_auth_proxy.__file__).parent
    return {path.name.partition(".")[0]: path for path in sorted(package.glob("*.so"))}


def pytest_report_header() -> str:
    compiled = _compiled_modules()
    if not compiled:
        return "aoai_auth_proxy: pure Python (make pure)"
    return f"aoai_auth_proxy: compiled by mypyc: {', '.join(compiled)}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # An extension older than its source would test yesterday's code (Python imports the
    # extension first): refuse to run rather than pass or fail for the wrong reason.
    for name, extension in _compiled_modules().items():
        source = extension.with_name(f"{name}.py")
        if source.stat().st_mtime > extension.stat().st_mtime:
            raise pytest.UsageError(
                f"{source} changed after it was compiled: run `make native` (or `make pure`)"
            )


# The event loops the in-process tests run on. Every test runs on uvloop, as `serve` does
# (cli._run). The modules that pin the relay's edges at the socket run on asyncio's own loop
# as well: its transports hand reads to data_received, where uvloop's fill the connection's
# read buffer (get_buffer/buffer_updated, readbuffer.py), so both ways in stay tested.
BOTH_LOOPS = frozenset(
    {
        "test_framing",
        "test_relay_edges",
        "test_relay_differential",
        "test_hostile",
        "test_faults",
        "test_websocket",
        "test_websocket_edges",
        "test_egress",
    }
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = item.nodeid.partition("::")[0].rpartition("/")[2].removesuffix(".py")
    if module in BOTH_LOOPS:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


# LiteLLM downloads a model price map at import time unless told to use its bundled copy;
# tests reach loopback only.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

_T = TypeVar("_T")

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0b3c2a7e-5d1f-4e0a-9c8b-6a4d2f1e3b5c"


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="session")
def client_certificate(ca: CertificateAuthority) -> ClientCertificate:
    return ca.issue_client_certificate("aoai-auth-proxy test client")


@pytest.fixture
def certificate_file(tmp_path: Path, client_certificate: ClientCertificate) -> Path:
    return client_certificate.write(tmp_path / "certificate.pem")


@dataclass
class RunningProxy:
    """A proxy serving on 127.0.0.1:<ephemeral>, exactly as `aoai-auth-proxy serve` runs it."""

    server: ProxyServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def app(self) -> ProxyApp:
        return self.server.app

    @property
    def settings(self) -> Settings:
        return self.server.settings

    async def stop(self) -> None:
        await self.server.stop()


async def start_proxy(settings: Settings) -> RunningProxy:
    server = ProxyServer(settings)
    await server.start()
    return RunningProxy(server)


async def wait_ready(url: str, timeout: float = 10.0) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.02)


async def eventually(
    probe: Callable[[], Awaitable[_T]], expected: _T, *, seconds: float = 5.0
) -> bool:
    """Poll `probe` until it returns `expected` (True) or `seconds` pass (False)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if await probe() == expected:
            return True
        await asyncio.sleep(0.1)
    return await probe() == expected


async def hear_audio_response(connection: Any, *, beta: bool = False) -> tuple[str, bytes]:
    """Read a realtime response to its end: (transcript, audio bytes). `connection` is the
    openai SDK's GA or beta realtime connection; the event names differ between the two."""
    prefix = "response.audio" if beta else "response.output_audio"
    transcript, audio = "", b""
    async for event in connection:
        if event.type == f"{prefix}_transcript.delta":
            transcript += event.delta
        elif event.type == f"{prefix}.delta":
            audio += base64.b64decode(event.delta)
        elif event.type == "response.done":
            break
    return transcript, audio


@pytest.fixture
def ca_file(tmp_path: Path, ca: CertificateAuthority) -> Path:
    return ca.write_ca_file(tmp_path / "ca.pem")


@pytest_asyncio.fixture
async def entra(
    ca: CertificateAuthority, client_certificate: ClientCertificate
) -> AsyncIterator[EntraStandIn]:
    async with EntraStandIn(ca) as stand_in:
        stand_in.register_client(TENANT_ID, CLIENT_ID, client_certificate.certificate)
        yield stand_in


@pytest.fixture
def upstream_routes() -> list[tuple[str, str, Any]]:
    """Scripted upstream endpoints a test adds before the stand-in starts (override it)."""
    return []


@pytest_asyncio.fixture
async def aoai(
    entra: EntraStandIn, ca: CertificateAuthority, upstream_routes: list[tuple[str, str, Any]]
) -> AsyncIterator[AzureOpenAIStandIn]:
    stand_in = AzureOpenAIStandIn(entra, ca)
    for method, path, handler in upstream_routes:
        stand_in.add_route(method, path, handler)
    async with stand_in:
        yield stand_in


@pytest.fixture
def proxy_env(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, certificate_file: Path, ca_file: Path
) -> dict[str, str]:
    return {
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_TENANT_ID": TENANT_ID,
        "AZURE_CERTIFICATE_PATH": str(certificate_file),
        "AZURE_AUTHORITY_HOST": entra.authority,
        "API_BASE_URL": aoai.base_url,
        "SSL_CERT_FILE": str(ca_file),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "PROXY_SHUTDOWN_TIMEOUT": "5",
    }


ProxyFactory = Callable[..., Coroutine[Any, Any, RunningProxy]]


@pytest_asyncio.fixture
async def make_proxy(proxy_env: dict[str, str]) -> AsyncIterator[ProxyFactory]:
    """Start a proxy with `proxy_env` plus overrides; it is stopped after the test."""
    started: list[RunningProxy] = []

    async def make(*, ready: bool = True, **overrides: str) -> RunningProxy:
        running = await start_proxy(load_settings({**proxy_env, **overrides}))
        started.append(running)
        if ready:
            await wait_ready(running.url)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest_asyncio.fixture
async def proxy(make_proxy: ProxyFactory) -> RunningProxy:
    return await make_proxy()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client that changes nothing: no decompression, no default headers."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
