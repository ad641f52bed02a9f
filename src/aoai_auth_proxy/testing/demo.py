"""A complete offline environment: throw-away PKI, Entra and Azure OpenAI stand-ins, settings."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .aoai import AzureOpenAIStandIn
from .entra import EntraStandIn
from .pki import CertificateAuthority

DEMO_TENANT_ID = "00000000-0000-4000-8000-00000000d3e0"
DEMO_CLIENT_ID = "00000000-0000-4000-8000-0000000c1e47"


@asynccontextmanager
async def demo_environment(*, port: int = 8080) -> AsyncIterator[dict[str, str]]:
    """Start both stand-ins and yield the environment that points the proxy at them.

    The certificate, key and CA live in a temporary directory removed on exit; the proxy
    trusts the stand-ins' CA through SSL_CERT_FILE, exactly as it would trust a private CA.
    """
    with tempfile.TemporaryDirectory(prefix="aoai-auth-proxy-demo-") as directory:
        ca = CertificateAuthority.create("aoai-auth-proxy demo CA")
        client = ca.issue_client_certificate(
            "aoai-auth-proxy demo client",
            not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=365),  # no expiry warning
        )
        certificate = client.write(Path(directory, "certificate.pem"))
        ca_file = ca.write_ca_file(Path(directory, "ca.pem"))
        async with EntraStandIn(ca) as entra, AzureOpenAIStandIn(entra, ca) as aoai:
            entra.register_client(DEMO_TENANT_ID, DEMO_CLIENT_ID, client.certificate)
            yield {
                "AZURE_CLIENT_ID": DEMO_CLIENT_ID,
                "AZURE_TENANT_ID": DEMO_TENANT_ID,
                "AZURE_CERTIFICATE_PATH": str(certificate),
                "AZURE_AUTHORITY_HOST": entra.authority,
                "API_BASE_URL": aoai.base_url,
                "SSL_CERT_FILE": str(ca_file),
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "PROXY_SHUTDOWN_TIMEOUT": "5",
            }
