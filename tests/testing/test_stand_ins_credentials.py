"""Every way the proxy may sign in, driven against the Entra stand-in by azure-identity itself:
client secrets, certificate chains (subject name and issuer), workload identity federation and
App Service managed identity."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import (
    ClientAssertionCredential,
    ClientSecretCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aoai_auth_proxy.testing import (
    TOKEN_EXCHANGE_AUDIENCE,
    AzureOpenAIStandIn,
    CertificateAuthority,
    ClientCertificate,
    EntraStandIn,
    KubernetesIssuer,
    ManagedIdentityEndpoint,
)

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SCOPE = "https://cognitiveservices.azure.com/.default"
AUDIENCE = "https://cognitiveservices.azure.com"
SERVICE_ACCOUNT = "system:serviceaccount:ai:aoai-auth-proxy"
SNI_SUBJECT = "CN=aoai-auth-proxy.contoso.example"
SYSTEM_IDENTITY = "5e29463d-71da-4fe0-8e69-999b57db23b0"
USER_IDENTITY = "9eba17f1-6f2c-4a8e-b3f4-0d1e2c3b4a59"
USER_IDENTITY_RESOURCE = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/aoai-proxy"
)
# Anything that would reach IMDS (169.254.169.254) goes to this closed loopback port instead.
NOWHERE = "http://127.0.0.1:9"


@pytest_asyncio.fixture
async def entra(ca: CertificateAuthority) -> AsyncIterator[EntraStandIn]:
    async with EntraStandIn(ca) as stand_in:
        yield stand_in


@pytest.fixture(autouse=True)
def no_ambient_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """No managed identity selection from the machine's environment, and IMDS unreachable."""
    for name in (
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", NOWHERE)


async def get_token(credential: Any) -> AccessToken:
    async with credential:
        token = await credential.get_token(SCOPE)
    assert isinstance(token, AccessToken)
    return token


async def verified_claims(entra: EntraStandIn, credential: Any) -> dict[str, Any]:
    return entra.verify_access_token((await get_token(credential)).token, audience=AUDIENCE)


async def refused(credential: Any, code: str) -> str:
    """The message of the `ClientAuthenticationError` a token request ends in; it names `code`."""
    with pytest.raises(ClientAuthenticationError) as caught:
        await get_token(credential)
    message = str(caught.value)
    assert code in message
    return message


# -- client secrets --------------------------------------------------------------------------


def secret_credential(
    entra: EntraStandIn, ca_file: Path, secret: str, *, client: str = CLIENT
) -> ClientSecretCredential:
    return ClientSecretCredential(
        TENANT,
        client,
        secret,
        authority=entra.authority,
        connection_verify=str(ca_file),
        retry_total=0,
    )


async def test_client_secret_credential_gets_a_token_the_stand_in_verifies(
    entra: EntraStandIn, ca_file: Path
) -> None:
    entra.register_secret(TENANT, CLIENT, "s3cret~value")
    claims = await verified_claims(entra, secret_credential(entra, ca_file, "s3cret~value"))
    assert claims["appid"] == CLIENT
    assert claims["appidacr"] == "1"  # a client secret, not a certificate
    assert entra.issued == [claims]


async def test_secret_rotation_accepts_every_registered_secret_until_revoked(
    entra: EntraStandIn, ca_file: Path
) -> None:
    entra.register_secret(TENANT, CLIENT, "old")
    entra.register_secret(TENANT, CLIENT, "new")
    await get_token(secret_credential(entra, ca_file, "old"))
    await get_token(secret_credential(entra, ca_file, "new"))

    entra.revoke_secret(TENANT, CLIENT, "old")
    message = await refused(secret_credential(entra, ca_file, "old"), "AADSTS7000215")
    assert "Invalid client secret provided" in message
    await get_token(secret_credential(entra, ca_file, "new"))


async def test_wrong_secret_and_secret_for_a_certificate_only_app_get_aadsts7000215(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    entra.register_secret(TENANT, CLIENT, "right")
    await refused(secret_credential(entra, ca_file, "wrong"), "AADSTS7000215")
    other = str(uuid.uuid4())
    entra.register_client(TENANT, other, client_certificate.certificate)
    await refused(secret_credential(entra, ca_file, "right", client=other), "AADSTS7000215")


async def test_expired_secret_is_refused_with_aadsts7000222(
    entra: EntraStandIn, ca_file: Path
) -> None:
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    entra.register_secret(TENANT, CLIENT, "stale", not_after=yesterday)
    await refused(secret_credential(entra, ca_file, "stale"), "AADSTS7000222")


async def test_client_secret_basic_authentication_is_accepted(
    entra: EntraStandIn, ca: CertificateAuthority
) -> None:
    # RFC 6749 2.3.1: both parts are form-urlencoded before base64, so ':' survives.
    entra.register_secret(TENANT, CLIENT, "with:colon+plus")
    connector = aiohttp.TCPConnector(ssl=ca.client_ssl_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        form = {"grant_type": "client_credentials", "scope": SCOPE}
        for secret, status in (("with%3Acolon%2Bplus", 200), ("wrong", 401)):
            headers = {"Authorization": aiohttp.encode_basic_auth(CLIENT, secret)}
            async with http.post(
                entra.token_endpoint(TENANT), data=form, headers=headers
            ) as response:
                body = await response.json()
            assert response.status == status, body
    assert body["error_codes"] == [7000215]


# -- certificate chains: subject name and issuer ---------------------------------------------


@pytest.fixture(scope="module")
def intermediate(ca: CertificateAuthority) -> CertificateAuthority:
    return ca.create_intermediate("aoai-auth-proxy issuing CA")


@pytest.fixture(scope="module")
def sni_certificate(intermediate: CertificateAuthority) -> ClientCertificate:
    return intermediate.issue_client_certificate("aoai-auth-proxy.contoso.example")


def sni_assertion(
    entra: EntraStandIn,
    certificate: ClientCertificate,
    *,
    algorithm: str = "PS256",
    x5c: list[str] | None = None,
    key: rsa.RSAPrivateKey | None = None,
    thumbprint_of: x509.Certificate | None = None,
    **claims: Any,
) -> str:
    """What an SNI client (MSAL with `send_x5c`) signs: `x5c` carries the chain, leaf first."""
    der = (thumbprint_of or certificate.certificate).public_bytes(serialization.Encoding.DER)
    header = {
        "alg": algorithm,
        "typ": "JWT",
        "x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("="),
        "x5c": certificate.x5c if x5c is None else x5c,
    }
    now = int(time.time())
    body = {
        "aud": entra.token_endpoint(TENANT),
        "iss": CLIENT,
        "sub": CLIENT,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(body, key or certificate.private_key, algorithm=algorithm, headers=header)


def assertion_credential(
    entra: EntraStandIn, ca_file: Path, make: Callable[[], str]
) -> ClientAssertionCredential:
    return ClientAssertionCredential(
        TENANT,
        CLIENT,
        make,
        authority=entra.authority,
        connection_verify=str(ca_file),
        retry_total=0,
    )


def test_intermediate_ca_issues_certificates_that_carry_their_chain(
    ca: CertificateAuthority,
    intermediate: CertificateAuthority,
    sni_certificate: ClientCertificate,
) -> None:
    assert intermediate.chain == (ca.certificate,)
    assert sni_certificate.chain == (intermediate.certificate, ca.certificate)
    sni_certificate.certificate.verify_directly_issued_by(intermediate.certificate)
    intermediate.certificate.verify_directly_issued_by(ca.certificate)
    constraints = intermediate.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    pems = x509.load_pem_x509_certificates(sni_certificate.pem_with_chain)
    assert pems == [sni_certificate.certificate, intermediate.certificate, ca.certificate]
    assert sni_certificate.pem_with_chain.endswith(
        sni_certificate.pem.removeprefix(sni_certificate.certificate_pem)
    )
    # x5c is standard base64 (RFC 7515 4.1.6), which round-trips strictly.
    ders = [base64.b64decode(value, validate=True) for value in sni_certificate.x5c]
    assert [x509.load_der_x509_certificate(d) for d in ders] == pems


@pytest.mark.parametrize("algorithm", ["PS256", "RS256"])
@pytest.mark.parametrize("with_root", [True, False], ids=["root-in-x5c", "root-omitted"])
async def test_sni_assertion_chaining_to_a_trusted_root_gets_a_token(
    entra: EntraStandIn,
    ca: CertificateAuthority,
    ca_file: Path,
    sni_certificate: ClientCertificate,
    algorithm: str,
    with_root: bool,
) -> None:
    entra.register_trusted_root(TENANT, CLIENT, ca.certificate, SNI_SUBJECT)
    x5c = sni_certificate.x5c if with_root else sni_certificate.x5c[:-1]
    credential = assertion_credential(
        entra,
        ca_file,
        lambda: sni_assertion(entra, sni_certificate, algorithm=algorithm, x5c=x5c),
    )
    claims = await verified_claims(entra, credential)
    assert claims["appid"] == CLIENT
    assert claims["appidacr"] == "2"
    assert entra.seen_thumbprints == [sni_certificate.thumbprint_sha256]


async def test_trusted_subject_may_be_given_as_the_common_name(
    entra: EntraStandIn, ca: CertificateAuthority, ca_file: Path, sni_certificate: ClientCertificate
) -> None:
    entra.register_trusted_root(TENANT, CLIENT, ca.certificate, "aoai-auth-proxy.contoso.example")
    credential = assertion_credential(entra, ca_file, lambda: sni_assertion(entra, sni_certificate))
    assert (await verified_claims(entra, credential))["appid"] == CLIENT


def _url_safe(values: list[str]) -> list[str]:
    return [base64.urlsafe_b64encode(base64.b64decode(v)).decode() for v in values]


def _expired_intermediate(ca: CertificateAuthority) -> ClientCertificate:
    now = dt.datetime.now(dt.UTC)
    lapsed = ca.create_intermediate(
        "lapsed CA", not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1)
    )
    return lapsed.issue_client_certificate("aoai-auth-proxy.contoso.example")


SniCase = Callable[[EntraStandIn, CertificateAuthority, ClientCertificate], str]
SNI_FAILURES: list[Any] = [
    pytest.param(
        lambda e, ca, c: sni_assertion(
            e, ca.create_intermediate("x").issue_client_certificate("someone-else")
        ),
        "is not a trusted subject name",
        id="other-subject",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(
            e,
            CertificateAuthority.create()
            .create_intermediate("rogue issuing CA")
            .issue_client_certificate("aoai-auth-proxy.contoso.example"),
        ),
        "does not reach a trusted root",
        id="untrusted-root",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, c, x5c=c.x5c[:1]),
        "does not reach a trusted root",
        id="intermediate-missing",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, _expired_intermediate(ca)),
        "expired or not yet valid",
        id="expired-intermediate",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, c, x5c=_url_safe(c.x5c)),
        "not base64url",
        id="url-safe-x5c",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, c, x5c=["not base64!"]),
        "not base64url",
        id="garbage-x5c",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, c, key=CertificateAuthority.create().private_key),
        "not signed by the key of the first certificate",
        id="signed-by-another-key",
    ),
    pytest.param(
        lambda e, ca, c: sni_assertion(e, c, thumbprint_of=ca.certificate),
        "thumbprint in the header",
        id="thumbprint-not-of-leaf",
    ),
]


