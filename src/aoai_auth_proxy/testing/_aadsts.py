"""Entra's error answers: a refused token request, its AADSTS code, and the JSON body."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Failure:
    """One token request answered with an error, in Entra's JSON shape."""

    status: int
    error: str
    code: int
    message: str


class Rejected(Exception):
    """Raised anywhere in a token request's checks; the handler answers with `failure`."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def reject(status: int, error: str, code: int, message: str) -> Rejected:
    return Rejected(Failure(status, error, code, message))


def invalid_client(code: int, message: str) -> Rejected:
    """The common case: 401 `invalid_client`, how Entra refuses a client's credential."""
    return reject(401, "invalid_client", code, message)


def timestamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def describe_time(value: object) -> str:
    return timestamp(value) if isinstance(value, int | float) else repr(value)


def correlation_id(sent: str | None) -> str:
    """Entra echoes the client's `client-request-id` as the correlation id when it is a GUID."""
    if sent is not None:
        try:
            return str(uuid.UUID(sent))
        except ValueError:
            pass
    return str(uuid.uuid4())


def error_response(request: web.Request, failure: Failure, authority: str) -> web.Response:
    """Entra's error body: azure-identity puts `error_description` in its exception."""
    trace_id = str(uuid.uuid4())
    correlation = correlation_id(request.headers.get("client-request-id"))
    now = timestamp(time.time())
    description = (
        f"AADSTS{failure.code}: {failure.message}\r\nTrace ID: {trace_id}\r\n"
        f"Correlation ID: {correlation}\r\nTimestamp: {now}"
    )
    body = {
        "error": failure.error,
        "error_description": description,
        "error_codes": [failure.code],
        "timestamp": now,
        "trace_id": trace_id,
        "correlation_id": correlation,
        "error_uri": f"{authority}/error?code={failure.code}",
    }
    return web.json_response(
        body,
        status=failure.status,
        headers={"x-ms-request-id": trace_id, "Cache-Control": "no-store, no-cache"},
    )
