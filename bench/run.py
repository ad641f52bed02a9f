"""Benchmark the proxy side by side with nginx and a direct call, as ratios measured in one run.

    make bench                            (about four minutes)
    .venv/bin/python bench/run.py [--proxy-python PYTHON]

`make bench` runs the proxy as the container image runs it: the wheel, compiled by its build
hook, in a venv of Debian's CPython 3.11 (`.venv-bench`, the interpreter of check-deploy's
image; PGO and LTO builds, as the official python:3.11-slim is). --proxy-python names that
interpreter; without it the proxy runs on the bench's own (the development venv's).

Starts, all on 127.0.0.1:
- a local Entra stand-in (in this process) that signs the proxy's ~1.5 KB tokens;
- the upstreams: nginx answering the 600-byte chat completion (`return 200`) over HTTP and
  HTTPS (test CA), for throughput and latency; bench/upstream.py (aiohttp) for SSE streams and
  uploads;
- the relays under test, pinned to one core: nginx (one worker, keep-alive pools, the same
  token header, a buffered access log: bench/nginx.py) and the proxy exactly as users run it
  (`python -m aoai_auth_proxy`, one process per upstream);
then measures, interleaving direct, nginx and proxy runs: sequential latency, wrk throughput at
16 and 64 connections over HTTP and HTTPS to the upstream, first SSE byte and per-event lag,
a 100 MB upload, the proxy's memory at rest and with 1,000 SSE streams open, and PROXY_WORKERS
scaling when the proxy supports it. Prints one table with the targets of issue 8 and whether
each is met, then the details; writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    REPO_DIR,
    CpuMeter,
    LogKeeper,
    Pinning,
    Processes,
    Route,
    Stack,
    anonymous_mb,
    cpu_pinning,
    free_port,
    process_count,
    raise_open_files_limit,
    read_ready_line,
    wait_accepting,
    wait_healthy,
)
from load import wrk_script
from nginx import (
    RelayRoute,
    StaticRoute,
    nginx_version,
    relay_config,
    start_nginx,
    static_upstream_config,
)
from phases import (
    Retries,
    chat_status,
    measure_latency,
    measure_sse,
    measure_streams,
    measure_throughput,
    measure_upload,
    measure_workers,
    settled_rss,
    upstream_stats,
)
from report import evaluate_targets, format_report, is_access_line, summarize_log
from upstream import COMPLETION_BODY

from aoai_auth_proxy.testing import CertificateAuthority, EntraStandIn

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CERTIFICATE_LIFETIME = dt.timedelta(days=365)
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
PROXY_LOG_FILE = BENCH_DIR / "results" / "proxy.log"
# Environment that would change where the proxy's outbound requests go.
_ROUTING_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file")
# The proxies: one per upstream, as a user would run one per Azure OpenAI resource.
PROXY_NAMES = ("http", "tls", "streams")
# How long PROXY_WORKERS=2 gets to show its second process once the proxy is ready.
WORKERS_SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Options:
    connections: tuple[int, ...]
    seconds: int
    warmup_seconds: int
    rounds: int
    latency_count: int
    latency_warmup: int
    sse_streams: int
    sse_events: int
    sse_interval_ms: float
    upload_mb: int
    streams: int
    stream_rounds: int
    workers: bool
    proxy_log_level: str
    retry_budget: int
    proxy_python: str


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=int, default=2, help="per wrk run (whole seconds)")
    parser.add_argument("--warmup-seconds", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved direct/nginx/proxy rounds (median)"
    )
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--latency-warmup", type=int, default=200)
    parser.add_argument("--sse-streams", type=int, default=20, help="timed streams per target")
    parser.add_argument("--sse-events", type=int, default=20, help="events per timed stream")
    parser.add_argument("--sse-interval-ms", type=float, default=5.0)
    parser.add_argument("--upload-mb", type=int, default=100)
    parser.add_argument("--streams", type=int, default=1000, help="held-open SSE streams")
    parser.add_argument(
        "--stream-rounds", type=int, default=2, help="a second round shows memory not returned"
    )
    parser.add_argument(
        "--no-workers", dest="workers", action="store_false", help="skip PROXY_WORKERS scaling"
    )
    parser.add_argument(
        "--proxy-log-level",
        default="INFO",
        help="INFO (the default users run) writes one access line per request, as nginx does",
    )
    parser.add_argument(
        "--retry-budget",
        type=int,
        default=12,
        help="wrk runs that may be run again because other processes disturbed them",
    )
    parser.add_argument(
        "--proxy-python",
        default=os.environ.get("BENCH_PROXY_PYTHON") or PYTHON,
        help="the interpreter the proxy runs on, with the proxy installed (default: this one)",
    )
    args = parser.parse_args(argv)
    return Options(
        connections=tuple(args.connections),
        seconds=args.seconds,
        warmup_seconds=args.warmup_seconds,
        rounds=args.rounds,
        latency_count=args.latency_count,
        latency_warmup=args.latency_warmup,
        sse_streams=args.sse_streams,
        sse_events=args.sse_events,
        sse_interval_ms=args.sse_interval_ms,
        upload_mb=args.upload_mb,
        streams=args.streams,
        stream_rounds=args.stream_rounds,
        workers=args.workers,
        proxy_log_level=args.proxy_log_level.upper(),
        retry_budget=args.retry_budget,
        proxy_python=args.proxy_python,
    )


def proxy_environment(
    workdir: Path, entra: EntraStandIn, ca: CertificateAuthority, log_level: str
) -> dict[str, str]:
    """The variables a user sets, but API_BASE_URL and PORT, and nothing inherited that could
    reroute the proxy."""
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
        "HOST": "127.0.0.1",
        "PROXY_LOG_LEVEL": log_level,
        "NO_PROXY": "127.0.0.1,localhost",
    }


@dataclass
class Running:
    """The stack and what the bench keeps an eye on: each proxy's process and log."""

    stack: Stack
    proxies: dict[str, subprocess.Popen[bytes]]
    proxy_logs: dict[str, LogKeeper]
    nginx_access: LogKeeper
    nginx_token: str
    base_env: dict[str, str]
    upstream_urls: dict[str, str]  # what each proxy relays to (the relayed ports)

    def collect_logs(self) -> None:
        for keeper in self.proxy_logs.values():
            keeper.collect()
        self.nginx_access.collect()


