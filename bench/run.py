"""Benchmark the proxy against direct calls to the same upstream, as ratios measured in one run.

    .venv/bin/python bench/run.py        (what `make bench` runs; about a minute and a half)

Starts a local Entra stand-in (in this process), a fast plain-HTTP upstream (bench/upstream.py)
and the proxy exactly as users run it (`python -m aoai_auth_proxy`), then measures throughput
with wrk, sequential latency, and the proxy's memory at rest and with many SSE streams open.
Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import psutil
from harness import (
    BENCH_DIR,
    PYTHON,
    PeakRss,
    Pinning,
    Processes,
    cpu_pinning,
    cpu_seconds,
    free_port,
    raise_open_files_limit,
    read_ready_line,
    rss_mb,
    wait_healthy,
)
from load import hold_streams, run_latency, run_wrk, wrk_script
from report import format_report
from workload import CHAT_BODY, CHAT_PATH, HEADERS

# The package has no py.typed marker yet: `mypy bench` alone sees it as untyped, a full `mypy`
# run (src is in `files`) does not, hence both codes.
from aoai_auth_proxy.testing import (  # type: ignore[import-untyped, unused-ignore]
    CertificateAuthority,
    EntraStandIn,
)

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PROXY_LOG_LEVEL = "WARNING"
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
# Environment that would change where the proxy's outbound requests go.
_ROUTING_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file")


@dataclass(frozen=True)
class Options:
    connections: tuple[int, ...]
    seconds: float
    warmup_seconds: float
    rounds: int
    latency_count: int
    latency_warmup: int
    streams: int


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=6.0, help="per wrk run")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved direct/proxy rounds")
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--latency-warmup", type=int, default=200)
    parser.add_argument("--streams", type=int, default=500)
    args = parser.parse_args(argv)
    return Options(
        connections=tuple(args.connections),
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        rounds=args.rounds,
        latency_count=args.latency_count,
        latency_warmup=args.latency_warmup,
        streams=args.streams,
    )


@dataclass(frozen=True)
class Stack:
    """What is running: the two base URLs under test and the pids behind them."""

    direct_url: str
    proxy_url: str
    proxy: subprocess.Popen[bytes]
    upstream: subprocess.Popen[bytes]
    pinning: Pinning


def proxy_environment(
    workdir: Path, entra: EntraStandIn, ca: CertificateAuthority, upstream_url: str, port: int
) -> dict[str, str]:
    """The variables a user sets, and nothing inherited that could reroute the proxy."""
    certificate = ca.issue_client_certificate("aoai-auth-proxy-bench")
    entra.register_client(TENANT_ID, CLIENT_ID, certificate.certificate)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AZURE_", "PROXY_")) and name.lower() not in _ROUTING_ENV
    }
    return env | {
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_TENANT_ID": TENANT_ID,
        "AZURE_CERTIFICATE_PATH": str(certificate.write(workdir / "client.pem")),
        "AZURE_AUTHORITY_HOST": entra.authority,
        "SSL_CERT_FILE": str(ca.write_ca_file(workdir / "ca.pem")),
        "API_BASE_URL": upstream_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PROXY_LOG_LEVEL": PROXY_LOG_LEVEL,
        "NO_PROXY": "127.0.0.1,localhost",
    }


async def settled_rss(pid: int, samples: int = 4, interval: float = 0.25) -> float:
    """The largest of a few RSS samples, so a measurement does not catch a momentary dip."""
    peak = 0.0
    for _ in range(samples):
        await asyncio.sleep(interval)
        peak = max(peak, rss_mb(pid))
    return peak


async def measure_latency(processes: Processes, stack: Stack, options: Options) -> dict[str, Any]:
    direct, proxy = await run_latency(
        processes,
        stack.pinning.load,
        [stack.direct_url, stack.proxy_url],
        count=options.latency_count,
        warmup=options.latency_warmup,
    )
    result: dict[str, Any] = {"direct": direct, "proxy": proxy}
    for stat in ("p50_us", "p99_us"):
        d, p = float(direct[stat]), float(proxy[stat])
        result[stat.replace("_us", "")] = {"added_us": p - d, "ratio": p / d}
    return result


async def measure_throughput(
    processes: Processes, stack: Stack, options: Options, workdir: Path
) -> dict[str, Any]:
    script = wrk_script(workdir / "post.lua")
    targets = {"direct": stack.direct_url, "proxy": stack.proxy_url}
    for url in targets.values():  # warm both paths, connection pools and allocators
        await run_wrk(
            processes,
            stack.pinning.load,
            script,
            url,
            connections=max(options.connections),
            seconds=options.warmup_seconds,
        )
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_index in range(options.rounds):
        order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
        for connections in options.connections:
            for name in order:
                proxy_cpu, upstream_cpu = (
                    cpu_seconds(stack.proxy.pid),
                    cpu_seconds(stack.upstream.pid),
                )
                async with PeakRss(stack.proxy.pid) as rss:
                    result = await run_wrk(
                        processes,
                        stack.pinning.load,
                        script,
                        targets[name],
                        connections=connections,
                        seconds=options.seconds,
                    )
                run = asdict(result) | {
                    "proxy_cpu_percent": 100
                    * (cpu_seconds(stack.proxy.pid) - proxy_cpu)
                    / options.seconds,
                    "upstream_cpu_percent": 100
                    * (cpu_seconds(stack.upstream.pid) - upstream_cpu)
                    / options.seconds,
                    "proxy_peak_rss_mb": rss.peak_mb,
                }
                runs.setdefault(f"{name}/{connections}", []).append(run)
    return {str(c): _throughput_summary(runs, c) for c in options.connections}


def _throughput_summary(
    runs: Mapping[str, list[dict[str, Any]]], connections: int
) -> dict[str, Any]:
    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    summary: dict[str, Any] = {}
    for name in ("direct", "proxy"):
        measured = runs[f"{name}/{connections}"]
        summary[name] = {
            "requests_per_second": mean([r["requests_per_second"] for r in measured]),
            "p50_us": mean([r["p50_us"] for r in measured]),
            "p99_us": mean([r["p99_us"] for r in measured]),
            "errors": sum(r["socket_errors"] + r["non_2xx"] for r in measured),
            "proxy_cpu_percent": mean([r["proxy_cpu_percent"] for r in measured]),
            "upstream_cpu_percent": mean([r["upstream_cpu_percent"] for r in measured]),
            "proxy_peak_rss_mb": max(r["proxy_peak_rss_mb"] for r in measured),
            "runs": measured,
        }
    summary["ratio"] = (
        summary["proxy"]["requests_per_second"] / summary["direct"]["requests_per_second"]
    )
    return summary


async def upstream_stats(session: aiohttp.ClientSession, stack: Stack) -> dict[str, int]:
    async with session.get(stack.direct_url + "/bench/stats") as response:
        stats: dict[str, int] = await response.json()
        return stats


async def wait_upstream_open(
    session: aiohttp.ClientSession, stack: Stack, at_most: int, within: float
) -> float | None:
    """Seconds until the upstream holds at most `at_most` open streams, None if not `within`."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            # Another process's state: polling is the only way to observe it.
            while (await upstream_stats(session, stack))["open"] > at_most:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        return None
    return time.monotonic() - started


