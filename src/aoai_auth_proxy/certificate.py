"""Reads the client certificate (PEM with certificate and key) and says what is wrong."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY_MARKERS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
)
_PEM_ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


class CertificateError(Exception):
    """The certificate file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ClientCertificate:
    """A validated client certificate: what the token fetch signs with and what `check` shows."""

    path: Path
    certificate: x509.Certificate
    # Certificate PEM followed by an unencrypted PKCS#8 key: the form azure-identity reads.
    pem: bytes = field(repr=False)

    @property
    def thumbprint_sha1(self) -> str:
        """Hex SHA-1 thumbprint, as the Azure portal shows it under "Certificates & secrets"."""
        return hashlib.sha1(self._der, usedforsecurity=False).hexdigest().upper()

    @property
    def thumbprint_sha256(self) -> str:
        return hashlib.sha256(self._der).hexdigest().upper()

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def _der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


def load_client_certificate(path: Path, *, now: dt.datetime | None = None) -> ClientCertificate:
    """Load and validate `path`; raise CertificateError naming the file and the problem.

    The certificate and key may come in any order and the file may carry a chain: the leaf is
    the certificate whose public key matches the private key (Entra checks the thumbprint of
    that one).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"certificate file {path} does not exist") from None
    except IsADirectoryError:
        raise CertificateError(f"certificate file {path} is a directory, not a file") from None
    except PermissionError:
        raise CertificateError(
            f"certificate file {path} is not readable by this process (permission denied)"
        ) from None
    except OSError as exc:
        raise CertificateError(f"certificate file {path} cannot be read: {exc.strerror}") from None

    problems = []
    if _PEM_CERTIFICATE not in data:
        problems.append("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if _PEM_ENCRYPTED_KEY in data:
        problems.append("holds an encrypted private key; store the key unencrypted in the Secret")
    elif not any(marker in data for marker in _PEM_PRIVATE_KEY_MARKERS):
        problems.append("holds no private key (-----BEGIN PRIVATE KEY-----)")
    if problems:
        raise CertificateError(f"certificate file {path} " + " and ".join(problems))

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(
            f"certificate file {path} has a malformed certificate: {exc}"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"certificate file {path} has a malformed private key: {exc}"
        ) from None

    if not isinstance(key, rsa.RSAPrivateKey):
        # Entra accepts EC keys, but azure-identity signs client assertions with RSA only.
        raise CertificateError(
            f"certificate file {path} holds a {type(key).__name__.removeprefix('_')} key; "
            "Entra client assertions from azure-identity need an RSA key"
        )
    public_numbers = key.public_key().public_numbers()
    leaf = next(
        (
            cert
            for cert in certificates
            if isinstance(cert.public_key(), rsa.RSAPublicKey)
            and cert.public_key().public_numbers() == public_numbers  # type: ignore[union-attr]
        ),
        None,
    )
    if leaf is None:
        raise CertificateError(
            f"certificate file {path}: the private key does not match any certificate in the file"
        )

    now = now or dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            f"certificate file {path}: certificate {leaf.subject.rfc4514_string()} expired on "
            f"{leaf.not_valid_after_utc.isoformat()}"
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            f"certificate file {path}: certificate {leaf.subject.rfc4514_string()} is not valid "
            f"before {leaf.not_valid_before_utc.isoformat()}"
        )

    pem = leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ClientCertificate(path=path, certificate=leaf, pem=pem)
