"""Offline stand-ins for Microsoft Entra ID and Azure OpenAI, over real TLS sockets on loopback.

ca = CertificateAuthority.create()
client = ca.issue_client_certificate("my-app")
async with EntraStandIn(ca) as entra, AzureOpenAIStandIn(entra, ca) as aoai:
    entra.register_client(TENANT_ID, CLIENT_ID, client.certificate)
    # point AZURE_AUTHORITY_HOST at entra.authority, API_BASE_URL at aoai.base_url,
    # SSL_CERT_FILE at ca.write_ca_file(path), AZURE_CERTIFICATE_PATH at client.write(path)

Apps may also sign in with a client secret (`register_secret`), a certificate chain to a trusted
root (`register_trusted_root`, assertions with `x5c`), or a Kubernetes service-account token
(`register_federated_credential` with a `KubernetesIssuer`); `ManagedIdentityEndpoint` serves
App Service style managed identity tokens (`IDENTITY_ENDPOINT`/`IDENTITY_HEADER`).

The Azure OpenAI stand-in also serves the Realtime API over WebSocket (`wss://`, both
`/openai/realtime?api-version=...&deployment=...` and `/openai/v1/realtime?model=...`): each
session is recorded in `aoai.realtime_sessions` as a `RealtimeSession`. Offering the `echo`
subprotocol turns a session into a raw frame echo; the stand-in extension events
`{"type": "test.close", "code": 4001, "reason": "bye"}` and `{"type": "test.drop"}` make the
server close the session or drop the connection.
"""

from .aoai import AzureOpenAIStandIn, RecordedRequest
from .entra import EntraStandIn, InvalidAccessToken
from .kubernetes import TOKEN_EXCHANGE_AUDIENCE, KubernetesIssuer
from .managed_identity import ManagedIdentityEndpoint
from .pki import CertificateAuthority, ClientCertificate, ServerCertificate
from .realtime import (
    ECHO_SUBPROTOCOL,
    REALTIME_SUBPROTOCOL,
    RESPONSE_AUDIO,
    TEST_CLOSE_EVENT,
    TEST_DROP_EVENT,
    RealtimeSession,
    response_text,
)

__all__ = [
    "ECHO_SUBPROTOCOL",
    "REALTIME_SUBPROTOCOL",
    "RESPONSE_AUDIO",
    "TEST_CLOSE_EVENT",
    "TEST_DROP_EVENT",
    "TOKEN_EXCHANGE_AUDIENCE",
    "AzureOpenAIStandIn",
    "CertificateAuthority",
    "ClientCertificate",
    "EntraStandIn",
    "InvalidAccessToken",
    "KubernetesIssuer",
    "ManagedIdentityEndpoint",
    "RealtimeSession",
    "RecordedRequest",
    "ServerCertificate",
    "response_text",
]