@pytest.mark.parametrize(("make", "reason"), SNI_FAILURES)
async def test_sni_chain_failures_are_refused_with_aadsts700027(
    entra: EntraStandIn,
    ca: CertificateAuthority,
    ca_file: Path,
    sni_certificate: ClientCertificate,
    make: SniCase,
    reason: str,
) -> None:
    entra.register_trusted_root(TENANT, CLIENT, ca.certificate, SNI_SUBJECT)
    assertion = make(entra, ca, sni_certificate)
    message = await refused(assertion_credential(entra, ca_file, lambda: assertion), "AADSTS700027")
    assert reason in message


async def test_sni_assertion_claims_are_still_checked(
    entra: EntraStandIn, ca: CertificateAuthority, ca_file: Path, sni_certificate: ClientCertificate
) -> None:
    entra.register_trusted_root(TENANT, CLIENT, ca.certificate, SNI_SUBJECT)
    wrong_audience = sni_assertion(entra, sni_certificate, aud="https://elsewhere/token")
    await refused(assertion_credential(entra, ca_file, lambda: wrong_audience), "AADSTS700023")
    expired = sni_assertion(entra, sni_certificate, exp=int(time.time()) - 5)
    await refused(assertion_credential(entra, ca_file, lambda: expired), "AADSTS700024")


