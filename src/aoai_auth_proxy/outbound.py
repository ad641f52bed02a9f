"""Outbound TLS trust: the system store plus SSL_CERT_FILE (and a private upstream CA)."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path


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
