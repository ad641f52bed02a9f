"""nginx in the bench: the fast static upstream, and the reference relay the proxy is held to.

Both run as non-daemon children (master plus one worker) under their own prefix in the bench's
temporary directory, configured here, listening on 127.0.0.1 only:

- the upstream answers every request with the fixed 600-byte chat completion (`return 200`),
  over HTTP and HTTPS (the bench's test CA). Its "relayed" ports refuse a request that still
  carries `api-key` (400) or lacks a bearer token of real size (401), so a relay that skips
  that work shows up as errors, not as speed;
- the relay does what the proxy does for a request: `proxy_pass` to a keep-alive pool, swap the
  client's credential for `Authorization: Bearer <~1.5 KB token>`, one buffered access-log line
  per request, TLS to the upstream verified against the test CA with session reuse, and no
  buffering on the port that relays streams and uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from harness import READY_TIMEOUT_SECONDS, Processes

# Requests per connection before nginx closes it (default 1000), inbound and in the pools: never
# during a run, as the proxy never closes a busy keep-alive connection either.
_KEEPALIVE_REQUESTS = 100_000_000
# A bearer token of real size: the upstream's relayed ports accept nothing shorter.
MIN_TOKEN_BYTES = 1000
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise RuntimeError("nginx is not installed: `make bench` installs it (apt nginx-light)")
    return found


def nginx_version() -> str:
    completed = subprocess.run(
        [nginx_binary(), "-v"], capture_output=True, text=True, check=False, timeout=10
    )
    return (completed.stderr or completed.stdout).strip().removeprefix("nginx version: ")


@dataclass(frozen=True)
class StaticRoute:
    """A port of the upstream nginx."""

    port: int
    tls: bool
    check_credentials: bool  # refuse a request that was not relayed with a token


@dataclass(frozen=True)
class RelayRoute:
    """A port of the relay nginx and the upstream port it relays to."""

    port: int
    upstream_port: int
    tls: bool
    streaming: bool  # SSE and uploads: no response or request buffering, no body size limit


def _main_block(prefix: Path) -> list[str]:
    lines = [
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        # Below the open-files limit the bench raised to its hard limit (nginx may not exceed
        # it: worker_rlimit_nofile fails without CAP_SYS_RESOURCE).
        "events { worker_connections 8192; }",
    ]
    if os.geteuid() == 0:  # otherwise workers would run as nobody, shut out of the temp dir
        lines.insert(0, "user root;")
    return lines


def _http_common(prefix: Path) -> list[str]:
    version = subprocess.run(
        [nginx_binary(), "-V"], capture_output=True, text=True, check=False, timeout=10
    ).stderr
    temp_paths = [
        f"{name}_temp_path {prefix / (name + '_temp')};"
        for name in _TEMP_PATHS
        if f"--without-http_{name}_module" not in version
    ]
    return [
        *(f"  {line}" for line in temp_paths),
        "  access_log off;",
        f"  keepalive_requests {_KEEPALIVE_REQUESTS};",
        "  keepalive_timeout 300s;",
        "  server_tokens off;",
    ]


def _quoted(text: str) -> str:
    if any(c in text for c in "'\\$\n"):
        raise ValueError("the text cannot be put in an nginx string as it is")
    return f"'{text}'"


def static_upstream_config(
    prefix: Path,
    routes: Sequence[StaticRoute],
    *,
    body: bytes,
    certificate_file: Path,
    key_file: Path,
) -> str:
    lines = [*_main_block(prefix), "http {", *_http_common(prefix)]
    lines += [
        "  map $http_authorization $bench_token_ok {",
        "    default 0;",
        f'    "~^Bearer [A-Za-z0-9._-]{{{MIN_TOKEN_BYTES},}}$" 1;',
        "  }",
        f"  ssl_certificate {certificate_file};",
        f"  ssl_certificate_key {key_file};",
        "  ssl_session_cache shared:bench:1m;",
    ]
    for route in routes:
        lines += [
            "  server {",
            f"    listen 127.0.0.1:{route.port}{' ssl' if route.tls else ''} backlog=4096;",
        ]
        if route.check_credentials:
            lines += [
                "    if ($http_api_key) { return 400 'api-key reached the upstream'; }",
                "    if ($bench_token_ok = 0) { return 401 'no bearer token of real size'; }",
            ]
        lines += [
            "    location / {",
            "      default_type application/json;",
            f"      return 200 {_quoted(body.decode())};",
            "    }",
            "  }",
        ]
    return "\n".join([*lines, "}", ""])


def relay_config(
    prefix: Path,
    routes: Sequence[RelayRoute],
    *,
    token: str,
    ca_file: Path,
    access_log: Path,
    pool_size: int = 256,
) -> str:
    lines = [*_main_block(prefix), "http {", *_http_common(prefix)]
    lines.append(
        "  log_format bench '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent '"
        " '$request_time $upstream_response_time $upstream_status';"
    )
    for route in routes:
        lines += [
            f"  upstream bench_{route.port} {{",
            f"    server 127.0.0.1:{route.upstream_port};",
            f"    keepalive {pool_size};",
            f"    keepalive_requests {_KEEPALIVE_REQUESTS};",
            "    keepalive_timeout 300s;",
            "  }",
        ]
    for route in routes:
        scheme = "https" if route.tls else "http"
        lines += [
            "  server {",
            f"    listen 127.0.0.1:{route.port} backlog=4096;",
            f"    access_log {access_log} bench buffer=64k;",
            "    location / {",
            f"      proxy_pass {scheme}://bench_{route.port};",
            "      proxy_http_version 1.1;",
            '      proxy_set_header Connection "";',
            f"      proxy_set_header Host 127.0.0.1:{route.upstream_port};",
            f'      proxy_set_header Authorization "Bearer {token}";',
            '      proxy_set_header api-key "";',
            "      proxy_read_timeout 600s;",
        ]
        if route.tls:
            lines += [
                f"      proxy_ssl_trusted_certificate {ca_file};",
                "      proxy_ssl_verify on;",
                "      proxy_ssl_verify_depth 2;",
                "      proxy_ssl_name localhost;",  # nginx checks DNS names, not IP SANs
                "      proxy_ssl_server_name on;",
                "      proxy_ssl_session_reuse on;",
            ]
        if route.streaming:
            lines += [
                "      proxy_buffering off;",
                "      proxy_request_buffering off;",
                "      client_max_body_size 0;",
            ]
        lines += ["    }", "  }"]
    return "\n".join([*lines, "}", ""])


@dataclass(frozen=True)
class Nginx:
    """A running nginx: its master process and its one worker."""

    name: str
    master: subprocess.Popen[bytes]
    worker_pid: int
    prefix: Path


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def start_nginx(
    processes: Processes,
    pin: Sequence[str],
    name: str,
    prefix: Path,
    config: str,
    ports: Sequence[int],
    *,
    log_dir: Path,
) -> Nginx:
    """Start nginx with `config`; returns once every port accepts and its worker is up."""
    config_file = _write_config(prefix, config)
    master = processes.start(
        [
            *pin,
            nginx_binary(),
            "-p",
            f"{prefix}/",
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(config_file),
        ],
        log=log_dir / f"{name}.log",
    )
    started = time.monotonic()
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            while True:
                if master.poll() is not None:
                    break
                workers = _workers(master.pid)
                if workers and all(_accepting(port) for port in ports):
                    return Nginx(name, master, workers[0], prefix)
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    error_log = prefix / "error.log"
    detail = error_log.read_text(errors="replace")[-2000:] if error_log.exists() else ""
    raise RuntimeError(
        f"{name} (nginx) not ready after {time.monotonic() - started:.1f} s "
        f"(exit status {master.poll()}):\n{detail}"
    )


def _write_config(prefix: Path, config: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    config_file = prefix / "nginx.conf"
    config_file.write_text(config)
    return config_file


def _workers(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children()]
    return []
