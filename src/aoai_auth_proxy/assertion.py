"""Client assertions we sign ourselves: subject-name/issuer auth needs the `x5c` chain header."""

from __future__ import annotations

import base64
import hashlib
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .certificate import ClientCertificate

ASSERTION_LIFETIME_SECONDS = 600


def token_endpoint(authority: str, tenant_id: str) -> str:
    """The audience Entra expects in a client assertion: the v2.0 token endpoint itself."""
    return f"{authority}/{tenant_id}/oauth2/v2.0/token"


def certificate_assertion(
    certificate: ClientCertificate, *, client_id: str, audience: str, now: float
) -> str:
    """A PS256 client assertion (RFC 7523) whose header carries the certificate chain.

    azure-identity's async credential ignores `send_certificate_chain`, so subject-name/issuer
    (SNI) apps sign this themselves. `x5c` is standard base64 DER, leaf first (RFC 7515 4.1.6);
    `x5t#S256` names the leaf for apps that registered the certificate itself.
    """
    chain = (certificate.certificate, *certificate.chain)
    header = {
        "typ": "JWT",
        "x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(certificate.der).digest())
        .rstrip(b"=")
        .decode(),
        "x5c": [base64.b64encode(_der(cert)).decode() for cert in chain],
    }
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + ASSERTION_LIFETIME_SECONDS,
    }
    import jwt  # here: only subject-name/issuer apps sign, and PyJWT is 0.4 MB at rest

    return jwt.encode(claims, certificate.private_key, algorithm="PS256", headers=header)


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)