async def chat_status(session: aiohttp.ClientSession, base_url: str) -> int:
    async with session.post(base_url + CHAT_PATH, data=CHAT_BODY, headers=dict(HEADERS)) as r:
        await r.read()
        return r.status


async def measure_streams(
    session: aiohttp.ClientSession, stack: Stack, options: Options
) -> dict[str, Any]:
    """Hold N streams open through the proxy; half are then closed by their clients (the
    proxy must cancel those upstream), the other half released upstream and read to the end."""
    pid = stack.proxy.pid
    rest_mb = await settled_rss(pid)
    async with hold_streams(stack.proxy_url, options.streams) as held:
        upstream_open = (await upstream_stats(session, stack))["open"]
        open_mb = await settled_rss(pid)
        aborted = await held.abort(len(held.responses) // 2)
        cancelled_in = await wait_upstream_open(session, stack, upstream_open - aborted, within=10)
        async with session.post(stack.direct_url + "/bench/release") as response:
            released = (await response.json())["released"]
        async with asyncio.timeout(30):
            completed = await held.drain()
        result = {
            "requested": held.requested,
            "opened_200": held.statuses.get(200, 0),
            "statuses": {str(k): v for k, v in held.statuses.items()},
            "failures": dict(held.failures),
            "first_events": held.first_events,
            "open_seconds": held.open_seconds,
            "upstream_open": upstream_open,
            "client_closed": aborted,
            "upstream_cancelled_seconds": cancelled_in,
            "released": released,
            "completed": completed,
            "rest_before_mb": rest_mb,
            "open_mb": open_mb,
            "kb_per_stream": (open_mb - rest_mb) * 1024 / max(1, held.first_events),
        }
    await asyncio.sleep(1.0)
    async with session.get(stack.proxy_url + "/health") as response:
        result["health_after"] = response.status
    result["chat_after"] = await chat_status(session, stack.proxy_url)
    result["after_mb"] = await settled_rss(pid)
    result["upstream_after"] = await upstream_stats(session, stack)
    return result


async def start_stack(
    processes: Processes,
    pinning: Pinning,
    workdir: Path,
    entra: EntraStandIn,
    ca: CertificateAuthority,
) -> Stack:
    upstream = processes.start(
        [*pinning.load, PYTHON, str(BENCH_DIR / "upstream.py")],
        stdout=subprocess.PIPE,
        log=workdir / "upstream.log",
    )
    direct_url = f"http://127.0.0.1:{await read_ready_line(upstream, 'listening on')}"
    port = free_port()
    proxy = processes.start(
        [*pinning.proxy, PYTHON, "-m", "aoai_auth_proxy"],
        env=proxy_environment(workdir, entra, ca, direct_url, port),
        log=workdir / "proxy.log",
    )
    return Stack(direct_url, f"http://127.0.0.1:{port}", proxy, upstream, pinning)


async def bench(options: Options, processes: Processes, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    pinning = cpu_pinning()
    open_files = raise_open_files_limit()
    ca = CertificateAuthority.create()
    async with EntraStandIn(ca) as entra, aiohttp.ClientSession() as session:
        stack = await start_stack(processes, pinning, workdir, entra, ca)
        ready_seconds = await wait_healthy(session, stack.proxy_url + "/health", stack.proxy)
        rest_mb = await settled_rss(stack.proxy.pid, samples=4)
        print("measuring latency ...", file=sys.stderr, flush=True)
        latency = await measure_latency(processes, stack, options)
        print("measuring throughput with wrk ...", file=sys.stderr, flush=True)
        throughput = await measure_throughput(processes, stack, options, workdir)
        print(f"holding {options.streams} SSE streams ...", file=sys.stderr, flush=True)
        streams = await measure_streams(session, stack, options)
        token_requests = entra.token_requests
    proxy_log = (workdir / "proxy.log").read_text(errors="replace").splitlines()
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "psutil": psutil.__version__,
            "open_files_limit": open_files,
        },
        "setup": {
            "load_generator": "wrk -t1 (throughput), bench/latency.py http.client (latency)",
            "pinning": pinning.description,
            "proxy_log_level": PROXY_LOG_LEVEL,
            "upstream": "bench/upstream.py, aiohttp web server, access log off",
            "response_bytes": 600,
        },
        "options": asdict(options),
        "proxy_ready_seconds": ready_seconds,
        "rest_mb": rest_mb,
        "token_requests": token_requests,
        "latency": latency,
        "throughput": throughput,
        "streams": streams,
        "proxy_log_lines": len(proxy_log),
        "proxy_log_head": proxy_log[:10],
        "duration_seconds": time.monotonic() - started,
    }


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    options = parse_options()
    signal.signal(signal.SIGTERM, _terminate)
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="aoai-bench-") as tmp:
        workdir = Path(tmp)
        try:
            results = asyncio.run(bench(options, processes, workdir))
        except KeyboardInterrupt:
            print("bench: interrupted, stopping every child process", file=sys.stderr)
            return 130
        except Exception:
            for log in sorted(workdir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-20:]
                print(f"--- {log.name} (last lines) ---", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            processes.stop_all()
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))
    print(f"\nwrote {RESULTS_FILE.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
