"""Every log line, at debug level, in both formats: structured, and free of any secret."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization

from aoai_auth_proxy.testing import AzureOpenAIStandIn, ClientCertificate, EntraStandIn
from tests.conftest import CLIENT_ID, TENANT_ID, wait_ready
from tests.integration.test_forwarding import raw_request
from tests.integration.test_process import CHAT, ProxyProcess, spawn

CLIENT_SECRET = "client-secret-never-logged-0123456789"
INBOUND_KEY = "inbound-key-never-logged-0123456789"
PASSWORD = "certificate-password-never-logged"


def forwarded_tokens(aoai: AzureOpenAIStandIn) -> set[str]:
    return {(seen.header("authorization") or "").removeprefix("Bearer ") for seen in aoai.requests}


async def exercise(url: str, aoai: AzureOpenAIStandIn) -> None:
    """Success, streaming, a wrong key, a key in the query, a 400, and a 401 replay."""
    good = {"api-key": INBOUND_KEY}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + CHAT, json={"messages": []}, headers=good) as r:
            assert r.status == 200
        async with session.post(
            url + CHAT + f"&api-key={INBOUND_KEY}",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"Authorization": f"Bearer {INBOUND_KEY}"},
        ) as r:
            assert r.status == 200
            await r.read()
        async with session.post(
            url + CHAT, json={}, headers={"api-key": "wrong-" + INBOUND_KEY}
        ) as r:
            assert r.status == 401
        token = (aoai.requests[-1].header("authorization") or "").removeprefix("Bearer ")
        aoai.revoked_token_ids.add(jwt.decode(token, options={"verify_signature": False})["jti"])
        async with session.post(url + CHAT, json={"messages": []}, headers=good) as r:
            assert r.status == 200  # renewed and replayed: token events at every level
    status, _ = await raw_request(
        url,
        f"GET http://user:{INBOUND_KEY}@evil.example/ HTTP/1.1\r\nHost: localhost\r\n"
        f"api-key: {INBOUND_KEY}\r\n\r\n".encode(),
    )
    assert status == 400
    # malformed: refused by the HTTP parser itself, whose error quotes the request line
    for malformed in (
        f"GET evil.example:443?api-key={INBOUND_KEY} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        f"GET /x?api-key={INBOUND_KEY} HTTP/1.1\r\nHost: localhost\r\nBad\x01: v\r\n\r\n",
    ):
        status, _ = await raw_request(url, malformed.encode())
        assert status == 400


async def run_and_stop(env: dict[str, str], aoai: AzureOpenAIStandIn) -> ProxyProcess:
    """Run the proxy as a process through `exercise`, then SIGTERM it; its log is complete."""
    proxy = await spawn(env)
    url = await proxy.listening()
    await wait_ready(url)
    await exercise(url, aoai)
    proxy.process.send_signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    return proxy


def assert_clean(log: str, secrets: set[str]) -> None:
    for secret in secrets:
        assert secret
        assert secret not in log, f"a secret reached the log: {secret[:12]}..."


async def test_no_secret_reaches_any_json_log_line_at_debug_level(
    proxy_env: dict[str, str], entra: EntraStandIn, aoai: AzureOpenAIStandIn
) -> None:
    entra.register_secret(TENANT_ID, CLIENT_ID, CLIENT_SECRET)
    entra.fail_next(
        1,
        status=401,
        error="invalid_client",
        code=7000215,
        description=("AADSTS7000215: Invalid client secret provided."),
    )  # one failed fetch: the error paths log too
    env = {
        **proxy_env,
        "AZURE_CERTIFICATE_PATH": "",
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "PROXY_API_KEY": INBOUND_KEY,
        "PROXY_LOG_LEVEL": "DEBUG",
        "PROXY_LOG_FORMAT": "json",
    }
    proxy = await run_and_stop(env, aoai)

    entries = [json.loads(line) for line in proxy.lines if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    access = [e for e in entries if e["logger"] == "aoai_auth_proxy.access"]
    assert {e["status"] for e in access} >= {200, 401, 400}
    assert all("bytes_in" in e and "duration_ms" in e for e in access)
    assert any(e.get("replayed") for e in access)
    assert any("AADSTS7000215" in e["message"] for e in entries)
    tokens = forwarded_tokens(aoai)
    assert len(tokens) == 2
    assert_clean(proxy.log, {CLIENT_SECRET, INBOUND_KEY, *tokens, *(t[-40:] for t in tokens)})


async def test_no_certificate_text_or_password_reaches_the_log(
    proxy_env: dict[str, str],
    aoai: AzureOpenAIStandIn,
    client_certificate: ClientCertificate,
    tmp_path: Path,
) -> None:
    encrypted = tmp_path / "certificate.pem"
    key = client_certificate.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD.encode()),
    )
    encrypted.write_bytes(client_certificate.certificate_pem + key)
    env = {
        **proxy_env,
        "AZURE_CERTIFICATE_PATH": str(encrypted),
        "AZURE_CLIENT_CERTIFICATE_PASSWORD": PASSWORD,
        "PROXY_API_KEY": INBOUND_KEY,
        "PROXY_LOG_LEVEL": "DEBUG",
    }
    proxy = await run_and_stop(env, aoai)
    pem_lines = {
        line
        for block in (client_certificate.pem, key)
        for line in block.decode().splitlines()
        if line and not line.startswith("-----")
    }
    tokens = forwarded_tokens(aoai)
    assert_clean(proxy.log, {PASSWORD, INBOUND_KEY, *tokens, *pem_lines})
    assert client_certificate.thumbprint_sha1 in proxy.log  # what may be shown, is
