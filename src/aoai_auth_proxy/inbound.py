"""What may use the proxy: soundly framed requests, the inbound key, the right Host names."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import parse_keys
from .errors import (
    BadFraming,
    HeadersTooLarge,
    MisdirectedHost,
    ProxyError,
    Unauthorized,
    UnsupportedCoding,
)
from .identity import SecretSource

log = logging.getLogger(__name__)

# A key file is looked at no more than this often (a stat per second, not per request).
RELOAD_INTERVAL_SECONDS = 1.0


class InboundKeys:
    """The accepted keys; a key file is re-read when it changes, keeping the last good keys
    if the new content is unusable."""

    def __init__(
        self, source: SecretSource, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._source = source
        self._clock = clock
        self._keys = tuple(k.encode() for k in parse_keys(source.read()))
        self._checked = clock()
        self._stamp = self._file_stamp()

    def accepts(self, presented: str | None) -> bool:
        """Constant time in the key's content: every configured key is compared."""
        if presented is None:
            return False
        self._maybe_reload()
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._source.path is None:
            return None
        try:
            stat = self._source.path.stat()  # follows the ..data symlink of a Secret volume
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_ino

    def _maybe_reload(self) -> None:
        if self._source.path is None or self._clock() - self._checked < RELOAD_INTERVAL_SECONDS:
            return
        self._checked = self._clock()
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = tuple(k.encode() for k in parse_keys(self._source.read()))
        except ValueError as exc:
            log.warning(
                "inbound key file changed but cannot be used, keeping the old keys: %s", exc
            )
            return
        self._keys = keys
        log.info("inbound key file changed: %d key(s) accepted", len(keys))


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key a client sent: `api-key`, or `Authorization: Bearer` (what LiteLLM, Rasa and the
    openai SDK send with their `api_key` setting)."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "api-key":
            return value.strip()
        if lowered == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def key_problem(keys: InboundKeys, headers: Iterable[tuple[str, str]]) -> ProxyError | None:
    """401 unless the request carries a key `keys` accepts."""
    if keys.accepts(presented_key(headers)):
        return None
    return Unauthorized(
        "Missing or wrong key for this proxy: send the PROXY_API_KEY value as the "
        "api-key header or as Authorization: Bearer"
    )


@dataclass(frozen=True)
class InboundRules:
    """Who may use the proxy port: Host names (None: any) and keys (None: no key needed)."""

    hosts: frozenset[str] | None
    keys: InboundKeys | None


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_host_names(
    configured: frozenset[str] | None, *, loopback_only: bool
) -> frozenset[str] | None:
    """Names the Host header may carry; None: any. A proxy bound to loopback answers to
    loopback names only by default, so a web page whose DNS name was rebound to 127.0.0.1
    cannot drive it from a browser on the same machine (DNS rebinding)."""
    if configured is not None:
        return configured | LOOPBACK_NAMES
    return LOOPBACK_NAMES if loopback_only else None


def host_problem(allowed: frozenset[str], host_header: str) -> ProxyError | None:
    """400 when the Host header names something `allowed` does not hold."""
    name = host_name(host_header)
    # An absent Host (HTTP/1.0) is no rebinding risk: browsers always send one.
    if not name or name in allowed or _is_loopback_ipv4(name):
        return None
    return MisdirectedHost(
        "This proxy does not answer to that Host name; list it in PROXY_ALLOWED_HOSTS "
        "if it is meant to"
    )


def _is_loopback_ipv4(name: str) -> bool:
    """A dotted-quad literal in 127.0.0.0/8. Only a literal: `127.evil.example` or
    `127.0.0.1.nip.io` are DNS names an attacker can rebind (RFC 6761 6.3 reserves only
    `localhost`)."""
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


# Past the parser's own limits (8190 bytes a line, 128 fields) a request could still carry
# 1 MiB of headers; Azure OpenAI needs a few KiB.
MAX_HEADER_BYTES = 64 * 1024


def framing_problem(
    version: tuple[int, int], headers: Iterable[tuple[bytes, bytes]]
) -> ProxyError | None:
    """Why a request's framing cannot be trusted or forwarded, if it cannot (RFC 9112 6.1)."""
    if version < (1, 0):
        return BadFraming("HTTP/0.9 requests are not accepted")
    total = 0
    codings: list[bytes] = []
    for name, value in headers:
        total += len(name) + len(value) + 4
        if name.lower() == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
    if total > MAX_HEADER_BYTES:
        return HeadersTooLarge(f"Request headers exceed {MAX_HEADER_BYTES} bytes")
    if codings and version < (1, 1):
        # "A server that receives ... Transfer-Encoding in an HTTP/1.0 message MUST treat
        # the message as if the framing is faulty" (RFC 9112 6.1).
        return BadFraming("Transfer-Encoding in an HTTP/1.0 request")
    if codings and (codings[-1] != b"chunked" or codings.count(b"chunked") > 1):
        # RFC 9112 6.3: when chunked is not the final coding the body's length cannot be
        # determined: 400 and close. Chunked applies once (RFC 9112 7).
        return BadFraming("Transfer-Encoding must end with chunked, applied once")
    if codings and codings != [b"chunked"]:
        # Transfer-Encoding is hop by hop: forwarding would silently drop the coding.
        return UnsupportedCoding("Only the chunked transfer coding is accepted")
    return None
