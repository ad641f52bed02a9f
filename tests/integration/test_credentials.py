"""Every sign-in method end to end through the proxy, and rotation without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from aoai_auth_proxy.app import TOKEN_SOURCE
from aoai_auth_proxy.credentials import RefreshingTokenSource
from aoai_auth_proxy.testing import (
    AzureOpenAIStandIn,
    CertificateAuthority,
    ClientCertificate,
    EntraStandIn,
    KubernetesIssuer,
    ManagedIdentityEndpoint,
)
from tests.conftest import CLIENT_ID, TENANT_ID, ProxyFactory, RunningProxy

EMBEDDINGS = "/openai/deployments/e/embeddings?api-version=2024-10-21"
NO_CERTIFICATE = {"AZURE_CERTIFICATE_PATH": ""}


async def call(proxy: RunningProxy) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + EMBEDDINGS, json={"input": "x"}, headers={"api-key": "k"}) as r,
    ):
        await r.read()
        return r.status


def source_of(proxy: RunningProxy) -> RefreshingTokenSource:
    source = proxy.app[TOKEN_SOURCE]
    assert isinstance(source, RefreshingTokenSource)
    return source


def last_client(aoai: AzureOpenAIStandIn) -> str | None:
    return aoai.requests[-1].client_id


async def test_client_secret_from_a_file_is_used_and_rotated(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn, tmp_path: Path
) -> None:
    entra.register_secret(TENANT_ID, CLIENT_ID, "first-secret")
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret\n")
    proxy = await make_proxy(**NO_CERTIFICATE, AZURE_CLIENT_SECRET_FILE=str(secret_file))
    assert await call(proxy) == 200
    assert last_client(aoai) == CLIENT_ID

    entra.register_secret(TENANT_ID, CLIENT_ID, "second-secret")
    secret_file.write_text("second-secret\n")
    entra.revoke_secret(TENANT_ID, CLIENT_ID, "first-secret")
    await source_of(proxy).refresh()  # only the new secret can succeed now
    assert await call(proxy) == 200


async def test_wrong_client_secret_names_the_entra_error(
    make_proxy: ProxyFactory, entra: EntraStandIn
) -> None:
    entra.register_secret(TENANT_ID, CLIENT_ID, "right")
    proxy = await make_proxy(ready=False, **NO_CERTIFICATE, AZURE_CLIENT_SECRET="wrong")
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + EMBEDDINGS, json={}) as r,
    ):
        assert r.status == 503
        assert "AADSTS7000215" in (await r.json())["error"]["message"]


async def test_workload_identity_with_exactly_what_aks_injects(
    make_proxy: ProxyFactory, entra: EntraStandIn, aoai: AzureOpenAIStandIn, tmp_path: Path
) -> None:
    issuer = KubernetesIssuer()
    subject = "system:serviceaccount:shop:checkout"
    entra.register_federated_credential(TENANT_ID, CLIENT_ID, issuer, subject)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(issuer.mint(subject))
    proxy = await make_proxy(**NO_CERTIFICATE, AZURE_FEDERATED_TOKEN_FILE=str(token_file))
    assert await call(proxy) == 200
    assert last_client(aoai) == CLIENT_ID

    # the kubelet rewrites the projected token; the next fetch presents the new one
    token_file.write_text(issuer.mint(subject, lifetime=7200))
    await source_of(proxy).refresh()
    assert await call(proxy) == 200


async def test_subject_name_issuer_sends_the_chain(
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    intermediate = ca.create_intermediate("issuing CA")
    leaf = intermediate.issue_client_certificate("sni-client")
    entra.register_trusted_root(TENANT_ID, "sni-app", ca.certificate, "CN=sni-client")
    path = tmp_path / "sni.pem"
    path.write_bytes(leaf.pem_with_chain)
    proxy = await make_proxy(
        AZURE_CLIENT_ID="sni-app",
        AZURE_CERTIFICATE_PATH=str(path),
        AZURE_CLIENT_SEND_CERTIFICATE_CHAIN="true",
    )
    assert await call(proxy) == 200
    assert last_client(aoai) == "sni-app"


async def test_without_the_chain_flag_an_sni_app_is_refused(
    make_proxy: ProxyFactory, entra: EntraStandIn, ca: CertificateAuthority, tmp_path: Path
) -> None:
    leaf = ca.issue_client_certificate("sni-client")
    entra.register_trusted_root(TENANT_ID, "sni-app", ca.certificate, "CN=sni-client")
    path = leaf.write(tmp_path / "sni.pem")
    proxy = await make_proxy(
        ready=False, AZURE_CLIENT_ID="sni-app", AZURE_CERTIFICATE_PATH=str(path)
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + EMBEDDINGS, json={}) as r,
    ):
        assert r.status == 503
        assert "AADSTS700027" in (await r.json())["error"]["message"]


async def test_pfx_with_a_password_file(
    make_proxy: ProxyFactory, client_certificate: ClientCertificate, tmp_path: Path
) -> None:
    pfx = tmp_path / "client.pfx"
    pfx.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"client",
            client_certificate.private_key,
            client_certificate.certificate,
            None,
            serialization.BestAvailableEncryption(b"pfx-password"),
        )
    )
    password = tmp_path / "password"
    password.write_text("pfx-password\n")
    proxy = await make_proxy(
        AZURE_CERTIFICATE_PATH=str(pfx), AZURE_CLIENT_CERTIFICATE_PASSWORD_FILE=str(password)
    )
    assert await call(proxy) == 200


@pytest.mark.parametrize("user_assigned", [False, True])
async def test_managed_identity_through_the_identity_endpoint(
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    aoai: AzureOpenAIStandIn,
    monkeypatch: pytest.MonkeyPatch,
    user_assigned: bool,
) -> None:
    system_id, user_id = (
        "5ca1ab1e-0000-4000-8000-000000000001",
        "5ca1ab1e-0000-4000-8000-000000000002",
    )
    async with ManagedIdentityEndpoint(
        entra,
        tenant_id=TENANT_ID,
        system_client_id=system_id,
        user_assigned={user_id: "/subscriptions/s/resourceGroups/g/providers/x/identities/u"},
    ) as endpoint:
        # azure-identity reads these from the process environment, as App Service sets them
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.endpoint)
        monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
        proxy = await make_proxy(
            **NO_CERTIFICATE,
            AZURE_CREDENTIAL="managed_identity",
            AZURE_CLIENT_ID=user_id if user_assigned else "",
            AZURE_TENANT_ID="",
        )
        assert await call(proxy) == 200
        assert last_client(aoai) == (user_id if user_assigned else system_id)
        assert endpoint.requests == 1


def k8s_secret_volume(root: Path, files: dict[str, bytes], generation: int) -> None:
    """Lay out files as the kubelet does for a Secret volume: `<name> -> ..data/<name>`,
    `..data -> ..<timestamp>`, and an update swaps `..data` atomically."""
    version = root / f"..2026_11_28_00_00_{generation:02d}.000000000"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_bytes(content)
    staging = root / "..data_tmp"
    staging.unlink(missing_ok=True)
    staging.symlink_to(version.name)
    os.replace(staging, root / "..data")
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


async def test_certificate_rotated_by_secret_symlink_swap_under_load(
    make_proxy: ProxyFactory,
    entra: EntraStandIn,
    ca: CertificateAuthority,
    client_certificate: ClientCertificate,
    tmp_path: Path,
) -> None:
    volume = tmp_path / "certs"
    volume.mkdir()
    k8s_secret_volume(volume, {"certificate.pem": client_certificate.pem}, 1)
    proxy = await make_proxy(AZURE_CERTIFICATE_PATH=str(volume / "certificate.pem"))
    source = source_of(proxy)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                async with session.post(proxy.url + EMBEDDINGS, json={"input": "x"}) as r:
                    statuses.append(r.status)

    traffic = asyncio.create_task(load())
    await asyncio.sleep(0.3)
    renewed = ca.issue_client_certificate("aoai-auth-proxy test client, renewed")
    entra.register_client(TENANT_ID, CLIENT_ID, renewed.certificate)
    k8s_secret_volume(volume, {"certificate.pem": renewed.pem}, 2)
    await source.refresh()
    await asyncio.sleep(0.3)
    entra.revoke_certificate(TENANT_ID, CLIENT_ID, client_certificate.certificate)
    await source.refresh()  # succeeds only with the renewed certificate
    await asyncio.sleep(0.3)
    stop.set()
    await traffic
    assert len(statuses) > 20
    assert set(statuses) == {200}
    assert entra.seen_thumbprints[-1] == renewed.thumbprint_sha256


async def test_half_written_certificate_is_refused_and_the_old_one_keeps_working(
    make_proxy: ProxyFactory,
    client_certificate: ClientCertificate,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = client_certificate.write(tmp_path / "certificate.pem")
    proxy = await make_proxy(AZURE_CERTIFICATE_PATH=str(path))
    path.write_bytes(client_certificate.pem[: len(client_certificate.pem) // 2])
    with caplog.at_level(logging.WARNING, logger="aoai_auth_proxy"):
        await source_of(proxy).refresh()
    assert await call(proxy) == 200
    assert any(
        "cannot be used, keeping the previous one" in record.getMessage()
        and str(path) in record.getMessage()
        for record in caplog.records
    )
