"""Settings: one frozen object built from the environment, every problem reported at once."""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from . import egress
from .errors import ConfigError
from .identity import Identity, SecretSource, load_identity

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
# Reasoning models can think for minutes before the first byte and between SSE events; this is
# an idle (between-bytes) timeout, never a total one, so a long healthy stream is never cut.
DEFAULT_READ_TIMEOUT_SECONDS = 600.0
# Kubernetes kills a pod 30 s after SIGTERM by default: drain within that, with slack.
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 25.0
DEFAULT_TOKEN_TIMEOUT_SECONDS = 30.0
# A client has this long to send a request's headers, to pause within a body and to leave an
# answer unread from the moment its buffers are full (and an idle keep-alive connection lives
# this long), like nginx's client_header_timeout, client_body_timeout and send_timeout, whose
# defaults are all 60 s.
DEFAULT_HEADER_TIMEOUT_SECONDS = 60.0
DEFAULT_ADMIN_HOST = "0.0.0.0"  # noqa: S104 - kubelet probes and Prometheus come from outside
DEFAULT_REPLAY_MAX_BYTES = 1024 * 1024
# Each client connection can hold an upstream one: two descriptors, well under common limits.
DEFAULT_MAX_CONNECTIONS = 1000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    """Everything the proxy is configured with. Build it with `load_settings`."""

    identity: Identity
    api_base_url: str  # scheme://host[:port][/prefix], no trailing slash
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    scope: str = DEFAULT_SCOPE
    authority_host: str = DEFAULT_AUTHORITY_HOST
    ca_file: Path | None = None  # SSL_CERT_FILE: trusted in addition to the system store
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    shutdown_delay: float = 0.0  # readiness 503 this long before the listener closes
    token_timeout: float = DEFAULT_TOKEN_TIMEOUT_SECONDS
    log_level: str = "INFO"
    log_format: str = "text"
    upstream_ca_file: Path | None = None  # PROXY_UPSTREAM_CA_FILE: upstream only, added trust
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    replay_max_bytes: int = DEFAULT_REPLAY_MAX_BYTES
    admin_host: str = DEFAULT_ADMIN_HOST
    admin_port: int | None = None
    api_keys: SecretSource | None = None  # PROXY_API_KEY(_FILE): comma-separated inbound keys
    # PROXY_ALLOWED_HOSTS: Host header names accepted; None means "loopback names only" when
    # bound to loopback (against DNS rebinding), and any name otherwise.
    allowed_hosts: frozenset[str] | None = None
    # PROXY_WORKERS: processes sharing the port with SO_REUSEPORT, each with its own token
    # source and upstream pool (the shared-gateway deployment); 1 for a sidecar.
    workers: int = 1

    @cached_property  # read for every request: urlsplit once (frozen: it fills __dict__)
    def upstream_host(self) -> str:
        """The `Host` header value for the upstream (host[:port] as written in API_BASE_URL)."""
        return urlsplit(self.api_base_url).netloc

    @property
    def binds_loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


_T = TypeVar("_T")


