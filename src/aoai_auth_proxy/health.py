"""Probes: /health and /health/ready (token held, not draining) and /health/live (serving)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .credentials import TokenSource, TokenStatus
from .lifecycle import Lifecycle

HEALTH_PATHS = frozenset({"/health", "/health/ready", "/health/live"})


def readiness(token: TokenStatus, *, draining: bool) -> tuple[int, dict[str, Any]]:
    """Status and body for /health: ready only with a usable token and while not draining."""
    if draining:
        return 503, {"status": "draining", "reason": "the proxy is shutting down"}
    if not token.ready:
        reason = token.last_error or "no Entra ID token acquired yet"
        return 503, {"status": "unavailable", "reason": reason}
    # Exactly the seed's body: existing probes and scripts compare it verbatim.
    return 200, {"status": "ok"}


def health_routes(token_source: TokenSource, lifecycle: Lifecycle) -> list[web.RouteDef]:
    async def ready(request: web.Request) -> web.Response:
        status, body = readiness(token_source.status(), draining=lifecycle.draining)
        return _json(status, body)

    async def live(request: web.Request) -> web.Response:
        # Independent of Entra and the upstream: restarting the pod would not fix either.
        return _json(200, {"status": "ok"})

    return [
        web.get("/health", ready, allow_head=True),
        web.get("/health/ready", ready, allow_head=True),
        web.get("/health/live", live, allow_head=True),
    ]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
