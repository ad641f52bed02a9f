"""Offline stand-ins for Microsoft Entra ID and Azure OpenAI, over real TLS sockets on loopback.

ca = CertificateAuthority.create()
client = ca.issue_client_certificate("my-app")
async with EntraStandIn(ca) as entra, AzureOpenAIStandIn(entra, ca) as aoai:
    entra.register_client(TENANT_ID, CLIENT_ID, client.certificate)
    # point AZURE_AUTHORITY_HOST at entra.authority, API_BASE_URL at aoai.base_url,
    # SSL_CERT_FILE at ca.write_ca_file(path), AZURE_CERTIFICATE_PATH at client.write(path)
"""

from .aoai import AzureOpenAIStandIn, RecordedRequest
from .entra import EntraStandIn, InvalidAccessToken
from .pki import CertificateAuthority, ClientCertificate, ServerCertificate

__all__ = [
    "AzureOpenAIStandIn",
    "CertificateAuthority",
    "ClientCertificate",
    "EntraStandIn",
    "InvalidAccessToken",
    "RecordedRequest",
    "ServerCertificate",
]
