"""Logging: text or JSON lines on stderr, and one access line per request without secrets."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from mypy_extensions import mypyc_attr

from .forwarding import redact_target

ACCESS_LOGGER = "aoai_auth_proxy.access"
# "000" to "999": a format spec in an f-string goes through str.format, which parses it anew
# for every access line.
_MILLIS = tuple(f"{n:03d}" for n in range(1000))
# NOT_NATIVE: this module is compiled by mypyc (hatch_build.py). A compiled class with a
# Python base (logging's, or an exception) would be a native class whose deallocation leaves
# weak references dangling (a crash when the collector next runs; mypy 2.4.1), and logging
# keeps weak references to every handler: such classes are marked to stay Python classes
# (their methods are compiled all the same). tests/unit/test_native.py finds any that is not.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UpstreamTiming:
    """What the relay learns about one request's upstream leg, for its access line.

    A plain class, not a dataclass: mypyc leaves a dataclass's generated `__init__` to the
    interpreter, and one of these is made for every request."""

    def __init__(
        self,
        *,
        ttfb: float | None = None,
        request_id: str | None = None,
        aborted: str | None = None,
        error_kind: str | None = None,
        replayed: bool = False,
    ) -> None:
        self.ttfb = ttfb  # seconds until the upstream's status line and headers
        self.request_id = request_id  # apim-request-id or x-request-id
        # Why a started response was cut: upstream:<code>, client_gone.
        self.aborted = aborted
        # connect, tls, timeout, reset or protocol: how the upstream failed.
        self.error_kind = error_kind
        # The upstream refused the token (401); renewed and sent again.
        self.replayed = replayed


@dataclass
class SessionStats:
    """What a WebSocket session did, for its access line and metrics."""

    frames_in: int = 0  # client -> upstream
    frames_out: int = 0  # upstream -> client
    close_code: int | None = None


@mypyc_attr(native_class=False)  # see NOT_NATIVE
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


class AccessLines:
    """The lines a BufferedAccessHandler holds until its next write. A native class (its
    fields are C struct members, read for every relayed request), with a lock of its own:
    the handler's flusher thread takes the lines while the event loop adds them."""

    def __init__(self, *, json_lines: bool, max_bytes: int) -> None:
        self.json_lines = json_lines
        self._max_bytes = max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""
        self._lock = threading.Lock()

    def add(self, line: str) -> bool:
        """Keep `line`; True when the block is full (the handler then writes it)."""
        lock = self._lock
        lock.acquire()
        try:
            self._lines.append(line)
            self._size += len(line)
            return self._size >= self._max_bytes
        finally:
            lock.release()

    def access(self, message: str, fields: dict[str, Any] | None) -> bool:
        """One access line, formatted here as the configured formatter would format its
        record (TEXT_FORMAT or JsonFormatter) without building a LogRecord: logging's record,
        caller lookup and formatter cost more than the rest of a relayed request. `fields`
        (the JSON keys) may be None for text lines. True when the block is full."""
        now = time.time()
        second = int(now)
        millis = int((now - second) * 1000)
        if self.json_lines:
            entry: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                + f".{_MILLIS[millis]}Z",
                "level": "info",
                "logger": ACCESS_LOGGER,
                "message": message,
            }
            if fields is not None:
                entry.update(fields)
            line = json.dumps(entry, separators=(",", ":")) + "\n"
        else:
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = f"{self._stamp},{_MILLIS[millis]} INFO {ACCESS_LOGGER}: {message}\n"
        return self.add(line)

    def take(self) -> str:
        """Every line kept so far, in order, as one text; none are kept after."""
        lock = self._lock
        lock.acquire()
        try:
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            return text
        finally:
            lock.release()


