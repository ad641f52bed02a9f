"""Load generators: wrk for throughput, the latency and timed-SSE clients, and many held-open
SSE streams."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import BENCH_DIR, PYTHON, Processes
from workload import CHAT_BODY, CHAT_PATH, HEADERS, STREAM_BODY, STREAM_END

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
# Connections opened at once while building up the held streams: below the listen backlog.
STREAM_OPEN_BATCH = 100


def wrk_script(path: Path) -> Path:
    """The Lua script that makes wrk send the chat completion POST."""
    body = CHAT_BODY.decode()
    assert "]]" not in body, "the body must fit in a Lua long string"
    lines = ['wrk.method = "POST"', f"wrk.body = [[{body}]]"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in HEADERS]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int


def _us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_wrk(output: str) -> WrkResult:
    """Read wrk's summary (run with --latency); raises ValueError if a line is missing."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output has no {pattern!r}:\n{output}")
        return match

    p50 = find(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$")
    p99 = find(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests_per_second=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        requests=int(find(r"^\s+(\d+) requests in ").group(1)),
        p50_us=_us(p50.group(1), p50.group(2)),
        p99_us=_us(p99.group(1), p99.group(2)),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


async def run_wrk(
    processes: Processes,
    pin: Sequence[str],
    script: Path,
    base_url: str,
    *,
    connections: int,
    seconds: int,
) -> WrkResult:
    argv = [
        *pin,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",  # wrk takes whole seconds only
        "--latency",
        "-s",
        str(script),
        base_url + CHAT_PATH,
    ]
    async with asyncio.timeout(seconds + 30):
        status, out, err = await processes.run(argv)
    if status != 0:
        raise RuntimeError(f"wrk exited with {status}: {err or out}")
    return parse_wrk(out)


async def run_latency(
    processes: Processes,
    pin: Sequence[str],
    base_urls: Sequence[str],
    *,
    count: int,
    warmup: int,
    ca_file: Path | None = None,
) -> list[dict[str, Any]]:
    """Sequential requests over one keep-alive connection per URL, alternating URLs."""
    argv = [*pin, PYTHON, str(BENCH_DIR / "latency.py"), f"--count={count}"]
    argv += [f"--warmup={warmup}", *([f"--ca={ca_file}"] if ca_file else []), *base_urls]
    async with asyncio.timeout(120):
        status, out, err = await processes.run(argv)
    if status != 0:
        raise RuntimeError(f"latency client exited with {status}: {err}")
    result: list[dict[str, Any]] = json.loads(out)
    return result


async def run_sse(
    processes: Processes,
    pin: Sequence[str],
    base_urls: Sequence[str],
    *,
    streams: int,
    events: int,
    interval_ms: float,
) -> list[dict[str, Any]]:
    """Timed SSE streams, one keep-alive connection per URL, the URLs taking turns."""
    argv = [*pin, PYTHON, str(BENCH_DIR / "sse.py"), f"--streams={streams}"]
    argv += [f"--events={events}", f"--interval-ms={interval_ms}", *base_urls]
    # Each stream lasts about events x interval; allow for three targets, warm-up and slack.
    bound = 60 + 4 * len(base_urls) * (streams + 2) * events * interval_ms / 1000
    async with asyncio.timeout(bound):
        status, out, err = await processes.run(argv)
    if status != 0:
        raise RuntimeError(f"SSE client exited with {status}: {err}")
    result: list[dict[str, Any]] = json.loads(out)
    return result


@dataclass
class HeldStreams:
    """Streaming responses opened through the proxy and held open after their first event."""

    requested: int
    responses: list[aiohttp.ClientResponse] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    first_events: int = 0
    open_seconds: float = 0.0

    def abort(self, count: int) -> int:
        """Close the first `count` streams abruptly, as a client that goes away does."""
        closing, self.responses = self.responses[:count], self.responses[count:]
        for response in closing:
            response.close()
        return len(closing)

    async def drain(self) -> int:
        """Read every remaining stream to its end; returns how many ended with [DONE]."""

        async def to_end(response: aiohttp.ClientResponse) -> bool:
            try:
                rest = await response.content.read()
            except (aiohttp.ClientError, TimeoutError):
                return False
            return rest.endswith(STREAM_END)

        done = await asyncio.gather(*(to_end(r) for r in self.responses))
        return sum(done)


@asynccontextmanager
async def hold_streams(base_url: str, count: int) -> AsyncIterator[HeldStreams]:
    """Open `count` concurrent SSE streams, read each one's first event, and keep them open."""
    held = HeldStreams(requested=count)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def open_one() -> None:
            try:
                response = await session.post(
                    base_url + CHAT_PATH, data=STREAM_BODY, headers=dict(HEADERS)
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                held.failures[type(exc).__name__] += 1
                return
            held.responses.append(response)
            held.statuses[response.status] += 1
            try:
                event = await response.content.readuntil(b"\n\n")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                held.failures[type(exc).__name__] += 1
                return
            if event.startswith(b"data: "):
                held.first_events += 1

        started = time.monotonic()
        try:
            for start in range(0, count, STREAM_OPEN_BATCH):
                batch = range(start, min(count, start + STREAM_OPEN_BATCH))
                await asyncio.gather(*(open_one() for _ in batch))
            held.open_seconds = time.monotonic() - started
            yield held
        finally:
            for response in held.responses:
                response.close()