def nginx_errors(prefix: Path) -> dict[str, Any]:
    """What an nginx logged at warn or above: counts by level and a few examples."""
    error_log = prefix / "error.log"
    lines = error_log.read_text(errors="replace").splitlines() if error_log.exists() else []
    levels: dict[str, int] = {}
    for line in lines:
        level = line.split("[", 1)[1].split("]", 1)[0] if "[" in line else "?"
        levels[level] = levels.get(level, 0) + 1
    return {"levels": levels, "examples": lines[:3]}


def proxy_build(python: str) -> dict[str, Any]:
    """What the proxy runs on: the interpreter's version and path, where the package is
    installed, and whether its per-request modules are compiled (the report says if not)."""
    probe = (
        "import json, platform, sys, sysconfig, aoai_auth_proxy, aoai_auth_proxy.http1 as h; "
        "print(json.dumps({'python': platform.python_version(), 'executable': sys.executable, "
        "'package': aoai_auth_proxy.__file__.rsplit('/', 2)[0], "
        "'compiled': h.__file__.endswith(sysconfig.get_config_var('EXT_SUFFIX'))}))"
    )
    result = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=False, cwd=REPO_DIR
    )
    if result.returncode != 0:
        raise RuntimeError(f"{python} cannot import the proxy: {result.stderr.strip()[-500:]}")
    build: dict[str, Any] = json.loads(result.stdout)
    return build


