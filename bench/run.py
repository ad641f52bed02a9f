"""Benchmark the proxy against direct calls to the same upstream, as ratios measured in one run.

    .venv/bin/python bench/run.py        (what `make bench` runs; about 80 seconds)

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from harness import (
    BENCH_DIR,
    PYTHON,
    CpuMeter,
    Pinning,
    Processes,
    Stack,
    cpu_pinning,
    free_port,
    raise_open_files_limit,
    read_ready_line,
    wait_healthy,
)
from load import wrk_script
from phases import measure_latency, measure_streams, measure_throughput, settled_rss
from report import format_report, summarize_log
from upstream import COMPLETION_BODY

# The package has no py.typed marker yet: `mypy bench` alone sees it as untyped, a full `mypy`
# run (src is in `files`) does not, hence both codes.
from aoai_auth_proxy.testing import (
    CertificateAuthority,
    EntraStandIn,
)

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PROXY_LOG_LEVEL = "WARNING"
CERTIFICATE_LIFETIME = dt.timedelta(days=365)
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
PROXY_LOG_FILE = BENCH_DIR / "results" / "proxy.log"
# Environment that would change where the proxy's outbound requests go.
_ROUTING_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file")


@dataclass(frozen=True)
class Options:
    connections: tuple[int, ...]
    seconds: int
    warmup_seconds: int
    rounds: int
    latency_count: int
    latency_warmup: int
    streams: int
    stream_rounds: int


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=int, default=6, help="per wrk run (whole seconds)")
    parser.add_argument("--warmup-seconds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved direct/proxy rounds")
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--latency-warmup", type=int, default=200)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument(
        "--stream-rounds", type=int, default=2, help="a second round shows memory not returned"
    )
    args = parser.parse_args(argv)
    return Options(
        connections=tuple(args.connections),
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        rounds=args.rounds,
        latency_count=args.latency_count,
        latency_warmup=args.latency_warmup,
        streams=args.streams,
        stream_rounds=args.stream_rounds,
    )


def proxy_environment(
    workdir: Path, entra: EntraStandIn, ca: CertificateAuthority, upstream_url: str, port: int
) -> dict[str, str]:
    """The variables a user sets, and nothing inherited that could reroute the proxy."""
    # A year, not the stand-in's default week: the proxy warns about certificates near expiry.
    certificate = ca.issue_client_certificate(
        "aoai-auth-proxy-bench", not_after=dt.datetime.now(dt.UTC) + CERTIFICATE_LIFETIME
    )
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
        meter = CpuMeter([stack.proxy.pid, stack.upstream.pid])
        rest_mb = await settled_rss(stack.proxy.pid)
        _progress("sequential latency")
        latency = await measure_latency(
            processes, stack, count=options.latency_count, warmup=options.latency_warmup
        )
        _progress("throughput with wrk")
        throughput = await measure_throughput(
            processes,
            stack,
            wrk_script(workdir / "post.lua"),
            connections=options.connections,
            seconds=options.seconds,
            warmup_seconds=options.warmup_seconds,
            rounds=options.rounds,
        )
        streams = []
        for round_index in range(options.stream_rounds):
            _progress(f"{options.streams} SSE streams, round {round_index + 1}")
            streams.append(await measure_streams(session, stack, count=options.streams))
        noise = meter.foreign()
        token_requests = entra.token_requests
    proxy_log = (workdir / "proxy.log").read_text(errors="replace").splitlines()
    PROXY_LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    PROXY_LOG_FILE.write_text("\n".join(proxy_log) + "\n")
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "open_files_limit": open_files,
        },
        "setup": {
            "load_generator": "wrk -t1 (throughput), bench/latency.py http.client (latency)",
            "pinning": pinning.description,
            "proxy_log_level": PROXY_LOG_LEVEL,
            "upstream": "bench/upstream.py, aiohttp web server (httptools is not installed), "
            "access log off",
            "response_bytes": len(COMPLETION_BODY),
        },
        "options": asdict(options),
        "proxy_ready_seconds": ready_seconds,
        "rest_mb": rest_mb,
        "token_requests": token_requests,
        "latency": latency,
        "throughput": throughput,
        "streams": streams,
        "noise": noise,
        "proxy_log_lines": len(proxy_log),
        "proxy_log_summary": summarize_log(proxy_log),
        "duration_seconds": time.monotonic() - started,
    }


def _progress(phase: str) -> None:
    print(f"bench: {phase} ...", file=sys.stderr, flush=True)


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