async def test_x5c_without_a_trusted_root_is_refused_and_a_registered_thumbprint_still_works(
    entra: EntraStandIn, ca_file: Path, sni_certificate: ClientCertificate
) -> None:
    entra.register_secret(TENANT, CLIENT, "unrelated")
    credential = assertion_credential(entra, ca_file, lambda: sni_assertion(entra, sni_certificate))
    assert "The key was not found" in await refused(credential, "AADSTS700027")

    entra.register_client(TENANT, CLIENT, sni_certificate.certificate)
    credential = assertion_credential(entra, ca_file, lambda: sni_assertion(entra, sni_certificate))
    assert (await verified_claims(entra, credential))["appid"] == CLIENT


# -- workload identity federation ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> KubernetesIssuer:
    return KubernetesIssuer()


def federated_credential(
    entra: EntraStandIn, ca_file: Path, token: str
) -> ClientAssertionCredential:
    return assertion_credential(entra, ca_file, lambda: token)


def test_kubernetes_issuer_mints_service_account_tokens(cluster: KubernetesIssuer) -> None:
    token = cluster.mint(SERVICE_ACCOUNT)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": cluster.key_id}
    claims = jwt.decode(
        token, cluster.public_key, algorithms=["RS256"], audience=TOKEN_EXCHANGE_AUDIENCE
    )
    assert claims["iss"] == cluster.issuer
    assert cluster.issuer.startswith("https://oidc.prod-aks.azure.com/")
    assert claims["sub"] == SERVICE_ACCOUNT
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] == claims["iat"]
    assert claims["kubernetes.io"]["namespace"] == "ai"
    assert claims["kubernetes.io"]["serviceaccount"]["name"] == "aoai-auth-proxy"
    assert cluster.jwks()["keys"][0]["kid"] == cluster.key_id