def load_settings(env: Mapping[str, str], *, check_files: bool = True) -> Settings:
    """Build Settings from `env` (normally os.environ) or raise ConfigError naming every problem."""
    problems: list[str] = []

    def get(name: str) -> str:
        return env.get(name, "").strip()

    def parse(name: str, default: _T, convert: Callable[[str], _T]) -> _T:
        raw = get(name)
        if not raw:
            return default
        try:
            return convert(raw)
        except ValueError as exc:
            problems.append(f"{name}={raw!r} is invalid: {exc}")
            return default

    identity = load_identity(env, problems, check_files=check_files)

    api_base_url = ""
    if not get("API_BASE_URL"):
        problems.append(
            "Missing required configuration: API_BASE_URL "
            "(the Azure OpenAI endpoint, e.g. https://NAME.openai.azure.com)"
        )
    else:
        api_base_url = parse("API_BASE_URL", "", _base_url)

    def ca_bundle(name: str) -> Path | None:
        if not get(name):
            return None
        path = Path(get(name))
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{name}={str(path)!r} is not a readable PEM CA bundle: {exc}")
        return path

    # The egress proxy for the token endpoint (HTTPS) and, for an http:// upstream, HTTP's:
    # the values `egress` will use, chosen by the same rule.
    schemes = ("https", "http") if api_base_url.startswith("http://") else ("https",)
    for scheme in schemes:
        found = egress.setting(env, scheme)
        if found is not None:
            try:
                egress.parse_proxy_url(found[1], found[0])
            except ValueError as exc:
                problems.append(str(exc))

    api_keys = None
    if get("PROXY_API_KEY") and get("PROXY_API_KEY_FILE"):
        problems.append("PROXY_API_KEY and PROXY_API_KEY_FILE are both set: keep one")
    elif get("PROXY_API_KEY_FILE"):
        api_keys = SecretSource("PROXY_API_KEY", path=Path(get("PROXY_API_KEY_FILE")))
    elif get("PROXY_API_KEY"):
        api_keys = SecretSource("PROXY_API_KEY", value=get("PROXY_API_KEY"))
    if api_keys is not None:
        try:
            parse_keys(api_keys.read())
        except ValueError as exc:
            problems.append(str(exc))

    settings = Settings(
        identity=identity,
        api_base_url=api_base_url,
        host=get("HOST") or DEFAULT_HOST,
        port=parse("PORT", DEFAULT_PORT, _port),
        scope=parse("AZURE_SCOPE", DEFAULT_SCOPE, _scope),
        authority_host=parse("AZURE_AUTHORITY_HOST", DEFAULT_AUTHORITY_HOST, _authority),
        ca_file=ca_bundle("SSL_CERT_FILE"),
        connect_timeout=parse("PROXY_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_SECONDS, _seconds),
        read_timeout=parse("PROXY_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_SECONDS, _seconds),
        shutdown_timeout=parse(
            "PROXY_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_SECONDS, _seconds
        ),
        shutdown_delay=parse("PROXY_SHUTDOWN_DELAY", 0.0, _non_negative_seconds),
        token_timeout=parse("PROXY_TOKEN_TIMEOUT", DEFAULT_TOKEN_TIMEOUT_SECONDS, _seconds),
        log_level=parse("PROXY_LOG_LEVEL", "INFO", _log_level),
        log_format=parse("PROXY_LOG_FORMAT", "text", _log_format),
        upstream_ca_file=ca_bundle("PROXY_UPSTREAM_CA_FILE"),
        header_timeout=parse("PROXY_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT_SECONDS, _seconds),
        max_connections=parse("PROXY_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, _positive_int),
        replay_max_bytes=parse("PROXY_REPLAY_MAX_BYTES", DEFAULT_REPLAY_MAX_BYTES, _size),
        admin_host=get("PROXY_ADMIN_HOST") or DEFAULT_ADMIN_HOST,
        admin_port=parse("PROXY_ADMIN_PORT", None, _port),
        api_keys=api_keys,
        allowed_hosts=parse("PROXY_ALLOWED_HOSTS", None, _host_names),
        workers=parse("PROXY_WORKERS", 1, _workers),
    )
    if settings.workers > 1 and settings.port == 0:
        problems.append(f"PROXY_WORKERS={settings.workers} needs a fixed PORT, not 0")
    if settings.workers > 1 and settings.admin_port == 0:
        problems.append(f"PROXY_WORKERS={settings.workers} needs a fixed PROXY_ADMIN_PORT, not 0")
    if settings.admin_port is not None and settings.admin_port == settings.port != 0:
        problems.append(f"PROXY_ADMIN_PORT={settings.admin_port} is the same as PORT")
    if problems:
        raise ConfigError(problems)
    return settings


def parse_keys(raw: str) -> tuple[str, ...]:
    """Inbound keys, comma separated so that a new one can be added before the old is removed."""
    keys = tuple(key.strip() for key in raw.split(","))
    if not all(keys):
        raise ValueError("PROXY_API_KEY holds an empty key (check for stray commas)")
    return keys


def _host_names(raw: str) -> frozenset[str]:
    names = frozenset(name.strip().lower() for name in raw.split(",") if name.strip())
    if not names:
        raise ValueError("must list host names, comma separated")
    return names


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive whole number")
    return value


MAX_WORKERS = 64


def _workers(raw: str) -> int:
    """A count, or `auto`: one per CPU this process may run on."""
    if raw.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    value = int(raw)
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be `auto` or a whole number from 1 to {MAX_WORKERS}")
    return value


def _size(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be a number of bytes, 0 or more")
    return value


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def _seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _non_negative_seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be zero or a positive number of seconds")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _log_format(raw: str) -> str:
    if raw.lower() not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return raw.lower()


def _scope(raw: str) -> str:
    # Client-credentials tokens are only issued for a resource's `.default` scope.
    if not raw.endswith("/.default"):
        raise ValueError("must end in /.default (client credentials use the .default scope)")
    return raw


def _base_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL such as https://NAME.openai.azure.com")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    _ = parts.port  # raises ValueError on a malformed port
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _authority(raw: str) -> str:
    # azure-identity accepts a bare host name and adds https://; it refuses anything but https.
    url = raw if "://" in raw else f"https://{raw}"
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("must be an https URL such as https://login.microsoftonline.com")
    return url.rstrip("/")
