"""aiohttp's server glue: the middlewares and access logger for the requests it answers.

aiohttp's server answers only what `http1.py` hands it (WebSocket upgrades, CONNECT) and the
admin port. These middlewares apply the same rules, counts and lines as `http1.py` does, by
calling the same functions (`inbound`, `metrics`, `lifecycle`, `logs`). They live apart from
those modules so that the modules on the per-request path hold no aiohttp code and can be
compiled (issue 8: mypyc cannot give a compiled function the attribute `@web.middleware`
sets on it).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from .errors import ProxyError
from .forwarding import redact_target
from .inbound import InboundKeys, framing_problem, host_problem, key_problem
from .lifecycle import Lifecycle
from .logs import ACCESS_LOGGER, CLIENT_CLOSED_REQUEST, SessionStats, UpstreamTiming, access_line
from .metrics import Metrics

log = logging.getLogger("aoai_auth_proxy.app")

# What the relay and the WebSocket session learn about a request, kept on it for its access
# line and metrics.
UPSTREAM_TIMING = web.RequestKey("upstream_timing", UpstreamTiming)
SESSION_STATS = web.RequestKey("websocket_session", SessionStats)


@web.middleware
async def proxy_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the proxy's own errors into OpenAI-shaped JSON the SDKs surface."""
    try:
        return await handler(request)
    except ProxyError as exc:
        log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            redact_target(request.raw_path),
            exc.status,
            exc.code,
            exc.message,
        )
        response = web.Response(
            status=exc.status,
            body=exc.error_body(),
            content_type="application/json",
        )
        if exc.closes_connection:
            response.force_close()  # a request smuggled behind this one is never read
        return response


@web.middleware
async def require_sound_framing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what the HTTP parser lets through but a proxy must not forward."""
    problem = framing_problem((request.version.major, request.version.minor), request.raw_headers)
    if problem is not None:
        raise problem
    return await handler(request)


def require_host(allowed: frozenset[str]) -> Middleware:
    """Refuse with 400 a request whose Host header names something else."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if problem := host_problem(allowed, request.headers.get("Host", "")):
            raise problem
        return await handler(request)

    return check


def require_key(keys: InboundKeys, exempt: frozenset[str]) -> Middleware:
    """Refuse requests without an accepted key with 401; GET/HEAD probes of the paths in
    `exempt`, as sent (not percent-decoded: `/%68ealth` is forwarded), are open."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        probe = request.method in ("GET", "HEAD") and request.raw_path.partition("?")[0] in exempt
        if not probe and (problem := key_problem(keys, request.headers.items())):
            raise problem
        return await handler(request)

    return check


def track(lifecycle: Lifecycle) -> Middleware:
    """Counts each request from routing until its handler returns or is cancelled."""

    @web.middleware
    async def tracked(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        lifecycle.enter(task)
        try:
            return await handler(request)
        finally:
            lifecycle.leave(task)

    return tracked


def observe(metrics: Metrics, *, exempt: frozenset[str]) -> Middleware:
    """Observe every forwarded request (not the probes and /metrics in `exempt`)."""

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt:
            return await handler(request)
        deployment = metrics.deployment(request.path)
        started = time.monotonic()
        code = "500"
        streamed = False
        metrics.in_flight += 1
        try:
            response = await handler(request)
            code = str(response.status)
            streamed = response.content_type == "text/event-stream"
            return response
        except asyncio.CancelledError:
            code = "499"
            raise
        except web.HTTPException as exc:
            code = str(exc.status)
            raise
        finally:
            metrics.in_flight -= 1
            metrics.observe(
                request.method,
                deployment,
                code,
                time.monotonic() - started,
                streamed=streamed,
                timing=request.get(UPSTREAM_TIMING),
                session=request.get(SESSION_STATS),
            )

    return observed


@web.middleware
async def log_cancelled(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp writes no access line for a cancelled handler (client gone, or cut at the end of
    the shutdown grace period); this writes one, with status 499."""
    started = time.monotonic()
    try:
        return await handler(request)
    except asyncio.CancelledError:
        log_access(
            logging.getLogger(ACCESS_LOGGER),
            request,
            CLIENT_CLOSED_REQUEST,
            None,
            time.monotonic() - started,
        )
        raise


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this once a response has been sent."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log_access(self.logger, request, response.status, response.body_length, time)


def log_access(
    logger: logging.Logger,
    request: web.BaseRequest,
    status: int,
    bytes_out: int | None,
    seconds: float,
) -> None:
    """The access line of a request aiohttp's server answered."""
    access_line(
        logger,
        request.method,
        request.raw_path,
        status,
        bytes_in=request.content.total_bytes,
        bytes_out=bytes_out,
        seconds=seconds,
        upstream=request.get(UPSTREAM_TIMING),
        session=request.get(SESSION_STATS),
    )
