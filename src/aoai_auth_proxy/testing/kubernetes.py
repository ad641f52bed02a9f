"""A stand-in Kubernetes service-account token issuer, signing as an AKS cluster's OIDC issuer."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .pki import RSA_KEY_BITS

# The audience Entra requires of a federated assertion, and what AKS workload identity
# projects into the pod's token (azure-workload-identity's webhook sets it).
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # noqa: S105 - not a secret
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# Seconds; the kubelet's projected service-account tokens for workload identity last an hour.
DEFAULT_TOKEN_LIFETIME = 3600.0


def _key_id(key: rsa.RSAPublicKey) -> str:
    """How the Kubernetes API server names its signing key: base64url(SHA-256(PKIX DER))."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.urlsafe_b64encode(digest.finalize()).decode("ascii").rstrip("=")


def _new_issuer_url() -> str:
    return f"https://oidc.prod-aks.azure.com/{uuid.uuid4()}/"


@dataclass(frozen=True)
class KubernetesIssuer:
    """Signs service-account tokens (RS256, `kid` header) for one cluster's issuer URL.

    The URL need not be reachable: `EntraStandIn.register_federated_credential()` takes this
    object and reads the public key from it instead of fetching the issuer's JWKS.
    """

    issuer: str = field(default_factory=_new_issuer_url)
    private_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(
            public_exponent=65537, key_size=RSA_KEY_BITS
        ),
        repr=False,
    )

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return _key_id(self.public_key)

    def jwks(self) -> dict[str, Any]:
        """The issuer's `/openid/v1/jwks` document."""
        jwk = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.key_id, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def mint(
        self,
        subject: str,
        *,
        audience: str = TOKEN_EXCHANGE_AUDIENCE,
        lifetime: float = DEFAULT_TOKEN_LIFETIME,
    ) -> str:
        """A projected service-account token for `subject`
        (`system:serviceaccount:<namespace>:<name>`); a negative `lifetime` mints an expired one."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": [audience],
            "iss": self.issuer,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "jti": str(uuid.uuid4()),
        }
        namespace, _, name = subject.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if subject.startswith(SERVICE_ACCOUNT_PREFIX) and namespace and name:
            claims["kubernetes.io"] = {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            }
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.key_id})
