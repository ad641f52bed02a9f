"""Reads the client certificate (PEM or PKCS#12) and says exactly what is wrong with it."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY_MARKERS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
)
_PEM_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")
EXPIRY_WARNING = dt.timedelta(days=30)


class CertificateError(Exception):
    """The certificate file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ClientCertificate:
    """A validated client certificate: what the token fetch signs with and what `check` shows."""

    path: Path
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey = field(repr=False)
    # The other certificates in the file, issuers of `certificate` first when they are there:
    # sent as `x5c` for subject-name/issuer authentication (RFC 7515 4.1.6).
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def pem(self) -> bytes:
        """Certificate PEM, then the unencrypted PKCS#8 key: the form azure-identity reads."""
        return self.certificate.public_bytes(serialization.Encoding.PEM) + (
            self.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    @property
    def thumbprint_sha1(self) -> str:
        """Hex SHA-1 thumbprint, as the Azure portal shows it under "Certificates & secrets"."""
        return hashlib.sha1(self.der, usedforsecurity=False).hexdigest().upper()

    @property
    def thumbprint_sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest().upper()

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def expires_soon(self, now: dt.datetime | None = None) -> bool:
        """True within EXPIRY_WARNING of expiry: time to upload the next certificate."""
        return self.not_after - (now or dt.datetime.now(dt.UTC)) < EXPIRY_WARNING

    def describe(self) -> str:
        """Subject, thumbprint and expiry: what operators compare with the app registration."""
        return (
            f"{self.subject}, thumbprint {self.thumbprint_sha1}, "
            f"expires {self.not_after.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )


def load_client_certificate(
    path: Path, *, password: bytes | None = None, now: dt.datetime | None = None
) -> ClientCertificate:
    """Load and validate `path` (PEM or PFX/PKCS#12); raise CertificateError naming the problem.

    A PEM may hold the certificate and key in any order, and a chain: the leaf is the
    certificate whose public key matches the private key (Entra checks that one's thumbprint).
    """
    data = _read(path)
    if b"-----BEGIN" in data:
        key, certificates = _from_pem(path, data, password)
    else:
        key, certificates = _from_pkcs12(path, data, password)

    if not isinstance(key, rsa.RSAPrivateKey):
        # Entra accepts EC keys, but azure-identity signs client assertions with RSA only.
        kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
        raise CertificateError(
            f"certificate file {path} holds a {kind} key; "
            "Entra client assertions from azure-identity need an RSA key"
        )
    public_numbers = key.public_key().public_numbers()
    leaf = next(
        (
            cert
            for cert in certificates
            if isinstance(public := cert.public_key(), rsa.RSAPublicKey)
            and public.public_numbers() == public_numbers
        ),
        None,
    )
    if leaf is None:
        raise CertificateError(
            f"certificate file {path}: the private key does not match any certificate in the file"
        )

    now = now or dt.datetime.now(dt.UTC)
    subject = leaf.subject.rfc4514_string()
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            f"certificate file {path}: certificate {subject} expired on "
            f"{leaf.not_valid_after_utc.isoformat()}"
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            f"certificate file {path}: certificate {subject} is not valid before "
            f"{leaf.not_valid_before_utc.isoformat()}"
        )
    chain = tuple(_issuers_first(leaf, [c for c in certificates if c != leaf]))
    return ClientCertificate(path=path, certificate=leaf, private_key=key, chain=chain)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
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


def _from_pem(
    path: Path, data: bytes, password: bytes | None
) -> tuple[object, list[x509.Certificate]]:
    problems = []
    if _PEM_CERTIFICATE not in data:
        problems.append("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if not any(marker in data for marker in _PEM_PRIVATE_KEY_MARKERS):
        problems.append("holds no private key (-----BEGIN PRIVATE KEY-----)")
    if problems:
        raise CertificateError(f"certificate file {path} " + " and ".join(problems))
    encrypted = any(marker in data for marker in _PEM_ENCRYPTED)
    if encrypted and password is None:
        raise CertificateError(
            f"certificate file {path} holds an encrypted private key; "
            "set AZURE_CLIENT_CERTIFICATE_PASSWORD (or _FILE)"
        )
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(
            f"certificate file {path} has a malformed certificate: {exc}"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=password if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise CertificateError(
                f"certificate file {path}: AZURE_CLIENT_CERTIFICATE_PASSWORD does not decrypt "
                "the private key (wrong password?)"
            ) from None
        raise CertificateError(
            f"certificate file {path} has a malformed private key: {exc}"
        ) from None
    except TypeError as exc:
        raise CertificateError(f"certificate file {path}: {exc}") from None
    return key, certificates


def _from_pkcs12(
    path: Path, data: bytes, password: bytes | None
) -> tuple[object, list[x509.Certificate]]:
    try:
        key, certificate, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError:
        if password is None:
            try:  # tell "needs a password" apart from "not PKCS#12 at all"
                pkcs12.load_key_and_certificates(data, b"")
            except ValueError:
                pass
            else:
                return _from_pkcs12(path, data, b"")
        reason = (
            "is neither PEM nor PKCS#12, or is password-protected: "
            "set AZURE_CLIENT_CERTIFICATE_PASSWORD (or _FILE)"
            if password is None
            else "cannot be opened with AZURE_CLIENT_CERTIFICATE_PASSWORD "
            "(wrong password, or not a PKCS#12 file)"
        )
        raise CertificateError(f"certificate file {path} {reason}") from None
    if key is None:
        raise CertificateError(f"certificate file {path} (PKCS#12) holds no private key")
    if certificate is None:
        raise CertificateError(f"certificate file {path} (PKCS#12) holds no certificate")
    return key, [certificate, *extra]


def _issuers_first(
    leaf: x509.Certificate, others: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Order `others` as the path from `leaf` upwards where names link up; the rest after."""
    ordered: list[x509.Certificate] = []
    current = leaf
    remaining = list(others)
    while True:
        issuer = next((c for c in remaining if c.subject == current.issuer), None)
        if issuer is None or issuer == current:
            break
        ordered.append(issuer)
        remaining.remove(issuer)
        current = issuer
    return ordered + remaining