@mypyc_attr(native_class=False)  # see NOT_NATIVE
class BufferedAccessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Access lines written in blocks, as nginx's `access_log ... buffer=64k flush=1s`: one
    write per 64 KiB or per second instead of one per request. Flushed at exit
    (logging.shutdown), so a stopped proxy's log is complete; other lines are not delayed.
    access_line() adds its lines to `lines` directly."""

    def __init__(
        self, *, json_lines: bool = False, max_bytes: int = 64 * 1024, interval: float = 1.0
    ) -> None:
        super().__init__(sys.stderr)
        self.lines = AccessLines(json_lines=json_lines, max_bytes=max_bytes)
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_every, args=(interval,), name="access-log", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self.lines.add(line):
            self.flush()

    def flush(self) -> None:
        # Taken and written under the handler's lock: two flushes never reorder blocks.
        with self.lock or contextlib.nullcontext():
            text = self.lines.take()
            if text:
                self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        super().close()

    def _flush_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()


def configure_logging(level: str, fmt: str = "text") -> None:
    """One handler on stderr for the whole process, text or JSON lines; access lines are
    buffered (BufferedAccessHandler)."""
    handler = logging.StreamHandler(sys.stderr)
    access = BufferedAccessHandler(json_lines=fmt == "json")
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    access.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No record needs the process or thread: os.getpid() is a system call per log line.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    # Nor the caller's file and line, which logging finds by walking the stack for every
    # record; the documented switch is this module attribute (logging/__init__.py).
    logging._srcfile = None
    access_logger = logging.getLogger(ACCESS_LOGGER)
    access_logger.handlers[:] = [access]
    access_logger.propagate = False
    # azure-core logs every token request's headers at INFO: our own token events say what
    # matters, without them.
    logging.getLogger("azure").setLevel(logging.WARNING)
    # azure-identity repeats every failed fetch as a multi-line WARNING with Entra's whole
    # body; the proxy's own line carries the AADSTS message.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)


# nginx's code for "the client closed the connection before the response was complete".
CLIENT_CLOSED_REQUEST = 499


def info_enabled(logger: logging.Logger) -> bool:
    """`logger.isEnabledFor(logging.INFO)`, its fast path in compiled code: the stdlib's method
    (and `Manager.disable`, a property) are interpreted calls, and this runs for every request.

    It reads the memo isEnabledFor itself keeps (`Logger._cache`, CPython 3.7+, cleared by every
    setLevel and logging.disable); where that is missing or not yet filled it asks the method."""
    if logger.disabled:
        return False
    memo = getattr(logger, "_cache", None)
    if type(memo) is dict:
        known = memo.get(logging.INFO)
        if type(known) is bool:
            return known
    return logger.isEnabledFor(logging.INFO)


def access_line(
    logger: logging.Logger,
    method: str,
    raw_target: str,
    status: int,
    *,
    bytes_in: int,
    bytes_out: int | None,
    seconds: float,
    upstream: UpstreamTiming | None,
    session: SessionStats | None = None,
) -> None:
    """method, path (credentials removed), status, bytes, duration, upstream timing and id."""
    if not info_enabled(logger):
        return
    # Built directly rather than from a dict and a join: it runs for every request. The
    # JSON keys are built only for a JSON line (or a logger set up other than by
    # configure_logging), and milliseconds are written from whole tenths: a float's repr
    # goes through dtoa, a measurable part of the line.
    path = redact_target(raw_target)
    handlers = logger.handlers
    buffered: BufferedAccessHandler | None = None
    if (
        len(handlers) == 1
        and type(handlers[0]) is BufferedAccessHandler
        and not logger.filters
        and not handlers[0].filters
    ):
        buffered = handlers[0]  # as configure_logging set it up
    keyed = buffered is None or buffered.lines.json_lines
    duration = _tenths(seconds)
    text = f"status={status} bytes_in={bytes_in}"
    if bytes_out is not None:
        text += f" bytes_out={bytes_out}"
    text += f" duration_ms={duration // 10}.{duration % 10}"
    fields: dict[str, Any] | None = None
    if keyed:
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": duration / 10,
            "upstream_ttfb_ms": None,
            "upstream_request_id": None,
        }
    if upstream is not None:
        if upstream.ttfb is not None:
            ttfb = _tenths(upstream.ttfb)
            text += f" upstream_ttfb_ms={ttfb // 10}.{ttfb % 10}"
            if fields is not None:
                fields["upstream_ttfb_ms"] = ttfb / 10
        if upstream.request_id is not None:
            text += f" upstream_request_id={upstream.request_id}"
            if fields is not None:
                fields["upstream_request_id"] = upstream.request_id
        if upstream.aborted:
            text += f" aborted={upstream.aborted}"
            if fields is not None:
                fields["aborted"] = upstream.aborted
        if upstream.replayed:
            text += " replayed=True"
            if fields is not None:
                fields["replayed"] = True
    if session is not None:
        text += f" frames_in={session.frames_in} frames_out={session.frames_out}"
        if session.close_code is not None:
            text += f" close_code={session.close_code}"
        if fields is not None:
            fields["frames_in"] = session.frames_in
            fields["frames_out"] = session.frames_out
            fields["close_code"] = session.close_code
    if buffered is not None:
        if buffered.lines.access(f"{method} {path} {text}", fields):
            buffered.flush()
        return
    logger.info("%s %s %s", method, path, text, extra={"access": fields})


def _tenths(seconds: float) -> int:
    """Whole tenths of a millisecond, rounded half up (round(x, 1) goes through a decimal
    string, which was a measurable part of each request's access line)."""
    return int(seconds * 10_000 + 0.5)