async def test_client_assertion_credential_with_a_service_account_token_gets_a_token(
    entra: EntraStandIn, ca_file: Path, cluster: KubernetesIssuer
) -> None:
    entra.register_federated_credential(TENANT, CLIENT, cluster, SERVICE_ACCOUNT)
    credential = assertion_credential(entra, ca_file, lambda: cluster.mint(SERVICE_ACCOUNT))
    claims = await verified_claims(entra, credential)
    assert claims["appid"] == CLIENT


async def test_workload_identity_credential_reads_the_projected_token_file(
    entra: EntraStandIn, ca_file: Path, cluster: KubernetesIssuer, tmp_path: Path
) -> None:
    entra.register_federated_credential(TENANT, CLIENT, cluster, SERVICE_ACCOUNT)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(cluster.mint(SERVICE_ACCOUNT))
    credential = WorkloadIdentityCredential(
        tenant_id=TENANT,
        client_id=CLIENT,
        token_file_path=str(token_file),
        authority=entra.authority,
        connection_verify=str(ca_file),
        retry_total=0,
    )
    assert (await verified_claims(entra, credential))["appid"] == CLIENT


def _tampered(token: str) -> str:
    head, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{head}.{body}.{flipped}"


FederatedCase = Callable[[KubernetesIssuer], str]
FEDERATED_FAILURES: list[Any] = [
    pytest.param(
        lambda k: k.mint("system:serviceaccount:ai:someone-else"), "AADSTS70021", id="subject"
    ),
    pytest.param(
        lambda k: k.mint(SERVICE_ACCOUNT, audience="api://other"), "AADSTS700212", id="audience"
    ),
    pytest.param(
        lambda k: KubernetesIssuer().mint(SERVICE_ACCOUNT), "AADSTS700211", id="other-issuer"
    ),
    pytest.param(
        lambda k: KubernetesIssuer(issuer=k.issuer).mint(SERVICE_ACCOUNT),
        "AADSTS7000272",
        id="unknown-signing-key",
    ),
    pytest.param(lambda k: _tampered(k.mint(SERVICE_ACCOUNT)), "AADSTS700027", id="bad-signature"),
    pytest.param(lambda k: k.mint(SERVICE_ACCOUNT, lifetime=-10), "AADSTS700024", id="expired"),
]


@pytest.mark.parametrize(("make", "code"), FEDERATED_FAILURES)
async def test_federated_assertion_failures_carry_the_real_aadsts_code(
    entra: EntraStandIn, ca_file: Path, cluster: KubernetesIssuer, make: FederatedCase, code: str
) -> None:
    entra.register_federated_credential(TENANT, CLIENT, cluster, SERVICE_ACCOUNT)
    await refused(federated_credential(entra, ca_file, make(cluster)), code)


async def test_no_matching_record_message_names_issuer_subject_and_audience(
    entra: EntraStandIn, ca_file: Path, cluster: KubernetesIssuer
) -> None:
    entra.register_federated_credential(TENANT, CLIENT, cluster, SERVICE_ACCOUNT)
    token = cluster.mint("system:serviceaccount:default:default")
    message = await refused(federated_credential(entra, ca_file, token), "AADSTS70021")
    assert "No matching federated identity record found for presented assertion" in message
    assert f"Assertion Issuer: '{cluster.issuer}'" in message
    assert "Assertion Subject: 'system:serviceaccount:default:default'" in message
    assert f"Assertion Audience: '{TOKEN_EXCHANGE_AUDIENCE}'" in message


# -- managed identity (App Service / Container Apps) -----------------------------------------


