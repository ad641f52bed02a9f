"""The client certificate file: what is accepted, and the message for each thing wrong with it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

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
    assert "private_key" not in repr(loaded)


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


def test_not_pem_and_not_pkcs12(tmp_path: Path) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(b"\x30\x82garbage")
    assert "is neither PEM nor PKCS#12" in error_for(path)


def test_pem_without_either_block(tmp_path: Path) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    message = error_for(path)
    assert "no PEM certificate" in message
    assert "no private key" in message


def encrypted_pem(cert: ClientCertificate, password: bytes) -> bytes:
    return cert.certificate_pem + cert.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def test_encrypted_key_without_password(
    tmp_path: Path, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(encrypted_pem(client_certificate, b"pw"))
    assert "encrypted private key; set AZURE_CLIENT_CERTIFICATE_PASSWORD" in error_for(path)


def test_encrypted_key_with_its_password(
    tmp_path: Path, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(encrypted_pem(client_certificate, b"s3cret"))
    loaded = load_client_certificate(path, password=b"s3cret")
    assert loaded.thumbprint_sha1 == client_certificate.thumbprint_sha1
    assert b"ENCRYPTED" not in loaded.pem


def test_encrypted_key_with_a_wrong_password(
    tmp_path: Path, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(encrypted_pem(client_certificate, b"s3cret"))
    with pytest.raises(CertificateError, match="does not decrypt the private key"):
        load_client_certificate(path, password=b"wrong")


def test_a_password_for_an_unencrypted_key_is_harmless(
    certificate_file: Path, client_certificate: ClientCertificate
) -> None:
    loaded = load_client_certificate(certificate_file, password=b"unused")
    assert loaded.certificate == client_certificate.certificate


def pfx(
    cert: ClientCertificate, password: bytes | None, extra: list[x509.Certificate] | None = None
) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return pkcs12.serialize_key_and_certificates(
        b"client", cert.private_key, cert.certificate, extra, encryption
    )


@pytest.mark.parametrize("password", [None, b"pfx-pass"])
def test_pkcs12_with_or_without_password(
    tmp_path: Path,
    ca: CertificateAuthority,
    client_certificate: ClientCertificate,
    password: bytes | None,
) -> None:
    path = tmp_path / "c.pfx"
    path.write_bytes(pfx(client_certificate, password, [ca.certificate]))
    loaded = load_client_certificate(path, password=password)
    assert loaded.thumbprint_sha1 == client_certificate.thumbprint_sha1
    assert loaded.chain == (ca.certificate,)


def test_pkcs12_with_a_wrong_or_missing_password(
    tmp_path: Path, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pfx"
    path.write_bytes(pfx(client_certificate, b"pfx-pass"))
    assert "set AZURE_CLIENT_CERTIFICATE_PASSWORD" in error_for(path)
    with pytest.raises(CertificateError, match="wrong password"):
        load_client_certificate(path, password=b"nope")


def test_chain_is_ordered_leaf_upwards(tmp_path: Path, ca: CertificateAuthority) -> None:
    intermediate = ca.create_intermediate("issuing CA")
    leaf = intermediate.issue_client_certificate("sni-client")
    path = tmp_path / "c.pem"
    path.write_bytes(ca.certificate_pem + leaf.pem + intermediate.certificate_pem)
    loaded = load_client_certificate(path)
    assert loaded.chain == (intermediate.certificate, ca.certificate)


def test_expiring_soon_is_flagged(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    soon = ca.issue_client_certificate("soon", not_after=now + dt.timedelta(days=10))
    loaded = load_client_certificate(soon.write(tmp_path / "c.pem"))
    assert loaded.expires_soon()
    assert "thumbprint" in loaded.describe()


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
