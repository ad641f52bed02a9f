"""aoai-auth-proxy: an authentication sidecar for Azure OpenAI.

Apps speak the OpenAI / Azure OpenAI HTTP API to the proxy; it adds a Microsoft Entra ID token
(client credentials with a certificate), strips the app's own credentials, and streams requests
and responses through unchanged.
"""

from .app import create_app
from .config import Settings, load_settings
from .credentials import RefreshingTokenSource, TokenSource, TokenStatus
from .errors import ConfigError, ProxyError

__all__ = [
    "ConfigError",
    "ProxyError",
    "RefreshingTokenSource",
    "Settings",
    "TokenSource",
    "TokenStatus",
    "create_app",
    "load_settings",
]
