"""The public stand-ins, driven over loopback TLS by aiohttp, azure-identity and the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import hashlib
import itertools
import json
import stat
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CertificateCredential as SyncCertificateCredential
from azure.identity._internal import AadClientCertificate
from azure.identity.aio import CertificateCredential
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from multidict import CIMultiDict
from openai import AsyncAzureOpenAI, AuthenticationError, PermissionDeniedError
from yarl import URL

from aoai_auth_proxy.testing import (
    AzureOpenAIStandIn,
    CertificateAuthority,
    ClientCertificate,
    EntraStandIn,
    InvalidAccessToken,
)

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SCOPE = "https://cognitiveservices.azure.com/.default"
AUDIENCE = "https://cognitiveservices.azure.com"
API_VERSION = "2024-10-21"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest_asyncio.fixture
async def entra(
    ca: CertificateAuthority, client_certificate: ClientCertificate
) -> AsyncIterator[EntraStandIn]:
    async with EntraStandIn(ca) as stand_in:
        stand_in.register_client(TENANT, CLIENT, client_certificate.certificate)
        yield stand_in


@pytest_asyncio.fixture
async def aoai(entra: EntraStandIn, ca: CertificateAuthority) -> AsyncIterator[AzureOpenAIStandIn]:
    async with AzureOpenAIStandIn(entra, ca) as stand_in:
        yield stand_in


@pytest.fixture
def ca_file(ca: CertificateAuthority, tmp_path: Path) -> Path:
    return ca.write_ca_file(tmp_path / "ca.pem")


@pytest_asyncio.fixture
async def http(ca: CertificateAuthority) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=ca.client_ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def fetch_token(
    entra: EntraStandIn,
    ca_file: Path,
    certificate: ClientCertificate,
    *,
    tenant: str = TENANT,
    client: str = CLIENT,
) -> str:
    # retry_total=0: a scripted 5xx fails at once instead of after azure-core's backoff.
    async with CertificateCredential(
        tenant,
        client,
        certificate_data=certificate.pem,
        authority=entra.authority,
        connection_verify=str(ca_file),
        retry_total=0,
    ) as credential:
        return (await credential.get_token(SCOPE)).token


def sign_assertion(
    entra: EntraStandIn,
    certificate: ClientCertificate,
    *,
    algorithm: str = "PS256",
    header: dict[str, Any] | None = None,
    key: Any = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    der = certificate.certificate.public_bytes(serialization.Encoding.DER)
    sha256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    body = {
        "aud": entra.token_endpoint(TENANT),
        "iss": CLIENT,
        "sub": CLIENT,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None},
        key if key is not None else certificate.private_key,
        algorithm=algorithm,
        headers=header if header is not None else {"x5t#S256": sha256},
    )


async def post_token(
    http: aiohttp.ClientSession, entra: EntraStandIn, **form: str
) -> tuple[int, dict[str, Any]]:
    fields = {
        "client_id": CLIENT,
        "grant_type": "client_credentials",
        "scope": SCOPE,
        "client_assertion_type": JWT_BEARER,
        **form,
    }
    async with http.post(entra.token_endpoint(TENANT), data=fields) as response:
        return response.status, await response.json()


def aadsts(body: dict[str, Any]) -> int:
    codes = body["error_codes"]
    assert isinstance(codes, list)
    return int(codes[0])


# -- pki -------------------------------------------------------------------------------------


def test_client_pem_is_what_azure_identity_reads(
    client_certificate: ClientCertificate, tmp_path: Path
) -> None:
    loaded = AadClientCertificate(client_certificate.pem)
    sha1 = bytes.fromhex(client_certificate.thumbprint_sha1)
    assert base64.urlsafe_b64decode(loaded.thumbprint) == sha1
    assert client_certificate.thumbprint_sha1.isupper()
    assert len(bytes.fromhex(client_certificate.thumbprint_sha256)) == 32
    written = client_certificate.write(tmp_path / "client.pem")
    assert written.read_bytes() == client_certificate.pem
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_server_certificate_names_ip_literals_and_dns_names(ca: CertificateAuthority) -> None:
    server = ca.issue_server_certificate(("127.0.0.1", "localhost", "::1"))
    certificate = x509.load_pem_x509_certificate(server.certificate_pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert certificate.issuer == ca.certificate.subject


# -- entra: through azure-identity -----------------------------------------------------------


async def test_certificate_credential_gets_a_token_the_stand_in_verifies(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    token = await fetch_token(entra, ca_file, client_certificate)

    claims = entra.verify_access_token(token, audience=AUDIENCE)
    assert claims["aud"] == AUDIENCE
    assert claims["iss"] == f"https://sts.windows.net/{TENANT}/"
    assert claims["tid"] == TENANT
    assert claims["appid"] == claims["azp"] == CLIENT
    assert claims["ver"] == "1.0"
    assert claims["exp"] - claims["iat"] == 3600
    assert 1300 <= len(token) <= 1700  # the size of a real Entra access token
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert entra.token_requests == 1
    assert entra.issued == [claims]


async def test_every_token_has_its_own_jti(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    await fetch_token(entra, ca_file, client_certificate)
    await fetch_token(entra, ca_file, client_certificate)
    assert len({claims["jti"] for claims in entra.issued}) == 2


async def test_sync_msal_stack_works_with_instance_discovery_off(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    credential = SyncCertificateCredential(
        TENANT,
        CLIENT,
        certificate_data=client_certificate.pem,
        authority=entra.authority,
        connection_verify=str(ca_file),
        disable_instance_discovery=True,
    )
    with credential:
        token = await asyncio.to_thread(credential.get_token, SCOPE)
    assert entra.verify_access_token(token.token, audience=AUDIENCE)["appid"] == CLIENT


async def test_unregistered_certificate_is_refused_with_aadsts700027(
    entra: EntraStandIn, ca: CertificateAuthority, ca_file: Path
) -> None:
    stranger = ca.issue_client_certificate("not registered")
    with pytest.raises(ClientAuthenticationError, match="AADSTS700027") as caught:
        await fetch_token(entra, ca_file, stranger)
    assert "The key was not found" in str(caught.value)


async def test_unknown_client_is_refused_with_aadsts700016(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    with pytest.raises(ClientAuthenticationError, match="AADSTS700016"):
        await fetch_token(entra, ca_file, client_certificate, client=str(uuid.uuid4()))


async def test_unknown_tenant_is_refused_with_aadsts90002(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    with pytest.raises(ClientAuthenticationError, match="AADSTS90002"):
        await fetch_token(entra, ca_file, client_certificate, tenant=str(uuid.uuid4()))


async def test_expired_registered_certificate_is_refused(
    entra: EntraStandIn, ca: CertificateAuthority, ca_file: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = ca.issue_client_certificate(
        "expired", not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
    )
    entra.register_client(TENANT, CLIENT, expired.certificate)
    with pytest.raises(ClientAuthenticationError, match=r"AADSTS700027.*expired"):
        await fetch_token(entra, ca_file, expired)


async def test_rotation_accepts_every_registered_certificate_until_revoked(
    entra: EntraStandIn,
    ca: CertificateAuthority,
    ca_file: Path,
    client_certificate: ClientCertificate,
) -> None:
    successor = ca.issue_client_certificate("successor")
    entra.register_client(TENANT, CLIENT, successor.certificate)
    await fetch_token(entra, ca_file, client_certificate)
    await fetch_token(entra, ca_file, successor)

    entra.revoke_certificate(TENANT, CLIENT, client_certificate.certificate)
    with pytest.raises(ClientAuthenticationError, match="AADSTS700027"):
        await fetch_token(entra, ca_file, client_certificate)


async def test_fail_next_answers_in_entra_shape_then_recovers(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    entra.fail_next(
        1, status=401, error="invalid_client", code=7000222, description="The key is expired."
    )
    with pytest.raises(ClientAuthenticationError) as caught:
        await fetch_token(entra, ca_file, client_certificate)
    assert "(invalid_client) AADSTS7000222: The key is expired." in str(caught.value)

    await fetch_token(entra, ca_file, client_certificate)
    assert entra.token_requests == 2


async def test_fail_next_with_a_large_count_means_down(
    entra: EntraStandIn, ca_file: Path, client_certificate: ClientCertificate
) -> None:
    entra.fail_next(1_000_000)
    for _ in range(3):
        with pytest.raises(ClientAuthenticationError, match="AADSTS50001"):
            await fetch_token(entra, ca_file, client_certificate)
    entra.fail_next(0)
    await fetch_token(entra, ca_file, client_certificate)


async def test_token_lifetime_and_delay_knobs(
    entra: EntraStandIn, http: aiohttp.ClientSession, client_certificate: ClientCertificate
) -> None:
    entra.token_lifetime = 120
    entra.delay = 0.3
    started = time.monotonic()
    status, body = await post_token(
        http, entra, client_assertion=sign_assertion(entra, client_certificate)
    )
    assert time.monotonic() - started >= 0.3
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 120


# -- entra: requests azure-identity would never send -----------------------------------------


async def test_error_body_has_entras_exact_shape(
    entra: EntraStandIn, http: aiohttp.ClientSession, client_certificate: ClientCertificate
) -> None:
    correlation = str(uuid.uuid4())
    async with http.post(
        entra.token_endpoint(TENANT),
        data={"grant_type": "password"},
        headers={"client-request-id": correlation},
    ) as response:
        body = await response.json()
    assert response.status == 400
    assert set(body) == {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert body["error"] == "unsupported_grant_type"
    assert body["error_codes"] == [70003]
    assert body["correlation_id"] == correlation
    first_line, trace, corr, stamp = body["error_description"].split("\r\n")
    assert first_line.startswith("AADSTS70003: ")
    assert trace == f"Trace ID: {body['trace_id']}"
    assert corr == f"Correlation ID: {correlation}"
    assert stamp == f"Timestamp: {body['timestamp']}"


@pytest.mark.parametrize(
    ("make_form", "status", "code"),
    [
        pytest.param(lambda e, c: {"client_assertion": "not.a.jwt"}, 401, 50027, id="malformed"),
        pytest.param(lambda e, c: {}, 401, 7000218, id="no-assertion"),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c), "client_assertion_type": "x"},
            400,
            90011,
            id="assertion-type",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c), "scope": AUDIENCE},
            400,
            1002012,
            id="scope-without-default",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c, aud="https://elsewhere/t")},
            401,
            700023,
            id="audience",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c, iss="someone-else")},
            401,
            700021,
            id="issuer",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c, exp=int(time.time()) - 5)},
            401,
            700024,
            id="expired",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c, nbf=int(time.time()) + 300)},
            401,
            700024,
            id="not-yet-valid",
        ),
        pytest.param(
            lambda e, c: {"client_assertion": sign_assertion(e, c, header={"x5t": "AAAA"})},
            401,
            700027,
            id="unknown-thumbprint",
        ),
        pytest.param(
            lambda e, c: {
                "client_assertion": sign_assertion(
                    e, c, key=CertificateAuthority.create().private_key
                )
            },
            401,
            700027,
            id="bad-signature",
        ),
    ],
)
async def test_client_assertion_failures_carry_the_real_aadsts_code(
    entra: EntraStandIn,
    http: aiohttp.ClientSession,
    client_certificate: ClientCertificate,
    make_form: Any,
    status: int,
    code: int,
) -> None:
    got_status, body = await post_token(http, entra, **make_form(entra, client_certificate))
    assert (got_status, aadsts(body)) == (status, code), body["error_description"]
    assert body["error_description"].startswith(f"AADSTS{code}: ")


async def test_rs256_assertion_with_sha1_thumbprint_is_accepted(
    entra: EntraStandIn, http: aiohttp.ClientSession, client_certificate: ClientCertificate
) -> None:
    sha1 = client_certificate.certificate.fingerprint(hashes.SHA1())  # noqa: S303
    header = {"x5t": base64.urlsafe_b64encode(sha1).decode()}
    assertion = sign_assertion(entra, client_certificate, algorithm="RS256", header=header)
    status, body = await post_token(http, entra, client_assertion=assertion)
    assert status == 200, body


async def test_verify_access_token_refuses_other_audience_expiry_and_foreign_signers(
    entra: EntraStandIn, ca: CertificateAuthority
) -> None:
    with pytest.raises(InvalidAccessToken, match="audience"):
        entra.verify_access_token(
            entra.mint_access_token(TENANT, CLIENT, resource="https://management.azure.com"),
            audience=AUDIENCE,
        )
    with pytest.raises(InvalidAccessToken, match="expired"):
        entra.verify_access_token(
            entra.mint_access_token(TENANT, CLIENT, lifetime=-10), audience=AUDIENCE
        )
    other = EntraStandIn(ca)
    other.register_client(TENANT, CLIENT, ca.issue_client_certificate("x").certificate)
    with pytest.raises(InvalidAccessToken, match="signature"):
        entra.verify_access_token(other.mint_access_token(TENANT, CLIENT), audience=AUDIENCE)


# -- azure openai ----------------------------------------------------------------------------


def chat_url(aoai: AzureOpenAIStandIn, deployment: str = "gpt-4o") -> str:
    return f"{aoai.base_url}/openai/deployments/{deployment}/chat/completions"


CHAT_BODY = {"messages": [{"role": "user", "content": "hello there"}]}


async def test_valid_token_is_served_and_the_request_recorded_as_sent(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession
) -> None:
    token = entra.mint_access_token(TENANT, CLIENT)
    async with http.post(
        # encoded=True: aiohttp would otherwise normalise %2F in the query to "/".
        URL(chat_url(aoai) + "?api-version=2024-10-21&x=%2F", encoded=True),
        json=CHAT_BODY,
        # Same-case repeats: aiohttp's client keeps only the last of differently-cased ones.
        headers=CIMultiDict([("Authorization", f"Bearer {token}"), ("X-Tag", "a"), ("X-Tag", "b")]),
    ) as response:
        body = await response.json()
    assert response.status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["content"] == "Echo: hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["prompt_filter_results"][0]["prompt_index"] == 0
    assert body["usage"]["total_tokens"] == 5
    for name in ("apim-request-id", "x-request-id", "x-ms-region", "azureml-model-session"):
        assert response.headers[name]
    assert response.headers["x-ratelimit-remaining-requests"]

    [recorded] = aoai.requests
    assert recorded.method == "POST"
    assert (
        recorded.raw_path
        == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=%2F"
    )
    assert recorded.header("authorization") == f"Bearer {token}"
    assert recorded.header_values("x-tag") == ["a", "b"]
    assert ("X-Tag", "a") in recorded.headers
    assert recorded.client_id == CLIENT
    assert recorded.body_length > 0
    assert recorded.body_sha256 is not None


@pytest.mark.parametrize("name", ["api-key", "API-KEY", "Api-Key"])
async def test_any_api_key_is_refused_with_403_even_beside_a_valid_token(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession, name: str
) -> None:
    token = entra.mint_access_token(TENANT, CLIENT)
    async with http.post(
        chat_url(aoai) + "?api-version=" + API_VERSION,
        json=CHAT_BODY,
        headers={name: "secret", "Authorization": f"Bearer {token}"},
    ) as response:
        body = await response.json()
    assert response.status == 403
    assert response.headers["apim-request-id"]
    assert body == {
        "error": {
            "code": "AuthenticationTypeDisabled",
            "message": "Key based authentication is disabled for this resource.",
        }
    }
    assert aoai.requests[0].client_id is None


@pytest.mark.parametrize("case", ["missing", "expired", "other-audience", "garbage", "basic"])
async def test_bad_or_missing_bearer_token_gets_401(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession, case: str
) -> None:
    authorization = {
        "missing": None,
        "expired": "Bearer " + entra.mint_access_token(TENANT, CLIENT, lifetime=-1),
        "other-audience": "Bearer "
        + entra.mint_access_token(TENANT, CLIENT, resource="https://management.azure.com"),
        "garbage": "Bearer abc.def.ghi",
        "basic": "Basic dXNlcjpwYXNz",
    }[case]
    headers = {} if authorization is None else {"Authorization": authorization}
    async with http.post(
        chat_url(aoai) + "?api-version=" + API_VERSION, json=CHAT_BODY, headers=headers
    ) as response:
        body = await response.json()
    assert response.status == 401
    assert body["error"]["code"] == "401"
    assert response.headers["x-stand-in-auth-error"]


async def test_client_outside_allowed_clients_gets_permission_denied(
    entra: EntraStandIn, ca: CertificateAuthority, http: aiohttp.ClientSession
) -> None:
    async with AzureOpenAIStandIn(entra, ca, allowed_clients={"someone-else"}) as aoai:
        token = entra.mint_access_token(TENANT, CLIENT)
        async with http.post(
            chat_url(aoai) + "?api-version=" + API_VERSION,
            json=CHAT_BODY,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            body = await response.json()
    assert response.status == 401
    assert body["error"]["code"] == "PermissionDenied"


async def test_missing_api_version_and_unknown_paths_get_azures_404(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer " + entra.mint_access_token(TENANT, CLIENT)}
    for url in (chat_url(aoai), f"{aoai.base_url}/openai/nothing-here?api-version=1"):
        async with http.post(url, json=CHAT_BODY, headers=headers) as response:
            assert response.status == 404
            assert await response.json() == {
                "error": {"code": "404", "message": "Resource not found"}
            }


async def test_v1_routes_take_the_model_from_the_body(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer " + entra.mint_access_token(TENANT, CLIENT)}
    async with http.post(
        f"{aoai.base_url}/openai/v1/chat/completions",
        json={**CHAT_BODY, "model": "my-deployment"},
        headers=headers,
    ) as response:
        assert (await response.json())["model"] == "my-deployment"
    async with http.post(
        f"{aoai.base_url}/openai/v1/embeddings",
        json={"model": "emb", "input": ["a", "b c"]},
        headers=headers,
    ) as response:
        body = await response.json()
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == aoai.embedding_dimensions
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_stream_events_are_written_one_at_a_time(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, http: aiohttp.ClientSession
) -> None:
    aoai.stream_delay = 0.15
    headers = {"Authorization": "Bearer " + entra.mint_access_token(TENANT, CLIENT)}
    arrivals: list[tuple[float, bytes]] = []
    async with http.post(
        chat_url(aoai) + "?api-version=" + API_VERSION,
        json={**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
        headers=headers,
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                arrivals.append((time.monotonic(), event))
    assert buffer == b""
    events = [event.removeprefix(b"data: ") for _, event in arrivals]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"] == []
    assert chunks[0]["prompt_filter_results"]
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert words == ["Echo:", " hello", " there"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    # Seven events, each written after a pause: a buffered stream would arrive all at once.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.1


async def test_scripted_routes_win_and_still_pass_auth_and_recording(
    entra: EntraStandIn, ca: CertificateAuthority, http: aiohttp.ClientSession
) -> None:
    received: list[bytes] = []

    async def rate_limited(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": "429"}}, status=429, headers={"retry-after": "1"}
        )

    async def upload_hasher(request: web.Request) -> web.Response:
        async for chunk in request.content.iter_any():
            received.append(chunk)
        return web.Response(text=hashlib.sha256(b"".join(received)).hexdigest())

    aoai = AzureOpenAIStandIn(entra, ca)
    aoai.add_route("POST", "/openai/deployments/busy/chat/completions", rate_limited)
    aoai.add_route("PUT", "/upload", upload_hasher)
    async with aoai:
        token = entra.mint_access_token(TENANT, CLIENT)
        async with http.post(
            chat_url(aoai, "busy") + "?api-version=" + API_VERSION,
            json=CHAT_BODY,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 429
            assert response.headers["retry-after"] == "1"
        payload = b"x" * 300_000
        async with http.put(
            f"{aoai.base_url}/upload", data=payload, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert await response.text() == hashlib.sha256(payload).hexdigest()
        compressed = gzip.compress(b"unauthenticated")
        async with http.put(
            f"{aoai.base_url}/upload", data=compressed, headers={"Content-Encoding": "gzip"}
        ) as response:
            assert response.status == 401
    assert [r.client_id for r in aoai.requests] == [CLIENT, CLIENT, None]
    assert aoai.requests[1].body_length == len(payload)
    assert aoai.requests[1].body_sha256 is None  # the scripted handler consumed the stream
    # Recorded as sent: the stand-in never decompresses a request body.
    assert aoai.requests[2].body_sha256 == hashlib.sha256(compressed).hexdigest()


async def test_plain_http_resource_when_tls_is_off(
    entra: EntraStandIn, ca: CertificateAuthority
) -> None:
    async with AzureOpenAIStandIn(entra, ca, tls=False) as aoai, aiohttp.ClientSession() as http:
        assert aoai.base_url == f"http://127.0.0.1:{aoai.port}"
        async with http.post(chat_url(aoai) + "?api-version=" + API_VERSION) as response:
            assert response.status == 401


# -- the openai SDK, end to end --------------------------------------------------------------


@pytest_asyncio.fixture
async def openai_client(
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    ca_file: Path,
    client_certificate: ClientCertificate,
) -> AsyncIterator[AsyncAzureOpenAI]:
    token = await fetch_token(entra, ca_file, client_certificate)
    async with (
        httpx2.AsyncClient(verify=ca.client_ssl_context()) as http_client,
        AsyncAzureOpenAI(
            azure_endpoint=aoai.base_url,
            azure_ad_token=token,
            api_version=API_VERSION,
            http_client=http_client,
            max_retries=0,
        ) as client,
    ):
        yield client


async def test_openai_sdk_chat_completion(
    openai_client: AsyncAzureOpenAI, aoai: AzureOpenAIStandIn
) -> None:
    completion = await openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi sdk"}]
    )
    assert completion.choices[0].message.content == "Echo: hi sdk"
    assert completion.usage is not None
    assert aoai.requests[0].raw_path.startswith(
        f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"
    )
    assert aoai.requests[0].header("api-key") is None


async def test_openai_sdk_streamed_chat_completion(openai_client: AsyncAzureOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == "Echo: stream me please"
    assert usage is not None
    assert usage.completion_tokens == 4


async def test_openai_sdk_embeddings_base64_and_float_agree(
    openai_client: AsyncAzureOpenAI, aoai: AzureOpenAIStandIn
) -> None:
    # The SDK asks for base64 unless told otherwise and decodes little-endian float32 itself.
    default = await openai_client.embeddings.create(model="emb", input="same text")
    floats = await openai_client.embeddings.create(
        model="emb", input="same text", encoding_format="float"
    )
    assert default.data[0].embedding == floats.data[0].embedding
    assert len(floats.data[0].embedding) == aoai.embedding_dimensions
    assert abs(sum(v * v for v in floats.data[0].embedding) - 1.0) < 1e-5
    packed = struct.pack(f"<{aoai.embedding_dimensions}f", *floats.data[0].embedding)
    assert len(packed) == 4 * aoai.embedding_dimensions


async def test_openai_sdk_surfaces_403_and_401(
    entra: EntraStandIn, aoai: AzureOpenAIStandIn, ca: CertificateAuthority
) -> None:
    async with httpx2.AsyncClient(verify=ca.client_ssl_context()) as http_client:
        keyed = AsyncAzureOpenAI(
            azure_endpoint=aoai.base_url,
            api_key="a-key",
            api_version=API_VERSION,
            http_client=http_client,
            max_retries=0,
        )
        with pytest.raises(PermissionDeniedError) as denied:
            await keyed.chat.completions.create(model="d", messages=[])
        assert denied.value.code == "AuthenticationTypeDisabled"
        expired = AsyncAzureOpenAI(
            azure_endpoint=aoai.base_url,
            azure_ad_token=entra.mint_access_token(TENANT, CLIENT, lifetime=-1),
            api_version=API_VERSION,
            http_client=http_client,
            max_retries=0,
        )
        with pytest.raises(AuthenticationError):
            await expired.chat.completions.create(model="d", messages=[])
