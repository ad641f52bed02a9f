"""The subject-name/issuer client assertion we sign ourselves."""

from __future__ import annotations

import base64
from pathlib import Path

import jwt
from cryptography import x509

from aoai_auth_proxy.assertion import certificate_assertion, token_endpoint
from aoai_auth_proxy.certificate import load_client_certificate
from aoai_auth_proxy.testing import CertificateAuthority

NOW = 1_800_000_000.0


def test_assertion_carries_the_chain_and_verifies_with_the_leaf(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    intermediate = ca.create_intermediate("issuing CA")
    leaf = intermediate.issue_client_certificate("sni-client")
    path = tmp_path / "c.pem"
    path.write_bytes(leaf.pem + intermediate.certificate_pem + ca.certificate_pem)
    certificate = load_client_certificate(path)
    audience = token_endpoint("https://login.microsoftonline.com", "tenant")
    assert audience == "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"

    assertion = certificate_assertion(certificate, client_id="app", audience=audience, now=NOW)

    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "PS256"
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
    assert chain == [leaf.certificate, intermediate.certificate, ca.certificate]
    padded = header["x5t#S256"] + "=" * (-len(header["x5t#S256"]) % 4)
    assert base64.urlsafe_b64decode(padded).hex().upper() == leaf.thumbprint_sha256
    claims = jwt.decode(
        assertion,
        leaf.certificate.public_key(),  # type: ignore[arg-type]
        algorithms=["PS256"],
        audience=audience,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims["iss"] == claims["sub"] == "app"
    assert claims["exp"] - claims["nbf"] == 600
    assert claims["jti"]
