"""The command line: `serve` (default), `check` and `demo`; signals and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, cast

import uvloop

from .config import Settings, load_settings
from .credentials import RefreshingTokenSource, iso_utc
from .errors import ConfigError, TokenAcquisitionError
from .identity import CredentialKind
from .logs import configure_logging
from .outbound import client_ssl_context
from .server import ProxyServer
from .signin import EntraTokenFetcher
from .workers import supervise

log = logging.getLogger("aoai_auth_proxy")

# Exit codes, as cloud-sql-proxy types them: 0 clean stop, 1 runtime failure, 2 bad configuration.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
_SUPERVISOR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aoai-auth-proxy",
        description="Authentication sidecar for Azure OpenAI (Microsoft Entra ID tokens).",
        epilog="Configuration comes from environment variables; see README.md.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the proxy (the default)")
    commands.add_parser(
        "check", help="validate the configuration and acquire one token, then exit 0 or 1"
    )
    demo_parser = commands.add_parser(
        "demo", help="run the proxy against local Entra and Azure OpenAI stand-ins"
    )
    demo_parser.add_argument(
        "--port", type=int, default=None, help="proxy port (default: PORT, else 8080)"
    )
    args = parser.parse_args(argv)
    environ = os.environ if env is None else env

    if args.command == "demo":
        port = args.port if args.port is not None else int(environ.get("PORT") or 8080)
        configure_logging("INFO")
        return _run(demo(port))

    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        print("aoai-auth-proxy: configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG

    if args.command == "check":
        configure_logging("WARNING", settings.log_format)
        return asyncio.run(check(settings))
    if settings.workers > 1:
        # Each worker configures its own logging after the fork (the access-log flusher is
        # a thread, and threads do not survive a fork).
        logging.basicConfig(level=settings.log_level, format=_SUPERVISOR_FORMAT)
        return supervise(settings.workers, lambda _: _serve_configured(settings))
    return _serve_configured(settings)


def _serve_configured(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    return _run(serve(settings))


# How often freed heap memory is given back to the system (glibc's malloc_trim).
TRIM_INTERVAL_SECONDS = 1.0


def heap_trimmer() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3), or None off glibc (musl, macOS).

    Why: bodies of a few MB pass through the heap, in pieces of up to 64 KiB (readbuffer.py)
    and in whatever a transport queues for a slow peer, and glibc keeps what is freed in the
    middle of its heap. malloc_trim returns free pages anywhere in the heap (madvise); once a
    second it costs about 12 us when there is nothing to return. Measured when reads still
    came as objects of up to 256 KiB: after a 90-second soak (tests/soak) the quiet-point
    RSS was 113 MB without this and 88 MB with it; a fixed mmap threshold (mallopt
    M_MMAP_THRESHOLD 128 KiB) kept it at 86 MB but made every TLS read an mmap, mremap and
    munmap: HTTPS throughput fell from 0.56x to 0.43x nginx."""
    import ctypes  # only here: 0.4 MB, for one function

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return None
    return cast(Callable[[int], int], trim)