def _start_proxy(
    processes: Processes,
    python: str,
    pin: Sequence[str],
    env: Mapping[str, str],
    upstream_url: str,
    log: Path,
    extra: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = processes.start(
        [*pin, python, "-m", "aoai_auth_proxy"],
        env=dict(env) | {"API_BASE_URL": upstream_url, "PORT": str(port)} | dict(extra or {}),
        log=log,
    )
    return process, f"http://127.0.0.1:{port}"


async def start_stack(
    processes: Processes,
    pinning: Pinning,
    workdir: Path,
    entra: EntraStandIn,
    ca: CertificateAuthority,
    options: Options,
) -> Running:
    server = ca.issue_server_certificate(("localhost", "127.0.0.1"))
    certificate_file = workdir / "upstream-cert.pem"
    certificate_file.write_bytes(server.certificate_pem)
    key_file = workdir / "upstream-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(server.private_key_pem)
    ca_file = ca.write_ca_file(workdir / "ca.pem")

    # The static upstream: a direct and a relayed (credential-checking) port per transport.
    ports = {(transport, kind): free_port() for transport in ("http", "tls") for kind in "dr"}
    static = [
        StaticRoute(port, transport == "tls", check_credentials=kind == "r")
        for (transport, kind), port in ports.items()
    ]
    upstream = await start_nginx(
        processes,
        pinning.load,
        "nginx-upstream",
        workdir / "nginx-upstream",
        static_upstream_config(
            workdir / "nginx-upstream",
            static,
            body=COMPLETION_BODY,
            certificate_file=certificate_file,
            key_file=key_file,
        ),
        [route.port for route in static],
        log_dir=workdir,
    )
    streams_upstream = processes.start(
        [*pinning.load, PYTHON, str(BENCH_DIR / "upstream.py")],
        stdout=subprocess.PIPE,
        log=workdir / "streams-upstream.log",
    )
    streams_port = int(await read_ready_line(streams_upstream, "listening on"))
    upstream_urls = {
        "http": f"http://127.0.0.1:{ports['http', 'r']}",
        "tls": f"https://127.0.0.1:{ports['tls', 'r']}",
        "streams": f"http://127.0.0.1:{streams_port}",
    }
    direct_urls = {
        "http": f"http://127.0.0.1:{ports['http', 'd']}",
        "tls": f"https://127.0.0.1:{ports['tls', 'd']}",
        "streams": upstream_urls["streams"],
    }

    # The relay nginx, with the same kind of token the proxy will hold.
    token = entra.mint_access_token(TENANT_ID, CLIENT_ID, lifetime=24 * 3600)
    relay_ports = {name: free_port() for name in PROXY_NAMES}
    relay_routes = [
        RelayRoute(relay_ports["http"], ports["http", "r"], tls=False, streaming=False),
        RelayRoute(relay_ports["tls"], ports["tls", "r"], tls=True, streaming=False),
        RelayRoute(relay_ports["streams"], streams_port, tls=False, streaming=True),
    ]
    access_log = workdir / "nginx-relay-access.log"
    relay = await start_nginx(
        processes,
        pinning.proxy,
        "nginx-relay",
        workdir / "nginx-relay",
        relay_config(
            workdir / "nginx-relay",
            relay_routes,
            token=token,
            ca_file=ca_file,
            access_log=access_log,
        ),
        list(relay_ports.values()),
        log_dir=workdir,
    )

    base_env = proxy_environment(workdir, entra, ca, options.proxy_log_level)
    proxies: dict[str, subprocess.Popen[bytes]] = {}
    proxy_urls: dict[str, str] = {}
    for name in PROXY_NAMES:
        extra = {"PROXY_UPSTREAM_CA_FILE": str(ca_file)} if name == "tls" else None
        proxies[name], proxy_urls[name] = _start_proxy(
            processes,
            options.proxy_python,
            pinning.proxy,
            base_env,
            upstream_urls[name],
            workdir / f"proxy-{name}.log",
            extra,
        )
    routes = {
        name: {
            "direct": Route("direct", direct_urls[name], None),
            "nginx": Route("nginx", f"http://127.0.0.1:{relay_ports[name]}", relay.master.pid),
            "proxy": Route("proxy", proxy_urls[name], proxies[name].pid),
        }
        for name in PROXY_NAMES
    }
    stack = Stack(
        pinning=pinning,
        routes=routes,
        upstream_pid=upstream.master.pid,
        streams_upstream_pid=streams_upstream.pid,
        nginx_pid=relay.master.pid,
        ca_file=ca_file,
        pids=(
            upstream.master.pid,
            streams_upstream.pid,
            relay.master.pid,
            *(p.pid for p in proxies.values()),
        ),
    )
    return Running(
        stack=stack,
        proxies=proxies,
        proxy_logs={
            name: LogKeeper(workdir / f"proxy-{name}.log", is_access_line) for name in PROXY_NAMES
        },
        nginx_access=LogKeeper(access_log, lambda line: True),
        nginx_token=token,
        base_env=base_env,
        upstream_urls=upstream_urls,
    )


async def proxy_token_bytes(session: aiohttp.ClientSession, running: Running) -> dict[str, Any]:
    """The size of the Authorization header each relay sends, as the streams upstream saw it
    (one chat completion through each, counted before and after)."""
    sizes: dict[str, Any] = {}
    for name in ("proxy", "nginx"):
        before = (await upstream_stats(session, running.stack))["authorization_bytes"]
        status = await chat_status(session, running.stack.routes["streams"][name].url)
        after = (await upstream_stats(session, running.stack))["authorization_bytes"]
        grown = [int(size) for size, n in after.items() if n > before.get(size, 0)]
        sizes[name] = {"status": status, "authorization_bytes": grown[0] if grown else None}
    return sizes


def _listeners(pid: int, port: int) -> int:
    """How many processes of `pid`'s tree listen on `port` (each SO_REUSEPORT worker does)."""
    count = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for c in process.net_connections(kind="tcp")
            ):
                count += 1
    return count


