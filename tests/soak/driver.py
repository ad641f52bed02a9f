"""The soak driver: the stand-ins run in this process, the proxy as a subprocess, under a bounded
mixed load (chat completions, streams, 1-5 MB uploads, clients that vanish mid-stream or
mid-upload, WebSocket sessions) while Entra issues short-lived tokens.

The criteria, each a line of the report (`SoakReport.failures()` lists the ones not met):
- no request failed that was not meant to (the vanishing clients are meant to);
- no expired token reached the upstream: the stand-in answers 401 to one (a failed request
  here) and records every request it refused without a client id;
- the tokens Entra issued are the fetches the proxy counted, as many as the refresh schedule
  allows (50-75% of a token's life), and none failed;
- every upstream request of a vanished client was cancelled;
- between the end of the warm-up and the end, measured with the load paused (QUIET_SAMPLES),
  the proxy's RSS grew less than `rss_tolerance` and its file descriptors, open connections
  apart, less than `fd_tolerance`; its open connections stayed within the load's concurrency;
- the proxy logged no ERROR and no traceback, and exited 0 on SIGTERM.

Everything is bounded: each worker stops at the deadline, each operation has a timeout, and the
whole run has one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import psutil
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from aoai_auth_proxy.testing import AzureOpenAIStandIn, CertificateAuthority, EntraStandIn
from tests.conftest import CLIENT_ID, TENANT_ID, wait_ready
from tests.integration.test_process import ProxyProcess, spawn

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
REALTIME = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-realtime"
UPLOAD_PATH = "/soak/upload"
SLOW_STREAM_PATH = "/soak/slow-stream"
# One operation (a request, a stream, an upload or a WebSocket session) must end within this.
OPERATION_TIMEOUT_SECONDS = 60.0
# The quiet points: how long to wait for the operations under way, and then for the proxy to
# close the connections the load left.
QUIET_DRAIN_SECONDS = 60.0
QUIET_SETTLE_SECONDS = 1.5
# A quiet point's figures: the sample with the lowest RSS of a few taken over two seconds.
# The proxy gives freed heap pages back once a second (cli.heap_trimmer), and a single sample
# could come just before it did: one 300 s run measured +11.2% that way, with no trend in its
# samples under load. A leak raises every sample, the lowest too.
QUIET_SAMPLES = 5
QUIET_SAMPLE_EVERY = 0.5
# Added to the run's duration for start-up and shutdown, as the run's overall bound.
OVERHEAD_SECONDS = 120.0
UPLOAD_BUFFER = os.urandom(5_000_000)

Kind = Literal["chat", "stream", "upload", "vanish", "websocket"]
KINDS: tuple[Kind, ...] = ("chat", "stream", "upload", "vanish", "websocket")
Outcome = Literal["ok", "aborted"]


@dataclass(frozen=True)
class SoakConfig:
    """How long, how hard, and how strict."""

    seconds: float = 300.0
    token_lifetime: float = 90.0  # Entra's `expires_in`: refreshes every 45-68 s
    warmup_fraction: float = 0.2
    sample_every: float = 2.0
    rss_tolerance: float = 0.10
    fd_tolerance: float = 0.10
    workers: dict[Kind, int] = field(
        default_factory=lambda: {"chat": 2, "stream": 2, "upload": 1, "vanish": 1, "websocket": 1}
    )
    pause: float = 0.02  # seconds between one worker's operations
    upload_bytes: tuple[int, int] = (1_000_000, 5_000_000)

    @classmethod
    def short(cls) -> SoakConfig:
        """About 24 s for `make test`: a lighter load, and tokens that live 8 s (so four or
        five are issued); the RSS bound is `make soak`'s (see test_soak_short.py)."""
        return cls(
            seconds=24.0,
            token_lifetime=8.0,
            warmup_fraction=0.25,
            sample_every=1.0,
            workers={"chat": 1, "stream": 1, "upload": 1, "vanish": 1, "websocket": 1},
            pause=0.05,
            upload_bytes=(1_000_000, 3_000_000),
        )

    @property
    def warmup(self) -> float:
        return self.seconds * self.warmup_fraction

    @property
    def concurrency(self) -> int:
        return sum(self.workers.values())


@dataclass
class Tally:
    ok: int = 0
    aborted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(why[:300])


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the load started
    rss: int
    fds: int
    connections: int  # the proxy's TCP connections (listening sockets not counted)

    @property
    def fds_without_connections(self) -> int:
        return self.fds - self.connections