async def return_freed_memory(trim: Callable[[int], int], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        trim(0)


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop: libuv's event loop makes the raw relay's sockets about twice as cheap
    (issue 8). The tests run the same code on asyncio's own loop as well."""
    return uvloop.run(main)


async def check(settings: Settings) -> int:
    """Print who we are, what we ask for and until when the token is valid; never the token."""
    identity = settings.identity
    fetcher = EntraTokenFetcher(settings, client_ssl_context(settings.ca_file))
    print(f"credential:   {identity.kind.value}")
    print(f"client id:    {identity.client_id or '(system-assigned managed identity)'}")
    if identity.kind is not CredentialKind.MANAGED_IDENTITY:
        print(f"tenant id:    {identity.tenant_id}")
        print(f"authority:    {settings.authority_host}")
    print(f"scope:        {settings.scope}")
    if identity.kind is CredentialKind.CERTIFICATE:
        certificate = fetcher.certificate()
        print(f"certificate:  {certificate.path} ({certificate.subject})")
        print(f"  thumbprint: {certificate.thumbprint_sha1} (SHA-1)")
        days = (certificate.not_after - dt.datetime.now(dt.UTC)).days
        soon = "  <- renew it now" if certificate.expires_soon() else ""
        print(f"  expires:    {certificate.not_after.isoformat()} (in {days} days){soon}")
        if identity.send_certificate_chain:
            print(f"  chain:      sent as x5c ({len(certificate.chain)} issuer(s) in the file)")
    elif identity.kind is CredentialKind.SECRET and identity.client_secret:
        source = identity.client_secret.path or "AZURE_CLIENT_SECRET"
        print(f"secret:       from {source}")
    elif identity.kind is CredentialKind.WORKLOAD_IDENTITY:
        print(f"token file:   {identity.federated_token_file}")
    print(f"upstream:     {settings.api_base_url}")
    tokens = RefreshingTokenSource(fetcher, fetch_timeout=settings.token_timeout)
    try:
        token = await tokens.refresh()
    except TokenAcquisitionError as exc:
        print(f"token:        FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    remaining = token.expires_on - time.time()
    print(f"token:        OK, expires {iso_utc(token.expires_on)} (in {remaining:.0f} s)")
    return EXIT_OK


async def demo(port: int) -> int:
    """The proxy against local Entra and Azure OpenAI stand-ins: no Azure account needed."""
    from .testing.demo import demo_environment  # the stand-ins load only for the demo

    async with demo_environment(port=port) as env:
        return await serve(load_settings(env), on_ready=_print_demo_usage)


def _print_demo_usage(url: str) -> None:
    print(
        f"""
aoai-auth-proxy demo: the proxy listens on {url}, with a token from the local Entra stand-in,
forwarding to the local Azure OpenAI stand-in. Try, from another terminal:

  curl -s {url}/health

  curl -s '{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21' \\
    -H 'Content-Type: application/json' -H 'api-key: anything' \\
    -d '{{"messages": [{{"role": "user", "content": "Hello through the proxy"}}]}}'

  .venv/bin/python -c 'from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{url}", api_key="dummy", api_version="2024-10-21")
  reply = client.chat.completions.create(model="gpt-4o",
      messages=[{{"role": "user", "content": "Hello from the openai SDK"}}])
  print(reply.choices[0].message.content)'

Ctrl-C stops the proxy and both stand-ins.
""",
        flush=True,
    )


async def serve(settings: Settings, *, on_ready: Callable[[str], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain (see server.py) and return the exit code.

    `on_ready(url)` is called once the listener is up and the first token is held."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed first, so a SIGTERM during start-up drains rather than killing the process;
    # left installed, so a second Ctrl-C during the bounded drain is absorbed.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _raise_open_file_limit()
    server = ProxyServer(settings)
    try:
        url = await server.start()
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", settings.host, settings.port, exc.strerror)
        return EXIT_FAILURE
    if warning := exposure_warning(settings):
        log.warning("%s", warning)
    log.info("listening on %s, forwarding to %s", url, settings.api_base_url)
    if server.admin_url:
        log.info("probes and /metrics also on %s", server.admin_url)
    log.info("signing in to Entra ID as %s", settings.identity.describe())
    if settings.identity.kind is CredentialKind.CERTIFICATE:
        certificate = settings.identity.load_certificate()
        expiring = "; it expires soon" if certificate.expires_soon() else ""
        log.log(
            logging.WARNING if expiring else logging.INFO,
            "certificate: %s%s",
            certificate.describe(),
            expiring,
        )
    trim = heap_trimmer()
    trimming = (
        asyncio.create_task(return_freed_memory(trim, TRIM_INTERVAL_SECONDS)) if trim else None
    )
    if on_ready is not None and await server.wait_ready(stop):
        on_ready(url)
    await stop.wait()
    if trimming is not None:
        trimming.cancel()
    await server.stop()
    log.info("stopped")
    return EXIT_OK


def exposure_warning(settings: Settings) -> str | None:
    """Why the listener is open to more than this pod, if it is."""
    if settings.binds_loopback_only or settings.api_keys is not None:
        return None
    return (
        f"listening on {settings.host}, which is not a loopback address, without "
        "PROXY_API_KEY: anyone who can reach it can spend this identity's Azure OpenAI quota"
    )


def _raise_open_file_limit() -> None:
    """Each connection can hold two descriptors; many systems start processes at 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
