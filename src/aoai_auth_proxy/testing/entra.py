"""A local Microsoft Entra ID token service that checks client credentials as strictly as Entra."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ._aadsts import Failure, Rejected, error_response, invalid_client, reject
from ._client_auth import (
    AppRegistration,
    FederatedCredential,
    Secret,
    TrustedRoot,
    b64url_digest,
    verify_certificate_assertion,
    verify_federated_assertion,
    verify_secret,
)
from ._server import LocalServer, StandIn, certificate_hosts
from .kubernetes import TOKEN_EXCHANGE_AUDIENCE, KubernetesIssuer
from .pki import RSA_KEY_BITS, CertificateAuthority

JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE_SUFFIX = "/.default"
# Real Entra access tokens are about 1.5 KB; padding to that size keeps header-size limits honest.
ACCESS_TOKEN_TARGET_BYTES = 1500
# `appidacr` in an access token: how the client authenticated.
APPIDACR_SECRET = "1"  # noqa: S105 - a claim value, not a secret
APPIDACR_CERTIFICATE = "2"  # also assertions of any kind, and managed identities
# JWT headers that mark a client assertion as certificate-signed rather than federated.
_CERTIFICATE_HEADERS = ("x5t", "x5t#S256", "x5c")


class InvalidAccessToken(Exception):
    """`EntraStandIn.verify_access_token` refused a token; the message says why."""


def _form_value(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value else None


def _require(form: Mapping[str, Any], name: str) -> str:
    value = _form_value(form, name)
    if value is None:
        raise reject(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )
    return value


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """RFC 6749 2.3.1 `client_secret_basic`: (client_id, secret) from `Authorization: Basic`,
    each form-urlencoded before base64, so neither can hide a ':'."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise invalid_client(7000218, "The Authorization header is malformed.") from exc
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise invalid_client(7000218, "The Authorization header is malformed.")
    return unquote_plus(client_id), unquote_plus(secret)


