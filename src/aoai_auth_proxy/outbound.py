"""Outbound TLS trust (system store plus SSL_CERT_FILE), and the aiohttp session for tokens."""

from __future__ import annotations

import contextlib
import ssl
import sys
from pathlib import Path

import aiohttp

# Before CPython 3.12.8 / 3.13.1 an aborted TLS connection could leak its transport
# (python/cpython#118960); a token fetch cut short by PROXY_TOKEN_TIMEOUT may abort one.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)


def client_ssl_context(*ca_files: Path | None) -> ssl.SSLContext:
    """Verify against the system store, plus `ca_files` for private CAs; never unverified.

    OpenSSL lets SSL_CERT_FILE *replace* the system bundle; we load the system paths that
    OpenSSL was built with explicitly, then add the extra file, so both are trusted.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    paths = ssl.get_default_verify_paths()
    for cafile, capath in ((paths.openssl_cafile, None), (None, paths.openssl_capath)):
        with contextlib.suppress(FileNotFoundError, ssl.SSLError):  # an image may lack one
            context.load_verify_locations(cafile=cafile, capath=capath)
    for ca_file in ca_files:
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
    return context


def client_session(ssl_context: ssl.SSLContext) -> aiohttp.ClientSession:
    """A session that never changes what passes through it.

    No decompression (bytes pass as sent, RFC 9110 8.4), no cookie jar (a proxy must not mix
    clients' cookies), HTTPS_PROXY/NO_PROXY from the environment honoured.
    """
    connector = aiohttp.TCPConnector(
        ssl=ssl_context,
        limit=0,
        enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=True,
        timeout=aiohttp.ClientTimeout(total=None),
    )
