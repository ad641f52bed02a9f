"""How the Entra stand-in authenticates a client: secrets, certificates, chains, federated tokens.

Each check fails with the AADSTS code Entra answers with. Client assertions follow RFC 7523
section 3; `x5c` chains follow RFC 7515 section 4.1.6 and are validated as RFC 5280 section 6
describes, up to a root the app registration trusts (subject name and issuer, "SNI").
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.types import Options

from ._aadsts import Rejected, describe_time, invalid_client, reject, timestamp
from .kubernetes import KubernetesIssuer

# azure-identity signs with PS256 (x5t#S256); ADFS-style and older clients with RS256 (x5t).
ASSERTION_ALGORITHMS = ("PS256", "RS256")
# Seconds of clock difference tolerated between the client and the token service for `nbf`.
CLOCK_SKEW = 60.0
# Signature and claims are checked one by one so each failure gets its own AADSTS code.
_SIGNATURE_ONLY: Options = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


@dataclass(frozen=True)
class Secret:
    value: str = field(repr=False)
    not_after: dt.datetime | None = None


@dataclass(frozen=True)
class TrustedRoot:
    """Subject name and issuer: certificates chaining to `root` whose subject is `subject`."""

    root: x509.Certificate
    subject: str


@dataclass(frozen=True)
class FederatedCredential:
    issuer: KubernetesIssuer
    subject: str
    audience: str


@dataclass
class AppRegistration:
    """Every credential one app (client id) in one tenant may sign in with."""

    certificates: list[x509.Certificate] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    trusted_roots: list[TrustedRoot] = field(default_factory=list)
    federated: list[FederatedCredential] = field(default_factory=list)


def b64url_digest(data: bytes, algorithm: hashes.HashAlgorithm) -> str:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return base64.urlsafe_b64encode(digest.finalize()).decode("ascii").rstrip("=")


def thumbprints(certificate: x509.Certificate) -> tuple[str, str]:
    """(x5t, x5t#S256) as a JWT header carries them (RFC 7515 4.1.7/4.1.8), without padding."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return b64url_digest(der, hashes.SHA1()), b64url_digest(der, hashes.SHA256())  # noqa: S303


# -- secrets ---------------------------------------------------------------------------------


def verify_secret(app: AppRegistration, client_id: str, sent: str) -> None:
    # Every registered secret is compared, in constant time, so timing says nothing about which
    # (or whether any) matched.
    sent_bytes = sent.encode()
    matched: Secret | None = None
    for secret in app.secrets:
        if hmac.compare_digest(secret.value.encode(), sent_bytes):
            matched = secret
    if matched is None:
        raise invalid_client(
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            f"client secret value, not the client secret ID, for a secret added to app "
            f"'{client_id}'.",
        )
    if matched.not_after is not None and matched.not_after <= dt.datetime.now(dt.UTC):
        raise invalid_client(
            7000222, f"The provided client secret keys for app '{client_id}' are expired."
        )


# -- certificate assertions ------------------------------------------------------------------


def _verify_signature(assertion: str, key: rsa.RSAPublicKey, reason: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion, key, algorithms=list(ASSERTION_ALGORITHMS), options=_SIGNATURE_ONLY
        )
    except jwt.InvalidTokenError as exc:
        raise invalid_client(
            700027, f"Client assertion contains an invalid signature. [Reason - {reason}] ({exc})"
        ) from exc
    return claims


def _within_validity(certificate: x509.Certificate, now: dt.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def verify_certificate_assertion(
    assertion: str,
    header: Mapping[str, Any],
    client_id: str,
    app: AppRegistration,
    endpoints: Collection[str],
) -> x509.Certificate:
    """The certificate that signed a client assertion: a registered one (by thumbprint), or
    one whose `x5c` chain reaches a trusted root."""
    algorithm = header.get("alg")
    if algorithm not in ASSERTION_ALGORITHMS:
        raise invalid_client(
            5002738, f"Invalid JWT token. '{algorithm}' is not a supported signature algorithm."
        )
    # azure-identity pads the thumbprint (base64.urlsafe_b64encode); compare without padding.
    sent_sha256 = str(header.get("x5t#S256", "")).rstrip("=")
    sent_sha1 = str(header.get("x5t", "")).rstrip("=")
    by_sha256 = {thumbprints(c)[1]: c for c in app.certificates}
    by_sha1 = {thumbprints(c)[0]: c for c in app.certificates}
    certificate = by_sha256.get(sent_sha256) or by_sha1.get(sent_sha1)
    sent = sent_sha256 or sent_sha1
    if certificate is not None:
        if not _within_validity(certificate, dt.datetime.now(dt.UTC)):
            raise invalid_client(
                700027,
                "Client assertion contains an invalid signature. [Reason - The key used is "
                f"expired or not yet valid., Thumbprint of key used by client: '{sent}']",
            )
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise invalid_client(700027, "The certificate's key is not RSA.")
        reason = "Key was found, but use of the key to verify the signature failed."
        claims = _verify_signature(assertion, key, reason)
    elif "x5c" in header and app.trusted_roots:
        certificate = verify_chain(header, app.trusted_roots)
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise invalid_client(700027, "The certificate's key is not RSA.")
        reason = "The assertion is not signed by the key of the first certificate in x5c."
        claims = _verify_signature(assertion, key, reason)
    else:
        raise invalid_client(
            700027,
            "Client assertion contains an invalid signature. [Reason - The key was not "
            f"found., Thumbprint of key used by client: '{sent}', Please visit the Azure "
            f"Portal to see configured keys for app Id '{client_id}'.]",
        )
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise invalid_client(
            700021, "Client assertion application identifier doesn't match 'client_id' parameter."
        )
    if claims.get("aud") not in endpoints:
        raise invalid_client(
            700023,
            "Client assertion audience claim does not match Realm issuer. The audience must "
            f"be the token endpoint; got {claims.get('aud')!r}.",
        )
    check_lifetime(claims)
    return certificate


def _chain_error(reason: str) -> Rejected:
    return invalid_client(
        700027,
        f"Client assertion failed certificate chain validation. [Reason - {reason}]",
    )


def _decode_x5c(value: object) -> list[x509.Certificate]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _chain_error("x5c must be a non-empty array of base64 DER certificates.")
    certificates = []
    for index, encoded in enumerate(value):
        try:
            # RFC 7515 4.1.6: base64, not base64url; validate=True refuses '-' and '_'.
            der = base64.b64decode(encoded, validate=True)
            certificates.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError) as exc:
            raise _chain_error(
                f"x5c[{index}] is not a standard-base64 (not base64url) DER certificate."
            ) from exc
    return certificates


def _subject_matches(certificate: x509.Certificate, subject: str) -> bool:
    names = {certificate.subject.rfc4514_string()}
    names.update(
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )
    return subject in names


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _path_length_exceeded(certificate: x509.Certificate, below: int) -> bool:
    """RFC 5280 4.2.1.9: at most pathLenConstraint intermediate CAs may follow this CA."""
    limit = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    return limit.path_length is not None and below > limit.path_length


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chain_to(chain: Sequence[x509.Certificate], trusted: TrustedRoot) -> str | None:
    """None if `chain` (leaf first) is valid up to `trusted.root`, else why not."""
    root_der = trusted.root.public_bytes(serialization.Encoding.DER)
    # The sender may include the root itself; the trusted copy is what counts.
    if chain[-1].public_bytes(serialization.Encoding.DER) == root_der and len(chain) > 1:
        chain = chain[:-1]
    path = [*chain, trusted.root]
    now = dt.datetime.now(dt.UTC)
    for position, certificate in enumerate(path):
        if not _within_validity(certificate, now):
            return (
                f"The certificate '{certificate.subject.rfc4514_string()}' in the chain is "
                "expired or not yet valid."
            )
        if position == 0:
            continue
        if not _is_ca(certificate):
            return f"The issuer '{certificate.subject.rfc4514_string()}' is not a CA."
        if _path_length_exceeded(certificate, below=position - 1):
            return (
                "The chain is longer than the path length constraint of "
                f"'{certificate.subject.rfc4514_string()}' allows."
            )
        if not _issued_by(path[position - 1], certificate):
            return (
                f"The certificate '{path[position - 1].subject.rfc4514_string()}' is not issued "
                f"by '{certificate.subject.rfc4514_string()}': the chain does not reach a "
                "trusted root."
            )
    return None


def verify_chain(
    header: Mapping[str, Any], trusted_roots: Sequence[TrustedRoot]
) -> x509.Certificate:
    """The leaf of the header's `x5c` if it chains to a trusted root with the trusted subject."""
    chain = _decode_x5c(header.get("x5c"))
    leaf = chain[0]
    # RFC 7515 4.1.6-4.1.8: x5c's first certificate and x5t/x5t#S256 both name the certificate
    # of the signing key, so a thumbprint sent along must be that certificate's.
    sha1, sha256 = thumbprints(leaf)
    sent_sha1 = str(header.get("x5t", sha1)).rstrip("=")
    sent_sha256 = str(header.get("x5t#S256", sha256)).rstrip("=")
    if (sent_sha1, sent_sha256) != (sha1, sha256):
        raise _chain_error("The thumbprint in the header is not that of the first x5c certificate.")
    candidates = [t for t in trusted_roots if _subject_matches(leaf, t.subject)]
    if not candidates:
        raise _chain_error(
            f"The certificate subject '{leaf.subject.rfc4514_string()}' is not a trusted "
            "subject name for this application."
        )
    reasons = [_chain_to(chain, trusted) for trusted in candidates]
    if None not in reasons:
        raise _chain_error(str(reasons[-1]))
    return leaf


# -- federated credentials (workload identity) ------------------------------------------------


def verify_federated_assertion(
    assertion: str, header: Mapping[str, Any], claims: Mapping[str, Any], app: AppRegistration
) -> None:
    """A token from an external issuer (a Kubernetes cluster) that a federated identity
    credential of the app names by issuer, subject and audience; `header` and `claims` are the
    assertion's, not yet verified."""
    issuer, subject, audience = claims.get("iss"), claims.get("sub"), claims.get("aud")
    # RFC 7519 4.1.3: `aud` is one string or an array of them.
    audiences = [audience] if isinstance(audience, str) else audience
    audiences = [a for a in audiences if isinstance(a, str)] if isinstance(audiences, list) else []
    records = [f for f in app.federated if f.issuer.issuer == issuer]
    if not records:
        raise reject(
            400,
            "invalid_request",
            700211,
            f"No matching federated identity record found for presented assertion issuer "
            f"'{issuer}'. Please note that the matching is done using a case-sensitive comparison.",
        )
    keys = {r.issuer.key_id: r.issuer.public_key for r in records}
    key = keys.get(str(header.get("kid")))
    if key is None:
        raise invalid_client(
            7000272,
            f"The certificate with identifier {header.get('kid')} used to sign the federated "
            f"credential could not be found in the metadata of identity provider {issuer}.",
        )
    try:
        jwt.decode(assertion, key, algorithms=["RS256"], options=_SIGNATURE_ONLY)
    except jwt.InvalidTokenError as exc:
        raise invalid_client(
            700027, f"Client assertion failed signature validation. ({exc})"
        ) from exc
    check_lifetime(claims)
    if not any(r.audience in audiences for r in records):
        raise reject(
            400,
            "invalid_request",
            700212,
            f"No matching federated identity record found for presented assertion audience "
            f"'{','.join(audiences)}'.",
        )
    if not any(r.subject == subject and r.audience in audiences for r in records):
        raise reject(
            400,
            "invalid_request",
            70021,
            "No matching federated identity record found for presented assertion. Assertion "
            f"Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: "
            f"'{','.join(audiences)}'.",
        )


def check_lifetime(claims: Mapping[str, Any]) -> None:
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if (
        not isinstance(exp, int | float)
        or not isinstance(nbf, int | float)
        or exp <= now
        or nbf > now + CLOCK_SKEW
    ):
        raise invalid_client(
            700024,
            f"Client assertion is not within its valid time range. Current time: "
            f"{timestamp(now)}, assertion valid from {describe_time(nbf)}, "
            f"expiry time of assertion {describe_time(exp)}.",
        )
