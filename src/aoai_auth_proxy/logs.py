"""Logging: text or JSON lines on stderr, and one access line per request without secrets."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .forwarding import redact_target

ACCESS_LOGGER = "aoai_auth_proxy.access"


@dataclass
class UpstreamTiming:
    """What the relay learns about one request's upstream leg, for its access line."""

    ttfb: float | None = None  # seconds until the upstream's status line and headers
    request_id: str | None = None  # apim-request-id or x-request-id
    error: str | None = None  # how the upstream broke off mid-response, if it did


UPSTREAM_TIMING = web.RequestKey("upstream_timing", UpstreamTiming)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with fixed keys, plus the access fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log is replaced by AccessLogger. azure-core logs every token
    # request's headers at INFO: our own token events say what matters, without them.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("azure").setLevel(logging.WARNING)


class AccessLogger(AbstractAccessLogger):
    """method, path (credential parameters removed), status, bytes, duration, upstream timing."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        upstream = request.get(UPSTREAM_TIMING) or UpstreamTiming()
        ttfb = upstream.ttfb
        fields: dict[str, Any] = {
            "method": request.method,
            "path": redact_target(request.raw_path),
            "status": response.status,
            "bytes_out": response.body_length,
            "duration_ms": round(time * 1000, 1),
            "upstream_ttfb_ms": round(ttfb * 1000, 1) if ttfb is not None else None,
            "upstream_request_id": upstream.request_id,
        }
        if upstream.error:
            fields["upstream_error"] = upstream.error
        text = " ".join(
            f"{key}={value}"
            for key, value in fields.items()
            if key not in ("method", "path") and value is not None
        )
        self.logger.info(
            "%s %s %s", fields["method"], fields["path"], text, extra={"access": fields}
        )