async def workers_phase(
    processes: Processes,
    session: aiohttp.ClientSession,
    running: Running,
    workdir: Path,
    script: Path,
    options: Options,
    retries: Retries,
) -> dict[str, Any]:
    """PROXY_WORKERS=2 against =1, both unpinned, at the largest connection count; "n/a" when
    the proxy does not start a second listening process for it (or fails to start)."""
    stack = running.stack
    started: list[subprocess.Popen[bytes]] = []
    upstream_url = running.upstream_urls["http"]
    try:
        routes: dict[str, Route] = {}
        for workers in ("2", "1"):
            process, url = _start_proxy(
                processes,
                options.proxy_python,
                stack.pinning.anywhere,
                running.base_env,
                upstream_url,
                workdir / f"proxy-workers-{workers}.log",
                {"PROXY_WORKERS": workers},
            )
            started.append(process)
            await wait_healthy(session, url + "/health", process)
            await wait_accepting(int(url.rsplit(":", 1)[1]), process)
            await asyncio.sleep(WORKERS_SETTLE_SECONDS)
            listeners = _listeners(process.pid, int(url.rsplit(":", 1)[1]))
            if workers == "2" and listeners < 2:
                return {
                    "status": "n/a",
                    "reason": f"PROXY_WORKERS=2: {listeners} listening process(es), "
                    f"{process_count(process.pid)} process(es) in all: not supported",
                }
            routes[workers] = Route(f"proxy-workers-{workers}", url, process.pid)
        result = await measure_workers(
            processes,
            stack,
            script,
            {"1": routes["1"], "2": routes["2"]},
            connections=max(options.connections),
            seconds=options.seconds,
            warmup_seconds=options.warmup_seconds,
            rounds=options.rounds,
            between_runs=running.collect_logs,
            retries=retries,
        )
        return {"status": "measured", "connections": max(options.connections)} | result
    except Exception as exc:  # optional phase: report why, never fail the bench for it
        return {"status": "n/a", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        for process in started:
            processes.stop(process)


async def bench(options: Options, processes: Processes, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    build = proxy_build(options.proxy_python)
    pinning = cpu_pinning()
    open_files = raise_open_files_limit()
    ca = CertificateAuthority.create()
    # The driver's own requests (health, stats, release, the upload) close their connection:
    # an idle keep-alive one would take one of the proxy's PROXY_MAX_CONNECTIONS from the
    # 1,000 streams.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with EntraStandIn(ca) as entra, aiohttp.ClientSession(connector=connector) as session:
        running = await start_stack(processes, pinning, workdir, entra, ca, options)
        stack = running.stack
        ready = {
            name: await wait_healthy(
                session, stack.routes[name]["proxy"].url + "/health", running.proxies[name]
            )
            for name in PROXY_NAMES
        }
        meter = CpuMeter(stack.pids)
        rest_mb = await settled_rss(running.proxies["http"].pid)
        nginx_rest_mb = await settled_rss(stack.nginx_pid)
        rest_anonymous_mb = anonymous_mb(running.proxies["http"].pid)
        nginx_rest_anonymous_mb = anonymous_mb(stack.nginx_pid)
        token_sizes = await proxy_token_bytes(session, running)
        script = wrk_script(workdir / "post.lua")
        retries = Retries(options.retry_budget)

        _progress("sequential latency")
        latency = await measure_latency(
            processes, stack, count=options.latency_count, warmup=options.latency_warmup
        )
        running.collect_logs()
        _progress("throughput with wrk (HTTP and HTTPS upstream)")
        throughput = await measure_throughput(
            processes,
            stack,
            script,
            connections=options.connections,
            seconds=options.seconds,
            warmup_seconds=options.warmup_seconds,
            rounds=options.rounds,
            between_runs=running.collect_logs,
            retries=retries,
        )
        _progress("timed SSE streams")
        sse = await measure_sse(
            processes,
            stack,
            streams=options.sse_streams,
            events=options.sse_events,
            interval_ms=options.sse_interval_ms,
        )
        _progress(f"{options.upload_mb} MB upload")
        upload = await measure_upload(session, stack, megabytes=options.upload_mb)
        streams = []
        for round_index in range(options.stream_rounds):
            _progress(f"{options.streams} SSE streams, round {round_index + 1}")
            streams.append(await measure_streams(session, stack, count=options.streams))
        credentials = await upstream_stats(session, stack)
        running.collect_logs()
        workers: dict[str, Any] = {"status": "skipped (--no-workers)"}
        if options.workers:
            _progress("PROXY_WORKERS=2 vs 1")
            workers = await workers_phase(
                processes, session, running, workdir, script, options, retries
            )
        running.collect_logs()
        noise = meter.foreign()
        token_requests = entra.token_requests
    for keeper_name in ("workers-1", "workers-2"):
        log = workdir / f"proxy-{keeper_name}.log"
        if log.exists():
            keeper = LogKeeper(log, is_access_line)
            keeper.collect()
            running.proxy_logs[keeper_name] = keeper
    nginx_logs = {name: nginx_errors(workdir / name) for name in ("nginx-relay", "nginx-upstream")}
    proxy_log = [line for keeper in running.proxy_logs.values() for line in keeper.kept]
    PROXY_LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    PROXY_LOG_FILE.write_text(
        "".join(
            f"[{name}] {line}\n"
            for name, keeper in running.proxy_logs.items()
            for line in keeper.kept
        )
    )
    results: dict[str, Any] = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "nginx": nginx_version(),
            "open_files_limit": open_files,
        },
        "setup": {
            "load_generator": "wrk -t1 (throughput), bench/latency.py http.client (latency), "
            "bench/sse.py http.client (timed SSE)",
            "pinning": pinning.description,
            "proxy_log_level": options.proxy_log_level,
            "proxy_build": build,
            "upstream": "nginx `return 200` (1 worker, access log off) over HTTP and HTTPS for "
            "throughput and latency; bench/upstream.py (aiohttp) for SSE and uploads",
            "nginx_relay": "1 worker, proxy_pass to a keep-alive pool (256), Authorization "
            "replaced by a bearer token, api-key removed, access_log buffer=64k, "
            "proxy_ssl_verify on + proxy_ssl_session_reuse on; proxy_buffering off and "
            "proxy_request_buffering off on the streams port",
            "response_bytes": len(COMPLETION_BODY),
            "nginx_token_bytes": len(running.nginx_token),
        },
        "options": asdict(options),
        "proxy_ready_seconds": ready,
        "rest_mb": rest_mb,
        "nginx_rest_mb": nginx_rest_mb,
        "rest_anonymous_mb": rest_anonymous_mb,
        "nginx_rest_anonymous_mb": nginx_rest_anonymous_mb,
        "token_requests": token_requests,
        "authorization": token_sizes,
        "credentials_at_streams_upstream": {
            k: credentials[k] for k in ("authorization_bytes", "api_key")
        },
        "latency": latency,
        "throughput": throughput,
        "sse": sse,
        "upload": upload,
        "streams": streams,
        "workers": workers,
        "noise": noise,
        "retried_runs": retries.used,
        "access_lines": {
            "nginx": running.nginx_access.access_lines,
            **{name: keeper.access_lines for name, keeper in running.proxy_logs.items()},
        },
        "nginx_error_logs": nginx_logs,
        "proxy_log_lines": len(proxy_log),
        "proxy_log_lines_dropped": sum(k.dropped for k in running.proxy_logs.values()),
        "proxy_log_summary": summarize_log(proxy_log),
        "duration_seconds": time.monotonic() - started,
    }
    results["targets"] = evaluate_targets(results)
    return results


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
            for log in sorted([*workdir.glob("*.log"), *workdir.glob("nginx-*/error.log")]):
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