class EntraStandIn(StandIn):
    """Serves `POST /{tenant}/oauth2/v2.0/token` for the client credentials grant, plus the
    OpenID metadata and keys that MSAL (the sync azure-identity stack) looks up.

    An app (client id) signs in with any credential registered for it:
    `register_client()` (a certificate, by thumbprint), `register_secret()`,
    `register_trusted_root()` (subject name and issuer: an `x5c` chain up to a trusted root) and
    `register_federated_credential()` (a Kubernetes service-account token). Test knobs, all plain
    attributes or methods: `token_lifetime` (seconds, settable; negative issues already-expired
    tokens), `delay` (seconds slept before answering each token request), `fail_next()` (script
    errors), `token_requests` (token POSTs received), `issued` (claims of every token issued,
    in order, managed identity tokens included), `seen_thumbprints` (SHA-256 thumbprint, hex
    upper case, of the certificate behind each accepted certificate assertion).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float = 3600.0,
    ) -> None:
        self.token_lifetime = token_lifetime
        self.delay = 0.0
        self.token_requests = 0
        self.issued: list[dict[str, Any]] = []
        self.seen_thumbprints: list[str] = []
        self._tenants: dict[str, dict[str, AppRegistration]] = {}
        self._failures_left = 0
        self._failure = Failure(500, "temporarily_unavailable", 50001, "")
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        public_der = self._signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._key_id = b64url_digest(public_der, hashes.SHA1())  # noqa: S303 - an identifier
        server_certificate = ca.issue_server_certificate(certificate_hosts(host))
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._metadata)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        self._server = LocalServer(
            app, host=host, port=port, ssl_context=server_certificate.ssl_context()
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def authority(self) -> str:
        """`https://127.0.0.1:PORT`: what the proxy gets as `AZURE_AUTHORITY_HOST`."""
        return self._server.origin

    def token_endpoint(self, tenant_id: str) -> str:
        """The URL a client assertion's `aud` must name."""
        return f"{self.authority}/{tenant_id}/oauth2/v2.0/token"

    # -- registrations and knobs ----------------------------------------------------------

    def _app(self, tenant_id: str, client_id: str) -> AppRegistration:
        return self._tenants.setdefault(tenant_id, {}).setdefault(client_id, AppRegistration())

    def register_client(
        self, tenant_id: str, client_id: str, certificate: x509.Certificate
    ) -> None:
        """Add a certificate to an app registration; an app may hold several (rotation)."""
        certificates = self._app(tenant_id, client_id).certificates
        if certificate not in certificates:
            certificates.append(certificate)

    def revoke_certificate(
        self, tenant_id: str, client_id: str, certificate: x509.Certificate
    ) -> None:
        """Remove a certificate from an app registration (the end of a rotation)."""
        self._tenants[tenant_id][client_id].certificates.remove(certificate)

    def register_secret(
        self,
        tenant_id: str,
        client_id: str,
        secret: str,
        *,
        not_after: dt.datetime | None = None,
    ) -> None:
        """Add a client secret to an app registration; an app may hold several (rotation).
        A secret past `not_after` is refused with AADSTS7000222."""
        if not secret:
            raise ValueError("a client secret must not be empty")
        app = self._app(tenant_id, client_id)
        app.secrets = [s for s in app.secrets if s.value != secret]
        app.secrets.append(Secret(secret, not_after))

    def revoke_secret(self, tenant_id: str, client_id: str, secret: str) -> None:
        """Remove a client secret from an app registration (the end of a rotation)."""
        app = self._tenants[tenant_id][client_id]
        remaining = [s for s in app.secrets if s.value != secret]
        if len(remaining) == len(app.secrets):
            raise ValueError("that secret is not registered for this app")
        app.secrets = remaining

    def register_trusted_root(
        self, tenant_id: str, client_id: str, root: x509.Certificate, subject: str
    ) -> None:
        """Subject name and issuer: accept assertions whose `x5c` chain (leaf first) reaches
        `root`, directly or through intermediates, with a leaf whose subject is `subject`
        (its RFC 4514 string, e.g. `CN=my-app`, or just the common name)."""
        roots = self._app(tenant_id, client_id).trusted_roots
        trusted = TrustedRoot(root, subject)
        if trusted not in roots:
            roots.append(trusted)

    def register_federated_credential(
        self,
        tenant_id: str,
        client_id: str,
        issuer: KubernetesIssuer,
        subject: str,
        audience: str = TOKEN_EXCHANGE_AUDIENCE,
    ) -> None:
        """Trust tokens `issuer` signs for `subject` (exact, case-sensitive) and `audience`, as
        a federated identity credential on the app (AKS workload identity)."""
        federated = self._app(tenant_id, client_id).federated
        credential = FederatedCredential(issuer, subject, audience)
        if credential not in federated:
            federated.append(credential)

    def register_managed_identity(self, tenant_id: str, client_id: str) -> None:
        """Make a managed identity's service principal known, with no credential of its own:
        only a `ManagedIdentityEndpoint` obtains tokens for it."""
        self._app(tenant_id, client_id)

    def fail_next(
        self,
        count: int,
        *,
        status: int = 500,
        error: str = "temporarily_unavailable",
        code: int = 50001,
        description: str = "The service is temporarily unavailable. Please try again later.",
    ) -> None:
        """Answer the next `count` token requests with this error (a large count means "down";
        0 cancels). azure-identity retries 5xx itself, so one 500 is usually not seen."""
        self._failures_left = max(0, count)
        self._failure = Failure(status, error, code, description)

    @staticmethod
    def object_id(tenant_id: str, client_id: str) -> str:
        """The service principal's object id (`oid`): stable per app and tenant, as in a real
        directory."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant_id}/{client_id}"))

    def mint_access_token(
        self,
        tenant_id: str,
        client_id: str,
        *,
        resource: str = "https://cognitiveservices.azure.com",
        lifetime: float | None = None,
    ) -> str:
        """Sign an access token directly (not recorded in `issued`): for tests that need an
        expired (negative `lifetime`) or other-audience token without a token request."""
        token, _ = self._sign_access_token(tenant_id, client_id, resource, lifetime)
        return token

    def issue_access_token(
        self,
        tenant_id: str,
        client_id: str,
        resource: str,
        *,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Sign and record (in `issued`) a token for an identity another endpoint vouched for,
        e.g. a managed identity: (token, claims)."""
        self.register_managed_identity(tenant_id, client_id)
        token, claims = self._sign_access_token(
            tenant_id, client_id, resource, None, extra_claims=extra_claims
        )
        self.issued.append(claims)
        return token, claims

    def verify_access_token(self, token: str, *, audience: str) -> dict[str, Any]:
        """The token's claims if this stand-in signed it for `audience` and it has not expired;
        otherwise `InvalidAccessToken` naming the reason."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._signing_key.public_key(),
                algorithms=["RS256"],
                audience=audience,
                options={"require": ["exp", "nbf", "iat", "aud", "iss", "tid", "appid", "oid"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidAccessToken("access token rejected: it has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidAccessToken(
                f"access token rejected: its audience is not {audience!r}"
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidAccessToken(
                "access token rejected: its signature does not verify with this stand-in's key"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidAccessToken(f"access token rejected: {exc}") from exc
        tenant_id = claims["tid"]
        if claims["iss"] != f"https://sts.windows.net/{tenant_id}/":
            raise InvalidAccessToken(f"access token rejected: issuer {claims['iss']!r}")
        if tenant_id not in self._tenants:
            raise InvalidAccessToken(f"access token rejected: unknown tenant {tenant_id!r}")
        return claims

    # -- the token endpoint ---------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        try:
            if self._failures_left > 0:
                self._failures_left -= 1
                raise Rejected(self._failure)
            form = await request.post()
            body = self._client_credentials(request, request.match_info["tenant"], form)
        except Rejected as rejected:
            return error_response(request, rejected.failure, self.authority)
        return web.json_response(body, headers={"Cache-Control": "no-store, no-cache"})

    def _client_credentials(
        self, request: web.Request, tenant_id: str, form: Mapping[str, Any]
    ) -> dict[str, Any]:
        apps = self._tenants.get(tenant_id)
        if apps is None:
            raise reject(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant_id}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud.",
            )
        grant_type = _require(form, "grant_type")
        if grant_type != "client_credentials":
            raise reject(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        basic = _basic_credentials(request)
        client_id = basic[0] if basic is not None else _require(form, "client_id")
        if basic is not None and _form_value(form, "client_id") not in (None, client_id):
            raise reject(
                400,
                "invalid_request",
                900144,
                "The client_id in the body does not match the one in the Authorization header.",
            )
        app = apps.get(client_id)
        if app is None:
            raise reject(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant_id}'. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. You "
                "may have sent your authentication request to the wrong tenant.",
            )
        secret = basic[1] if basic is not None else _form_value(form, "client_secret")
        if secret is not None:
            verify_secret(app, client_id, secret)
            appidacr = APPIDACR_SECRET
        else:
            self._verify_assertion(request, tenant_id, client_id, app, form)
            appidacr = APPIDACR_CERTIFICATE
        resource = self._resource(_require(form, "scope"))
        token, claims = self._sign_access_token(
            tenant_id, client_id, resource, None, extra_claims={"appidacr": appidacr}
        )
        self.issued.append(claims)
        expires_in = claims["exp"] - claims["iat"]
        return {
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": token,
        }

    def _verify_assertion(
        self,
        request: web.Request,
        tenant_id: str,
        client_id: str,
        app: AppRegistration,
        form: Mapping[str, Any],
    ) -> None:
        assertion = _form_value(form, "client_assertion")
        assertion_type = _form_value(form, "client_assertion_type")
        if assertion is None or assertion_type is None:
            raise invalid_client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        if assertion_type != JWT_BEARER_ASSERTION_TYPE:
            raise reject(400, "invalid_request", 90011, "Unexpected client assertion type.")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.DecodeError as exc:
            raise invalid_client(50027, f"JWT token is invalid or malformed. ({exc})") from exc
        # A federated token is issued by someone else (iss is the cluster, not the app) and
        # names no certificate.
        if claims.get("iss") != client_id and not any(h in header for h in _CERTIFICATE_HEADERS):
            verify_federated_assertion(assertion, header, claims, app)
            return
        endpoints = {
            self.token_endpoint(tenant_id),
            # The same service reached under another name (e.g. localhost) is still this one.
            f"https://{request.host}/{tenant_id}/oauth2/v2.0/token",
        }
        certificate = verify_certificate_assertion(assertion, header, client_id, app, endpoints)
        self.seen_thumbprints.append(certificate.fingerprint(hashes.SHA256()).hex().upper())

    @staticmethod
    def _resource(scope: str) -> str:
        scopes = scope.split()
        if len(scopes) != 1:
            raise reject(
                400,
                "invalid_scope",
                700022,
                f"The provided value for the input parameter scope '{scope}' is not valid "
                "because it contains more than one resource.",
            )
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX) or scope == DEFAULT_SCOPE_SUFFIX:
            raise reject(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        return scope.removesuffix(DEFAULT_SCOPE_SUFFIX)

    def _sign_access_token(
        self,
        tenant_id: str,
        client_id: str,
        resource: str,
        lifetime: float | None,
        *,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        issuer = f"https://sts.windows.net/{tenant_id}/"
        object_id = self.object_id(tenant_id, client_id)
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "aio": "",
            "appid": client_id,
            "appidacr": APPIDACR_CERTIFICATE,
            "azp": client_id,
            "idp": issuer,
            "idtyp": "app",
            "jti": str(uuid.uuid4()),
            "oid": object_id,
            "sub": object_id,
            "tid": tenant_id,
            "ver": "1.0",
            **(extra_claims or {}),
        }
        headers = {"typ": "JWT", "x5t": self._key_id, "kid": self._key_id}
        unpadded = jwt.encode(claims, self._signing_key, algorithm="RS256", headers=headers)
        # `aio` is opaque in real tokens too; base64 grows 4/3, so pad a quarter less.
        padding = max(0, (ACCESS_TOKEN_TARGET_BYTES - len(unpadded)) * 3 // 4)
        claims["aio"] = secrets.token_urlsafe(padding)[:padding]
        token = jwt.encode(claims, self._signing_key, algorithm="RS256", headers=headers)
        return token, claims

    # -- discovery, for MSAL-based (sync) clients -----------------------------------------

    async def _metadata(self, request: web.Request) -> web.Response:
        tenant_id = request.match_info["tenant"]
        base = f"{self.authority}/{tenant_id}"
        return web.json_response(
            {
                "issuer": f"{base}/v2.0",
                "token_endpoint": self.token_endpoint(tenant_id),
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                    "private_key_jwt",
                ],
                "id_token_signing_alg_values_supported": ["RS256"],
                "grant_types_supported": ["client_credentials"],
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        jwk = RSAAlgorithm.to_jwk(self._signing_key.public_key(), as_dict=True)
        jwk.update({"kid": self._key_id, "x5t": self._key_id, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": [jwk]})
