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
"""

from .aoai import AzureOpenAIStandIn, RecordedRequest
from .entra import EntraStandIn, InvalidAccessToken
from .kubernetes import TOKEN_EXCHANGE_AUDIENCE, KubernetesIssuer
from .managed_identity import ManagedIdentityEndpoint
from .pki import CertificateAuthority, ClientCertificate, ServerCertificate

__all__ = [
    "TOKEN_EXCHANGE_AUDIENCE",
    "AzureOpenAIStandIn",
    "CertificateAuthority",
    "ClientCertificate",
    "EntraStandIn",
    "InvalidAccessToken",
    "KubernetesIssuer",
    "ManagedIdentityEndpoint",
    "RecordedRequest",
    "ServerCertificate",
]
