"""Probes: /health and /health/ready (token held, not draining) and /health/live (serving).

`http1.py` answers them, on the proxy port and on the admin port."""

from __future__ import annotations

from typing import Any

from .credentials import TokenStatus

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
