"""A throw-away certificate authority for the stand-ins' server and client certificates."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RSA_KEY_BITS = 2048
CA_LIFETIME = dt.timedelta(days=30)
LEAF_LIFETIME = dt.timedelta(days=7)
# Back-date every certificate a little so a peer whose clock is slightly behind still accepts it.
BACKDATE = dt.timedelta(minutes=5)
# Private keys are secrets even in tests: written files are readable by the owner only.
PRIVATE_FILE_MODE = 0o600


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alt_name(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> Path:
    # Create with the final mode at once: chmod after write would leave a window where the key
    # is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    path.chmod(PRIVATE_FILE_MODE)  # O_CREAT's mode does not apply to a file that already existed
    return path


@dataclass(frozen=True)
class ServerCertificate:
    """A TLS server certificate for loopback stand-ins, with its unencrypted key."""

    certificate: x509.Certificate
    certificate_pem: bytes
    private_key_pem: bytes = field(repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # The ssl module loads a certificate chain only from files, so the PEMs live on disk
        # just long enough to be read.
        with tempfile.TemporaryDirectory(prefix="aoai-auth-proxy-tls-") as directory:
            cert_file = Path(directory, "server.pem")
            cert_file.write_bytes(self.certificate_pem)
            key_file = _write_private(Path(directory, "server.key"), self.private_key_pem)
            context.load_cert_chain(cert_file, key_file)
        return context


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate as an app registration would hold it, and the PEM the proxy reads."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey = field(repr=False)
    # The issuers above `certificate`, nearest first, ending with the root.
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def pem(self) -> bytes:
        """Certificate PEM then unencrypted PKCS#8 key PEM: the `AZURE_CERTIFICATE_PATH` format."""
        return self.certificate_pem + _key_pem(self.private_key)

    @property
    def chain_pem(self) -> bytes:
        """The issuers' PEMs, nearest first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def pem_with_chain(self) -> bytes:
        """Certificate, its issuers (nearest first), then the key: a full-chain PEM."""
        return self.certificate_pem + self.chain_pem + _key_pem(self.private_key)

    @property
    def x5c(self) -> list[str]:
        """The JWT `x5c` header value: standard (not URL-safe) base64 DER, this certificate
        first, then its issuers (RFC 7515 section 4.1.6)."""
        return [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")
            for c in (self.certificate, *self.chain)
        ]

    @property
    def thumbprint_sha1(self) -> str:
        """Hex, upper case: how the Azure portal shows a certificate's thumbprint."""
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - an identifier

    @property
    def thumbprint_sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex().upper()

    def write(self, path: Path) -> Path:
        """Write `pem` to `path`, readable by the owner only, and return `path`."""
        return _write_private(path, self.pem)


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed RSA CA; create one per test session or demo run with `create()`."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey = field(repr=False)
    # For an intermediate CA, the issuers above it, nearest first, ending with the root.
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def create(cls, common_name: str = "aoai-auth-proxy test CA") -> CertificateAuthority:
        key = _new_key()
        now = _now()
        certificate = _ca_certificate(
            common_name, key, issuer=None, not_before=now - BACKDATE, not_after=now + CA_LIFETIME
        )
        return cls(certificate=certificate, private_key=key)

    def create_intermediate(
        self,
        common_name: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A CA signed by this one (leaf <- intermediate <- root chains); its `chain` names
        the CAs above it. Pass `not_before`/`not_after` for an expired or future one."""
        key = _new_key()
        now = _now()
        certificate = _ca_certificate(
            common_name,
            key,
            issuer=self,
            not_before=not_before if not_before is not None else now - BACKDATE,
            not_after=not_after if not_after is not None else now + CA_LIFETIME,
        )
        return CertificateAuthority(
            certificate=certificate, private_key=key, chain=(self.certificate, *self.chain)
        )

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _issue(
        self,
        common_name: str,
        key: rsa.RSAPrivateKey,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.private_key, hashes.SHA256())

    def issue_server_certificate(
        self, hosts: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> ServerCertificate:
        """A certificate for `hosts`: IP SANs for IP literals, DNS SANs for names."""
        if not hosts:
            raise ValueError("a server certificate needs at least one host")
        key = _new_key()
        now = _now()
        certificate = self._issue(
            hosts[0],
            key,
            not_before=now - BACKDATE,
            not_after=now + LEAF_LIFETIME,
            extensions=[
                (_subject_alt_name(hosts), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            ],
        )
        return ServerCertificate(
            certificate=certificate,
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            private_key_pem=_key_pem(key),
        )

    def issue_client_certificate(
        self,
        common_name: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> ClientCertificate:
        """A client certificate; pass `not_before`/`not_after` for expired or future ones, and
        `key` to re-issue for the same key pair (certificate renewal without a new key)."""
        now = _now()
        key = key if key is not None else _new_key()
        certificate = self._issue(
            common_name,
            key,
            not_before=not_before if not_before is not None else now - BACKDATE,
            not_after=not_after if not_after is not None else now + LEAF_LIFETIME,
            extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
        )
        return ClientCertificate(
            certificate=certificate, private_key=key, chain=(self.certificate, *self.chain)
        )

    def write_ca_file(self, path: Path) -> Path:
        """Write the CA certificate PEM (for `SSL_CERT_FILE` or `connection_verify=`)."""
        path.write_bytes(self.certificate_pem)
        return path

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client-side TLS context that trusts this CA and nothing else."""
        return ssl.create_default_context(cadata=self.certificate_pem.decode("ascii"))


def _ca_certificate(
    common_name: str,
    key: rsa.RSAPrivateKey,
    *,
    issuer: CertificateAuthority | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A CA certificate, self-signed when `issuer` is None. No path length limit, so a root
    may sign intermediates (RFC 5280 section 4.2.1.9)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer = key if issuer is None else issuer.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())