@dataclass
class UpstreamCounts:
    """What the scripted upstream routes and the stand-in's records showed."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    unauthenticated: int = 0  # requests the stand-in refused (no valid token)
    forwarded: int = 0


@dataclass
class SoakReport:
    config: SoakConfig
    tallies: dict[Kind, Tally]
    samples: list[Sample]
    warm: Sample
    end: Sample
    upstream: UpstreamCounts
    issued_tokens: int
    counted_refreshes: int
    failed_refreshes: int
    elapsed: float  # seconds from the first token to the end of the load
    log_problems: list[str]
    exit_code: int | None

    def criteria(self) -> list[tuple[bool, str]]:
        lifetime = self.config.token_lifetime
        fewest = 1 + math.floor(self.elapsed / (0.75 * lifetime))
        most = 1 + math.ceil(self.elapsed / (0.5 * lifetime))
        rss_growth = self.end.rss / self.warm.rss - 1
        fd_base = self.warm.fds_without_connections
        fd_growth = self.end.fds_without_connections / fd_base - 1
        peak_connections = max(s.connections for s in self.samples)
        # Each operation holds a client connection and an upstream one; a vanished client's
        # connection may linger until the proxy notices. Beyond that, connections leak.
        connection_bound = 4 * self.config.concurrency + 4
        failed = sum(t.failed for t in self.tallies.values())
        total = sum(t.ok + t.aborted + t.failed for t in self.tallies.values())
        aborted = self.tallies["vanish"].aborted
        up = self.upstream
        return [
            (total > 0 and failed == 0, f"requests not meant to fail that failed: {failed}"),
            (aborted > 0, f"clients that vanished on purpose: {aborted}"),
            (
                up.unauthenticated == 0,
                f"upstream requests without a valid token: {up.unauthenticated} of {up.forwarded}",
            ),
            (
                self.issued_tokens == self.counted_refreshes and self.failed_refreshes == 0,
                f"tokens issued by Entra: {self.issued_tokens}; fetches the proxy counted: "
                f"{self.counted_refreshes} ok, {self.failed_refreshes} failed",
            ),
            (
                fewest <= self.issued_tokens <= most,
                f"tokens issued in {self.elapsed:.0f} s of {lifetime:g}-second tokens: "
                f"{self.issued_tokens} (the schedule allows {fewest}-{most})",
            ),
            (
                up.cancelled == up.started - up.finished,
                f"upstream requests of vanished clients cancelled: {up.cancelled} "
                f"of {up.started - up.finished}",
            ),
            (
                rss_growth < self.config.rss_tolerance,
                f"proxy RSS after warm-up {_mib(self.warm.rss)} -> end {_mib(self.end.rss)}: "
                f"{rss_growth:+.1%} (limit {self.config.rss_tolerance:.0%})",
            ),
            (
                fd_growth < self.config.fd_tolerance,
                f"proxy fds after warm-up {self.warm.fds} -> end {self.end.fds}; without open "
                f"connections {fd_base} -> {self.end.fds_without_connections}: {fd_growth:+.1%} "
                f"(limit {self.config.fd_tolerance:.0%})",
            ),
            (
                peak_connections <= connection_bound,
                f"proxy TCP connections at most {peak_connections} (bound {connection_bound})",
            ),
            (
                not self.log_problems,
                f"ERROR or traceback lines in the proxy log: {len(self.log_problems)}",
            ),
            (self.exit_code == 0, f"exit code on SIGTERM: {self.exit_code}"),
        ]

    def failures(self) -> list[str]:
        return [text for ok, text in self.criteria() if not ok]

    def render(self) -> str:
        lines = [
            f"soak: {self.config.seconds:g} s of load, {self.config.concurrency} workers, "
            f"{self.config.token_lifetime:g}-second tokens",
            f"{'operation':<10} {'ok':>7} {'aborted':>8} {'failed':>7}",
        ]
        for kind, tally in self.tallies.items():
            lines.append(f"{kind:<10} {tally.ok:>7} {tally.aborted:>8} {tally.failed:>7}")
            lines.extend(f"    {error}" for error in tally.errors)
        lines.append(
            f"upstream: {self.upstream.forwarded} requests recorded; slow streams and uploads "
            f"started {self.upstream.started}, finished {self.upstream.finished}, "
            f"cancelled {self.upstream.cancelled}"
        )
        lines.append(
            "proxy over time (s, RSS, fds, TCP connections; * = load paused, after warm-up "
            "and at the end):"
        )
        step = max(1, len(self.samples) // 12)
        shown = sorted({*self.samples[::step], self.warm, self.end}, key=lambda s: s.at)
        lines.extend(
            f"  {s.at:7.1f}  {_mib(s.rss):>10}  {s.fds:>4}  {s.connections:>4}"
            + ("  *" if s in (self.warm, self.end) else "")
            for s in shown
        )
        if self.samples:
            lines.append(f"  peak RSS {_mib(max(s.rss for s in self.samples))}")
        lines.extend(self.log_problems[:5])
        for ok, text in self.criteria():
            lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")
        return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class _Upstream:
    """The stand-in's scripted routes for uploads and slow streams, and its request records."""

    def __init__(self) -> None:
        self.counts = UpstreamCounts()

    async def upload(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        self.counts.started += 1
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        except (asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
            self.counts.cancelled += 1
            raise
        self.counts.finished += 1
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def slow_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.counts.started += 1
        try:
            await response.prepare(request)
            for n in range(100):  # 5 s unless the client goes first
                await response.write(b"data: %d\n\n" % n)
                await asyncio.sleep(0.05)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.counts.cancelled += 1
            raise
        self.counts.finished += 1
        return response

    def drain_records(self, aoai: AzureOpenAIStandIn) -> None:
        """Count and forget what the stand-in recorded, so a long run holds no history."""
        records, aoai.requests[:] = list(aoai.requests), []
        self.counts.forwarded += len(records)
        self.counts.unauthenticated += sum(1 for seen in records if seen.client_id is None)
        sessions = aoai.realtime_sessions
        sessions[:] = [session for session in sessions if not session.ended]


class _Load:
    """The workers, their tallies, and a way to pause them all (a quiet point)."""

    def __init__(self, url: str, config: SoakConfig, rng: random.Random) -> None:
        self.url = url
        self.config = config
        self.rng = rng
        self.tallies: dict[Kind, Tally] = {kind: Tally() for kind in KINDS}
        self.go = asyncio.Event()
        self.go.set()
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.deadline = 0.0
        self.session = _session()
        self._count = 0

    async def close(self) -> None:
        await self.session.close()

    async def run_workers(self, until: float) -> None:
        self.deadline = until
        operations: dict[Kind, Callable[[], Awaitable[Outcome]]] = {
            "chat": self.chat,
            "stream": self.stream,
            "upload": self.upload,
            "vanish": self.vanish,
            "websocket": self.websocket,
        }
        await asyncio.gather(
            *(
                self._worker(kind, operations[kind])
                for kind, count in self.config.workers.items()
                for _ in range(count)
            )
        )

    async def quiet(self) -> None:
        """Pause the workers, wait for what is under way, and drop the client connections."""
        self.go.clear()
        await asyncio.wait_for(self.idle.wait(), QUIET_DRAIN_SECONDS)
        await self.session.close()
        self.session = _session()
        await asyncio.sleep(QUIET_SETTLE_SECONDS)

    def resume(self) -> None:
        self.go.set()

    async def _worker(self, kind: Kind, operation: Callable[[], Awaitable[Outcome]]) -> None:
        loop = asyncio.get_running_loop()
        tally = self.tallies[kind]
        while loop.time() < self.deadline:
            await self.go.wait()
            if loop.time() >= self.deadline:
                break
            self.active += 1
            self.idle.clear()
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                    outcome = await operation()
            except _Failed as failed:
                tally.fail(str(failed))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                tally.fail(f"{type(exc).__name__}: {exc}")
            else:
                if outcome == "ok":
                    tally.ok += 1
                else:
                    tally.aborted += 1
            finally:
                self.active -= 1
                if not self.active:
                    self.idle.set()
            await asyncio.sleep(self.config.pause)

    def _next(self) -> int:
        self._count += 1
        return self._count

    async def chat(self) -> Outcome:
        text = f"soak {self._next()}"
        body = {"messages": [{"role": "user", "content": text}]}
        async with self.session.post(
            self.url + CHAT, json=body, headers={"api-key": "dummy"}
        ) as response:
            answer = await response.read()
        _expect(response.status == 200, f"chat: {response.status} {answer[:200]!r}")
        content = json.loads(answer)["choices"][0]["message"]["content"]
        _expect(content == f"Echo: {text}", f"chat: wrong answer {content!r}")
        return "ok"

    async def stream(self) -> Outcome:
        text = f"soak stream {self._next()} with a few more words"
        body = {"messages": [{"role": "user", "content": text}], "stream": True}
        async with self.session.post(self.url + CHAT, json=body) as response:
            events = await response.read()
        _expect(response.status == 200, f"stream: {response.status} {events[:200]!r}")
        _expect(events.endswith(b"data: [DONE]\n\n"), "stream: no [DONE] at the end")
        return "ok"

    async def upload(self) -> Outcome:
        low, high = self.config.upload_bytes
        size = self.rng.randint(low, high)
        start = self.rng.randint(0, len(UPLOAD_BUFFER) - size)
        payload = UPLOAD_BUFFER[start : start + size]
        chunked = self._next() % 2 == 0

        async def pieces() -> AsyncIterator[bytes]:
            for offset in range(0, size, 256 * 1024):
                yield payload[offset : offset + 256 * 1024]

        # A sized body as BytesIO: aiohttp warns that raw bytes over 1 MiB block the loop.
        data: io.BytesIO | AsyncIterator[bytes] = pieces() if chunked else io.BytesIO(payload)
        async with self.session.post(self.url + UPLOAD_PATH, data=data) as response:
            answer = await response.read()
        _expect(response.status == 200, f"upload: {response.status} {answer[:200]!r}")
        result = json.loads(answer)
        _expect(
            result == {"sha256": hashlib.sha256(payload).hexdigest(), "size": size},
            f"upload of {size} bytes ({'chunked' if chunked else 'sized'}) arrived as {result}",
        )
        return "ok"

    async def vanish(self) -> Outcome:
        """A client that drops its connection mid-stream or mid-upload, as a killed one does."""
        host, port = self.url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_connection(_FirstBytes, host, int(port))
        try:
            if self._next() % 2:
                transport.write(
                    f"GET {SLOW_STREAM_PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                )
                first = await client.first()
                _expect(first.startswith(b"HTTP/1.1 200"), f"vanish: answered {first[:80]!r}")
            else:
                transport.write(
                    f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: localhost\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode()
                    + b"10000\r\n"
                    + UPLOAD_BUFFER[:0x10000]
                    + b"\r\n"
                )
                await asyncio.sleep(0.2)  # the upstream is reading it by now
        finally:
            transport.abort()
        return "aborted"

    async def websocket(self) -> Outcome:
        url = "ws" + self.url.removeprefix("http") + REALTIME
        async with connect(
            url,
            subprotocols=[Subprotocol("echo")],
            additional_headers={"api-key": "dummy"},
            max_size=None,
            open_timeout=10,
        ) as ws:
            _expect(ws.subprotocol == "echo", f"websocket: subprotocol {ws.subprotocol}")
            for n in range(5):
                await ws.send(f"frame {n}")
                echoed = await ws.recv()
                _expect(echoed == f"frame {n}", f"websocket: echoed {echoed!r}")
            blob = UPLOAD_BUFFER[: 32 * 1024]
            await ws.send(blob)
            _expect(await ws.recv() == blob, "websocket: binary frame changed")
            await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        return "ok"


class _Failed(Exception):
    """An operation's answer was wrong: a request that failed although it was not meant to."""


def _expect(condition: bool, why: str) -> None:
    if not condition:
        raise _Failed(why)


class _FirstBytes(asyncio.Protocol):
    def __init__(self) -> None:
        self._first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self._first.done():
            self._first.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._first.done():
            self._first.set_result(b"")

    async def first(self) -> bytes:
        return await asyncio.wait_for(self._first, 10)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=OPERATION_TIMEOUT_SECONDS))


def _sample(process: psutil.Process, started: float) -> Sample:
    connections = sum(
        1 for c in process.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN
    )
    return Sample(
        at=time.monotonic() - started,
        rss=process.memory_info().rss,
        fds=process.num_fds(),
        connections=connections,
    )


async def _quiet_sample(process: psutil.Process, started: float) -> Sample:
    samples = [_sample(process, started)]
    for _ in range(QUIET_SAMPLES - 1):
        await asyncio.sleep(QUIET_SAMPLE_EVERY)
        samples.append(_sample(process, started))
    return min(samples, key=lambda sample: sample.rss)


async def _token_metrics(url: str) -> tuple[int, int]:
    """Successful and failed token fetches, as the proxy's /metrics counts them."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    counts = {"success": 0, "failure": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aoai_proxy_token_refreshes_total":
                counts[sample.labels["result"]] += int(sample.value)
    return counts["success"], counts["failure"]


async def _stop(proxy: ProxyProcess) -> int | None:
    if proxy.process.returncode is not None:
        return proxy.process.returncode
    proxy.process.send_signal(signal.SIGTERM)
    try:
        return await proxy.wait(timeout=30)
    except TimeoutError:
        proxy.process.kill()
        await proxy.wait(timeout=30)
        return None


def _log_problems(proxy: ProxyProcess) -> list[str]:
    return [
        line
        for line in proxy.lines
        if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]


async def run_soak(
    config: SoakConfig, *, progress: Callable[[str], None] = lambda line: None
) -> SoakReport:
    """Run the stand-ins, the proxy and the load for `config.seconds`; report on the criteria."""
    async with asyncio.timeout(config.seconds + OVERHEAD_SECONDS):
        return await _run(config, progress)


async def _run(config: SoakConfig, progress: Callable[[str], None]) -> SoakReport:
    ca = CertificateAuthority.create()
    certificate = ca.issue_client_certificate("aoai-auth-proxy soak")
    upstream = _Upstream()
    with tempfile.TemporaryDirectory(prefix="aoai-soak-") as directory:
        files = Path(directory)
        async with EntraStandIn(ca, token_lifetime=config.token_lifetime) as entra:
            entra.register_client(TENANT_ID, CLIENT_ID, certificate.certificate)
            aoai = AzureOpenAIStandIn(entra, ca)
            aoai.add_route("POST", UPLOAD_PATH, upstream.upload)
            aoai.add_route("GET", SLOW_STREAM_PATH, upstream.slow_stream)
            async with aoai:
                proxy = await spawn(
                    {
                        "AZURE_CLIENT_ID": CLIENT_ID,
                        "AZURE_TENANT_ID": TENANT_ID,
                        "AZURE_CERTIFICATE_PATH": str(certificate.write(files / "cert.pem")),
                        "AZURE_AUTHORITY_HOST": entra.authority,
                        "API_BASE_URL": aoai.base_url,
                        "SSL_CERT_FILE": str(ca.write_ca_file(files / "ca.pem")),
                        "HOST": "127.0.0.1",
                        "PORT": "0",
                        "PROXY_SHUTDOWN_TIMEOUT": "10",
                    }
                )
                try:
                    url = await proxy.listening()
                    await wait_ready(url, timeout=30)
                    report = await _drive(config, url, proxy, entra, aoai, upstream, progress)
                finally:
                    exit_code = await _stop(proxy)
                report.exit_code = exit_code
                report.log_problems = _log_problems(proxy)
                upstream.drain_records(aoai)
                report.upstream = upstream.counts
    return report


async def _drive(
    config: SoakConfig,
    url: str,
    proxy: ProxyProcess,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    upstream: _Upstream,
    progress: Callable[[str], None],
) -> SoakReport:
    assert proxy.process.pid is not None
    process = psutil.Process(proxy.process.pid)
    first_token = time.monotonic()
    started = time.monotonic()
    samples: list[Sample] = []
    load = _Load(url, config, random.Random(7))  # the load's shape, not security

    async def sample_forever() -> None:
        while True:
            samples.append(_sample(process, started))
            upstream.drain_records(aoai)
            last = samples[-1]
            progress(f"{last.at:6.1f} s  RSS {_mib(last.rss)}  fds {last.fds}")
            await asyncio.sleep(config.sample_every)

    loop = asyncio.get_running_loop()
    sampler = asyncio.create_task(sample_forever())
    try:
        workers = asyncio.create_task(load.run_workers(loop.time() + config.seconds))
        await asyncio.sleep(config.warmup)
        await load.quiet()
        warm = await _quiet_sample(process, started)
        samples.append(warm)
        progress(f"warm-up over: RSS {_mib(warm.rss)}, fds {warm.fds}")
        load.resume()
        await workers
        await load.quiet()
        end = await _quiet_sample(process, started)
        elapsed = time.monotonic() - first_token
        success, failure = await _token_metrics(url)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await load.close()
    samples.append(end)
    return SoakReport(
        config=config,
        tallies=load.tallies,
        samples=samples,
        warm=warm,
        end=end,
        upstream=upstream.counts,
        issued_tokens=len(entra.issued),
        counted_refreshes=success,
        failed_refreshes=failure,
        elapsed=elapsed,
        log_problems=[],
        exit_code=None,
    )