@pytest_asyncio.fixture
async def identity_endpoint(
    entra: EntraStandIn, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ManagedIdentityEndpoint]:
    endpoint = ManagedIdentityEndpoint(
        entra,
        tenant_id=TENANT,
        system_client_id=SYSTEM_IDENTITY,
        user_assigned={USER_IDENTITY: USER_IDENTITY_RESOURCE},
    )
    async with endpoint:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.endpoint)
        monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
        yield endpoint


async def test_managed_identity_credential_gets_a_system_assigned_token(
    entra: EntraStandIn, identity_endpoint: ManagedIdentityEndpoint
) -> None:
    token = await get_token(ManagedIdentityCredential(retry_total=0))
    claims = entra.verify_access_token(token.token, audience=AUDIENCE)
    assert claims["appid"] == SYSTEM_IDENTITY
    assert claims["tid"] == TENANT
    assert claims["oid"] == EntraStandIn.object_id(TENANT, SYSTEM_IDENTITY)
    assert token.expires_on == claims["exp"]
    assert identity_endpoint.endpoint.startswith("http://127.0.0.1:")
    assert identity_endpoint.requests == 1
    assert entra.token_requests == 0  # the endpoint, not the token service, answered
    assert entra.issued == [claims]


@pytest.mark.parametrize(
    "selector",
    [
        pytest.param({"client_id": USER_IDENTITY}, id="client_id"),
        pytest.param({"identity_config": {"mi_res_id": USER_IDENTITY_RESOURCE}}, id="mi_res_id"),
        pytest.param(
            {"identity_config": {"object_id": EntraStandIn.object_id(TENANT, USER_IDENTITY)}},
            id="object_id",
        ),
    ],
)
async def test_managed_identity_credential_gets_a_user_assigned_token(
    entra: EntraStandIn, identity_endpoint: ManagedIdentityEndpoint, selector: dict[str, Any]
) -> None:
    token = await get_token(ManagedIdentityCredential(retry_total=0, **selector))
    claims = entra.verify_access_token(token.token, audience=AUDIENCE)
    assert claims["appid"] == USER_IDENTITY
    assert claims["xms_mirid"] == USER_IDENTITY_RESOURCE


async def test_azure_openai_stand_in_accepts_managed_identity_tokens(
    entra: EntraStandIn,
    identity_endpoint: ManagedIdentityEndpoint,
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
) -> None:
    token = await get_token(ManagedIdentityCredential(retry_total=0))
    connector = aiohttp.TCPConnector(ssl=ca.client_ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(
            f"{aoai.base_url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {token.token}"},
        ) as response,
    ):
        assert response.status == 200, await response.text()


async def test_unknown_user_assigned_identity_gets_app_services_400(
    identity_endpoint: ManagedIdentityEndpoint,
) -> None:
    credential = ManagedIdentityCredential(client_id=str(uuid.uuid4()), retry_total=0)
    with pytest.raises(ClientAuthenticationError) as caught:
        await get_token(credential)
    assert "No User Assigned or Delegated Managed Identity found" in str(caught.value)
    assert caught.value.status_code == 400


async def test_wrong_identity_header_gets_401(
    identity_endpoint: ManagedIdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-header")
    with pytest.raises(ClientAuthenticationError) as caught:
        await get_token(ManagedIdentityCredential(retry_total=0))
    assert caught.value.status_code == 401
    assert "X-IDENTITY-HEADER" in str(caught.value)


async def test_raw_requests_are_checked_like_app_service(
    identity_endpoint: ManagedIdentityEndpoint,
) -> None:
    good = {"api-version": "2019-08-01", "resource": AUDIENCE}
    header = {"X-IDENTITY-HEADER": identity_endpoint.header}
    cases: list[tuple[dict[str, str], dict[str, str], int]] = [
        (good, {}, 401),
        (good, header, 200),
        ({**good, "api-version": "2017-09-01"}, header, 400),
        ({"api-version": "2019-08-01"}, header, 400),
        ({**good, "client_id": USER_IDENTITY, "mi_res_id": USER_IDENTITY_RESOURCE}, header, 400),
        ({**good, "principal_id": EntraStandIn.object_id(TENANT, USER_IDENTITY)}, header, 200),
    ]
    async with aiohttp.ClientSession() as http:
        for params, headers, status in cases:
            async with http.get(identity_endpoint.endpoint, params=params, headers=headers) as r:
                body = await r.json()
            assert r.status == status, (params, body)
            if status != 200:
                assert set(body) == {"statusCode", "message", "correlationId"}
                assert body["statusCode"] == status
            else:
                assert set(body) == {
                    "access_token",
                    "expires_on",
                    "resource",
                    "token_type",
                    "client_id",
                }
                assert body["expires_on"].isdigit()
    assert identity_endpoint.requests == len(cases)
