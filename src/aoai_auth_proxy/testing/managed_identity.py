"""A managed identity endpoint as App Service and Container Apps serve it (`IDENTITY_ENDPOINT`).

azure-identity's `ManagedIdentityCredential` uses it when `IDENTITY_ENDPOINT` and
`IDENTITY_HEADER` are set (and `IDENTITY_SERVER_THUMBPRINT` is not): it sends
`GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<scope without /.default>`, plus
`client_id=` for a user-assigned identity (or, through `identity_config`, `mi_res_id=` or
`object_id=`), with the header `X-IDENTITY-HEADER: {IDENTITY_HEADER}`. The answer is
`{"access_token", "expires_on": "<epoch seconds as a string>", "resource", "token_type",
"client_id"}`; any other answer becomes `ClientAuthenticationError` carrying the body.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ._server import LocalServer, StandIn
from .entra import EntraStandIn

API_VERSION = "2019-08-01"
IDENTITY_HEADER = "X-IDENTITY-HEADER"
ENDPOINT_PATH = "/msi/token"
# Query parameters naming a user-assigned identity; `principal_id` is the documented alias of
# `object_id` (App Service REST endpoint reference).
_SELECTORS = ("client_id", "mi_res_id", "object_id", "principal_id")
NOT_FOUND_MESSAGE = (
    "No User Assigned or Delegated Managed Identity found for specified "
    "ClientId/ResourceId/PrincipalId."
)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ManagedIdentityEndpoint(StandIn):
    """Issues tokens for one resource's managed identities, signed by `entra`'s key (so the
    Azure OpenAI stand-in accepts them), over plain HTTP on loopback as App Service does.

    `system_client_id` is the system-assigned identity's client id; `user_assigned` maps each
    user-assigned identity's client id to its ARM resource id (`mi_res_id`). Object ids are
    `EntraStandIn.object_id(tenant_id, client_id)`. Put `endpoint` in `IDENTITY_ENDPOINT` and
    `header` in `IDENTITY_HEADER`; `requests` counts the token requests received.
    """

    def __init__(
        self,
        entra: EntraStandIn,
        *,
        tenant_id: str,
        system_client_id: str,
        user_assigned: Mapping[str, str] | None = None,
        secret_header: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.requests = 0
        self._entra = entra
        self._tenant_id = tenant_id
        self._system_client_id = system_client_id
        self._user_assigned = dict(user_assigned or {})
        self._header = secret_header if secret_header is not None else secrets.token_urlsafe(24)
        for client_id in (system_client_id, *self._user_assigned):
            entra.register_managed_identity(tenant_id, client_id)
        app = web.Application()
        app.router.add_get(ENDPOINT_PATH, self._token)
        self._server = LocalServer(app, host=host, port=port, ssl_context=None)

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:PORT/msi/token`: the `IDENTITY_ENDPOINT` value."""
        return f"{self._server.origin}{ENDPOINT_PATH}"

    @property
    def header(self) -> str:
        """The `IDENTITY_HEADER` value the endpoint requires as `X-IDENTITY-HEADER`."""
        return self._header

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        try:
            self._check_header(request.headers.get(IDENTITY_HEADER))
            query = request.query
            if query.get("api-version") != API_VERSION:
                raise _Refused(
                    400, f"The api-version '{query.get('api-version', '')}' is not supported."
                )
            resource = query.get("resource", "")
            if not resource:
                raise _Refused(400, "The resource parameter is required.")
            client_id, resource_id = self._identity(query)
        except _Refused as refused:
            # App Service's error body; the correlation id is random, as the real one is opaque.
            body = {
                "statusCode": refused.status,
                "message": str(refused),
                "correlationId": secrets.token_hex(16),
            }
            return web.json_response(body, status=refused.status)
        extra: dict[str, Any] = {"xms_mirid": resource_id} if resource_id else {}
        token, claims = self._entra.issue_access_token(
            self._tenant_id, client_id, resource, extra_claims=extra
        )
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(claims["exp"]),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": client_id,
            }
        )

    def _check_header(self, sent: str | None) -> None:
        if sent is None:
            raise _Refused(401, f"The {IDENTITY_HEADER} header is missing.")
        if not hmac.compare_digest(sent.encode(), self._header.encode()):
            raise _Refused(401, f"The {IDENTITY_HEADER} header is not valid.")

    def _identity(self, query: Mapping[str, str]) -> tuple[str, str | None]:
        """(client id, resource id) of the identity the query names; system-assigned if none."""
        given = [(name, query[name]) for name in _SELECTORS if query.get(name)]
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise _Refused(400, f"Only one of client_id, mi_res_id, object_id is allowed: {names}.")
        if not given:
            return self._system_client_id, None
        name, value = given[0]
        # GUIDs and ARM resource ids compare case-insensitively.
        value = value.lower()
        identities: dict[str, str | None] = {self._system_client_id: None, **self._user_assigned}
        for client_id, resource_id in identities.items():
            match name:
                case "client_id":
                    found = client_id.lower() == value
                case "mi_res_id":
                    found = resource_id is not None and resource_id.lower() == value
                case _:
                    found = EntraStandIn.object_id(self._tenant_id, client_id) == value
            if found:
                return client_id, resource_id
        raise _Refused(400, NOT_FOUND_MESSAGE)
