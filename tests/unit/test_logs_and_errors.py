"""Log formatting and the proxy's own error bodies."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from aoai_auth_proxy.errors import BadGateway, BadRequest, GatewayTimeout, NoValidToken
from aoai_auth_proxy.logs import JsonFormatter
from aoai_auth_proxy.relay import upstream_error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BadRequest("m"), 400, "invalid_request_target"),
        (BadGateway("m"), 502, "upstream_unreachable"),
        (NoValidToken("AADSTS700016: ..."), 503, "no_valid_token"),
        (GatewayTimeout("m"), 504, "upstream_timeout"),
    ],
)
def test_errors_are_openai_shaped_and_carry_their_status(
    error: BadRequest, status: int, code: str
) -> None:
    assert error.status == status
    assert json.loads(error.error_body()) == {
        "error": {"message": error.message, "type": "proxy_error", "code": code}
    }


def test_upstream_errors_are_mapped_in_one_place() -> None:
    url = "https://res.openai.azure.com/openai/x?api-key=never-shown"
    timeout = upstream_error(aiohttp.SocketTimeoutError("read"), url)
    assert isinstance(timeout, GatewayTimeout)
    gone = upstream_error(aiohttp.ServerDisconnectedError(), url)
    assert isinstance(gone, BadGateway)
    assert "closed the connection" in gone.message
    assert "never-shown" not in timeout.message + gone.message  # only the origin is named


def test_json_log_lines_have_fixed_keys_and_the_access_fields() -> None:
    record = logging.LogRecord("aoai_auth_proxy.access", logging.INFO, "f", 1, "GET /x", (), None)
    record.access = {"method": "GET", "path": "/x", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info"
    assert line["logger"] == "aoai_auth_proxy.access"
    assert line["message"] == "GET /x"
    assert line["status"] == 200
    assert line["time"].endswith("Z")
