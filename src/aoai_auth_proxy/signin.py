"""Signing in to Entra ID: a fresh azure-identity credential per token fetch, for each method.

A credential per fetch (one every half hour or so) means the certificate, secret file or
federated token file is read as it is on disk *now*: a Kubernetes Secret rotated by its `..data`
symlink swap is used at the next fetch with no restart. If the new file is unusable (half
written, wrong password), the last good material keeps being used and the problem is logged.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from azure.core.exceptions import AzureError, ClientAuthenticationError
from azure.identity.aio import (
    CertificateCredential,
    ClientAssertionCredential,
    ClientSecretCredential,
    ManagedIdentityCredential,
)

from .assertion import certificate_assertion, token_endpoint
from .certificate import CertificateError, ClientCertificate
from .config import Settings
from .credentials import Token
from .errors import TokenAcquisitionError
from .identity import CredentialKind, SecretSource
from .tokenhttp import PoolTransport
from .upstream import PooledUpstream

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Credential = (
    CertificateCredential
    | ClientAssertionCredential
    | ClientSecretCredential
    | ManagedIdentityCredential
)


class LastGood(Generic[_T]):
    """The newest usable value read from a file, or the previous one while the file is not."""

    def __init__(self, what: str, read: Callable[[], _T], same: Callable[[_T, _T], bool]) -> None:
        self._what = what
        self._read = read
        self._same = same
        self._value: _T | None = None

    def get(self) -> tuple[_T, bool]:
        """The value and whether it changed since the last call; TokenAcquisitionError if no
        usable value was ever read."""
        try:
            value = self._read()
        except (CertificateError, ValueError) as exc:
            if self._value is None:
                raise TokenAcquisitionError(str(exc)) from None
            log.warning("%s cannot be used, keeping the previous one: %s", self._what, exc)
            return self._value, False
        changed = self._value is not None and not self._same(self._value, value)
        self._value = value
        return value, changed


class EntraTokenFetcher:
    """Client credentials (certificate, secret, federated token) or managed identity."""

    def __init__(
        self,
        settings: Settings,
        ssl_context: ssl.SSLContext,
        *,
        on_certificate: Callable[[ClientCertificate], None] | None = None,
    ) -> None:
        self._settings = settings
        self._ssl_context = ssl_context
        self._on_certificate = on_certificate or (lambda certificate: None)
        identity = settings.identity
        self._certificate = LastGood(
            f"certificate file {identity.certificate_path}",
            identity.load_certificate,
            lambda a, b: a.der == b.der,
        )
        self._secret = LastGood(
            "client secret file", _reader(identity.client_secret), lambda a, b: a == b
        )
        federated = SecretSource("AZURE_FEDERATED_TOKEN", path=identity.federated_token_file)
        self._federated = LastGood("federated token file", federated.read, lambda a, b: a == b)

    def certificate(self) -> ClientCertificate:
        """The certificate the next fetch signs with (logged when it changes on disk)."""
        certificate, changed = self._certificate.get()
        if changed:
            log.info("certificate changed on disk, now using %s", certificate.describe())
        if certificate.expires_soon():
            log.warning("certificate expires soon: %s", certificate.describe())
        self._on_certificate(certificate)
        return certificate

    async def fetch(self) -> Token:
        settings = self._settings
        started = time.time()
        # A pool per fetch, as a credential per fetch: nothing is kept open between fetches
        # half an hour apart, and an egress proxy set since the last one is taken.
        pool = PooledUpstream(
            self._ssl_context,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.token_timeout,
            peer="token endpoint",
            ca_settings="SSL_CERT_FILE",
        )
        try:
            async with PoolTransport(pool) as transport:
                credential = self._credential(transport)
                async with credential:
                    info = await credential.get_token_info(settings.scope)
        except ClientAuthenticationError as exc:
            raise TokenAcquisitionError(_brief(_entra_message(exc))) from exc
        except AzureError as exc:
            raise TokenAcquisitionError(
                _brief(f"cannot reach Entra ID at {settings.authority_host}: {exc.message}")
            ) from exc
        return Token(
            value=info.token,
            expires_on=float(info.expires_on),
            fetched_at=started,
            refresh_on=float(info.refresh_on) if info.refresh_on else None,
        )

    def _credential(self, transport: PoolTransport) -> Credential:
        identity = self._settings.identity
        authority = self._settings.authority_host
        tenant, client = identity.tenant_id, identity.client_id
        if identity.kind is CredentialKind.MANAGED_IDENTITY:
            # azure-identity picks the platform endpoint (IDENTITY_ENDPOINT, IMDS) itself.
            return ManagedIdentityCredential(client_id=client or None, transport=transport)
        if identity.kind is CredentialKind.SECRET:
            secret, changed = self._secret.get()
            if changed:
                log.info("client secret changed on disk, using the new one")
            return ClientSecretCredential(
                tenant, client, secret, authority=authority, transport=transport
            )
        if identity.kind is CredentialKind.WORKLOAD_IDENTITY:
            return ClientAssertionCredential(
                tenant, client, self._federated_token, authority=authority, transport=transport
            )
        certificate = self.certificate()
        if identity.send_certificate_chain:
            audience = token_endpoint(authority, tenant)

            def sign() -> str:
                return certificate_assertion(
                    certificate, client_id=client, audience=audience, now=time.time()
                )

            return ClientAssertionCredential(
                tenant, client, sign, authority=authority, transport=transport
            )
        return CertificateCredential(
            tenant,
            client,
            certificate_data=certificate.pem,
            authority=authority,
            transport=transport,
        )

    def _federated_token(self) -> str:
        # The kubelet rewrites the projected token file well before it expires; read it at
        # every fetch, as azure-identity's WorkloadIdentityCredential does.
        token, _ = self._federated.get()
        return token


def _reader(source: SecretSource | None) -> Callable[[], str]:
    def read() -> str:
        if source is None:
            raise ValueError("no client secret configured")
        return source.read()

    return read


# Entra's errors are one sentence; anything far longer (an HTML error page from a gateway in
# between) would be repeated in /health, in 503 answers and in every retry's log line.
MAX_ERROR_CHARS = 300


def _brief(text: str) -> str:
    """`text` on one line, cut to MAX_ERROR_CHARS with the original length noted."""
    line = " ".join(text.split())
    if len(line) <= MAX_ERROR_CHARS:
        return line
    return f"{line[:MAX_ERROR_CHARS]}... ({len(line)} characters)"


def _entra_message(exc: ClientAuthenticationError) -> str:
    # azure-identity wraps Entra's answer in "<Credential>.get_token_info failed: ..." or
    # "Microsoft Entra ID error '(code) description' Content: {...}" and appends trace lines;
    # keep the AADSTS sentence, which is what operators search for.
    message = str(exc.message or exc)
    _, _, tail = message.partition("failed: ")
    text = tail or message
    return text.split("\r\n")[0].split("\nTrace ID")[0].split(" Content: ")[0].strip()
