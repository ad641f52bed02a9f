"""Log formatting and the proxy's own error bodies."""

from __future__ import annotations

import io
import itertools
import json
import logging

import pytest

from aoai_auth_proxy.errors import BadGateway, BadRequest, GatewayTimeout, NoValidToken
from aoai_auth_proxy.logs import (
    ACCESS_LOGGER,
    TEXT_FORMAT,
    BufferedAccessHandler,
    JsonFormatter,
    UpstreamTiming,
    access_line,
    info_enabled,
)


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


def test_json_log_lines_have_fixed_keys_and_the_access_fields() -> None:
    record = logging.LogRecord("aoai_auth_proxy.access", logging.INFO, "f", 1, "GET /x", (), None)
    record.access = {"method": "GET", "path": "/x", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info"
    assert line["logger"] == "aoai_auth_proxy.access"
    assert line["message"] == "GET /x"
    assert line["status"] == 200
    assert line["time"].endswith("Z")


def _access_lines(handler: logging.Handler, logger_name: str) -> list[str]:
    """One access line written through `handler`, as `access_line` writes it."""
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    timing = UpstreamTiming(ttfb=0.0123, request_id="req-1", replayed=True)
    access_line(
        logger,
        "POST",
        "/openai/deployments/d/chat/completions?api-version=1&api-key=secret",
        200,
        bytes_in=12,
        bytes_out=345,
        seconds=0.0456,
        upstream=timing,
    )
    handler.flush()
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_the_buffered_access_line_reads_exactly_as_the_logging_formatter_writes_it(
    json_lines: bool,
) -> None:
    formatter = JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)
    fast = BufferedAccessHandler(json_lines=json_lines)
    fast.setFormatter(formatter)
    slow = logging.StreamHandler()
    slow.setFormatter(formatter)
    try:
        (fast_line,) = _access_lines(fast, ACCESS_LOGGER)
    finally:
        fast.close()
        logging.getLogger(ACCESS_LOGGER).handlers[:] = []
    (slow_line,) = _access_lines(slow, ACCESS_LOGGER)
    logging.getLogger(ACCESS_LOGGER).handlers[:] = []
    assert "secret" not in fast_line
    if json_lines:
        fast_entry, slow_entry = json.loads(fast_line), json.loads(slow_line)
        assert fast_entry.pop("time")[:17] == slow_entry.pop("time")[:17]  # to the minute
        assert fast_entry == slow_entry
    else:
        # "2026-11-30 18:00:23,207 INFO aoai_auth_proxy.access: POST /openai/... status=200 ..."
        assert fast_line[:16] == slow_line[:16]
        assert fast_line[23:] == slow_line[23:]
        assert fast_line[19] == ","
        assert fast_line[20:23].isdigit()


@pytest.mark.parametrize("seconds", [0.0, 0.00004, 0.00005, 0.0456, 0.1, 1.0, 12.34567, 3600.0])
def test_milliseconds_in_a_text_line_read_as_the_json_number(seconds: float) -> None:
    # Text lines write whole tenths as digits; JSON lines carry the float: both say the same.
    logger = logging.getLogger("test-access-ms")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines = {}
    for json_lines in (False, True):
        handler = BufferedAccessHandler(json_lines=json_lines)
        handler.setStream(stream := io.StringIO())
        logger.handlers[:] = [handler]
        timing = UpstreamTiming(ttfb=seconds / 2)
        try:
            access_line(
                logger, "GET", "/x", 200, bytes_in=0, bytes_out=0, seconds=seconds, upstream=timing
            )
            handler.flush()
        finally:
            handler.close()
            logger.handlers[:] = []
        lines[json_lines] = stream.getvalue()
    entry = json.loads(lines[True])
    assert f"duration_ms={entry['duration_ms']!r} " in lines[False]
    assert f"upstream_ttfb_ms={entry['upstream_ttfb_ms']!r}\n" in lines[False]
    assert entry["duration_ms"] == int(seconds * 10_000 + 0.5) / 10


LEVELS = (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING)


def test_info_enabled_decides_as_the_stdlib_does() -> None:
    # access_line asks info_enabled for every request instead of Logger.isEnabledFor: the two
    # must agree for every mix of levels on the logger, its parent and the root, a disabled
    # logger, and logging.disable(), applied one after another (each clears the memo).
    root = logging.getLogger()
    parent = logging.getLogger("test-info-enabled")
    child = logging.getLogger("test-info-enabled.access")
    saved = root.level
    try:
        for own, above, top, disabled, cut in itertools.product(
            LEVELS, LEVELS, LEVELS, (False, True), LEVELS
        ):
            child.setLevel(own)
            parent.setLevel(above)
            root.setLevel(top)
            child.disabled = disabled
            logging.disable(cut)
            case = (own, above, top, disabled, cut)
            # Twice: the first may fill the stdlib's memo, the second reads it.
            assert info_enabled(child) is child.isEnabledFor(logging.INFO), case
            assert info_enabled(child) is child.isEnabledFor(logging.INFO), case
    finally:
        logging.disable(logging.NOTSET)
        child.disabled = False
        child.setLevel(logging.NOTSET)
        parent.setLevel(logging.NOTSET)
        root.setLevel(saved)
