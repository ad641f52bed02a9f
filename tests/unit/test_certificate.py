"""The client certificate file: what is accepted, and the message for each thing wrong with it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aoai_auth_proxy.certificate import CertificateError, load_client_certificate
from aoai_auth_proxy.testing.pki import CertificateAuthority, ClientCertificate


def key_pem(cert: ClientCertificate) -> bytes:
    return cert.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def error_for(path: Path) -> str:
    with pytest.raises(CertificateError) as raised:
        load_client_certificate(path)
    message = str(raised.value)
    assert str(path) in message
    return message


def test_certificate_and_key_in_either_order_with_a_chain(
    tmp_path: Path, ca: CertificateAuthority, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(
        key_pem(client_certificate) + ca.certificate_pem + client_certificate.certificate_pem
    )
    loaded = load_client_certificate(path)
    assert loaded.certificate == client_certificate.certificate
    assert loaded.thumbprint_sha1 == client_certificate.thumbprint_sha1
    assert loaded.thumbprint_sha256 == client_certificate.thumbprint_sha256
    assert loaded.pem.index(b"CERTIFICATE") < loaded.pem.index(b"PRIVATE KEY")
    assert "PRIVATE" not in repr(loaded)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in error_for(tmp_path / "missing.pem")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert "is a directory" in error_for(tmp_path)


def test_no_private_key(tmp_path: Path, client_certificate: ClientCertificate) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(client_certificate.certificate_pem)
    assert "holds no private key" in error_for(path)


def test_no_certificate(tmp_path: Path, client_certificate: ClientCertificate) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(key_pem(client_certificate))
    assert "holds no PEM certificate" in error_for(path)


def test_not_pem_at_all(tmp_path: Path) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(b"\x30\x82garbage")
    message = error_for(path)
    assert "no PEM certificate" in message
    assert "no private key" in message


def test_encrypted_key(tmp_path: Path, client_certificate: ClientCertificate) -> None:
    path = tmp_path / "c.pem"
    encrypted = client_certificate.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path.write_bytes(client_certificate.certificate_pem + encrypted)
    assert "encrypted private key" in error_for(path)


def test_key_that_does_not_match(
    tmp_path: Path, ca: CertificateAuthority, client_certificate: ClientCertificate
) -> None:
    other = ca.issue_client_certificate("other")
    path = tmp_path / "c.pem"
    path.write_bytes(client_certificate.certificate_pem + key_pem(other))
    assert "does not match" in error_for(path)


def test_ec_key_is_refused(tmp_path: Path, client_certificate: ClientCertificate) -> None:
    path = tmp_path / "c.pem"
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(client_certificate.certificate_pem + key)
    assert "need an RSA key" in error_for(path)


def test_expired_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    old = ca.issue_client_certificate(
        "old", not_before=now - dt.timedelta(days=60), not_after=now - dt.timedelta(days=1)
    )
    assert "expired on" in error_for(old.write(tmp_path / "c.pem"))


def test_not_yet_valid_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    future = ca.issue_client_certificate(
        "future", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=60)
    )
    assert "not valid before" in error_for(future.write(tmp_path / "c.pem"))
