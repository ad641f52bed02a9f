"""A local Microsoft Entra ID token service that checks client assertions as strictly as Entra."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ._server import LocalServer, certificate_hosts
from .pki import RSA_KEY_BITS, CertificateAuthority

JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# azure-identity signs with PS256 (x5t#S256); ADFS-style and older clients with RS256 (x5t).
ASSERTION_ALGORITHMS = ("PS256", "RS256")
# Seconds of clock difference tolerated between the client and the token service for `nbf`.
CLOCK_SKEW = 60.0
DEFAULT_SCOPE_SUFFIX = "/.default"
# Real Entra access tokens are about 1.5 KB; padding to that size keeps header-size limits honest.
ACCESS_TOKEN_TARGET_BYTES = 1500


class InvalidAccessToken(Exception):
    """`EntraStandIn.verify_access_token` refused a token; the message says why."""


@dataclass(frozen=True)
class _Failure:
    """One token request answered with an error, in Entra's JSON shape."""

    status: int
    error: str
    code: int
    message: str


class _Rejected(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _reject(status: int, error: str, code: int, message: str) -> _Rejected:
    return _Rejected(_Failure(status, error, code, message))


def _b64url_digest(data: bytes, algorithm: hashes.HashAlgorithm) -> str:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return base64.urlsafe_b64encode(digest.finalize()).decode("ascii").rstrip("=")


def _thumbprints(certificate: x509.Certificate) -> tuple[str, str]:
    """(x5t, x5t#S256) as a JWT header carries them (RFC 7515 4.1.7/4.1.8), without padding."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return _b64url_digest(der, hashes.SHA1()), _b64url_digest(der, hashes.SHA256())  # noqa: S303


def _form_value(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value else None


def _require(form: Mapping[str, Any], name: str) -> str:
    value = _form_value(form, name)
    if value is None:
        raise _reject(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )
    return value


class EntraStandIn:
    """Serves `POST /{tenant}/oauth2/v2.0/token` for client credentials with a certificate,
    plus the OpenID metadata and keys that MSAL (the sync azure-identity stack) looks up.

    Register apps with `register_client()`. Test knobs, all plain attributes or methods:
    `token_lifetime` (seconds, settable; negative issues already-expired tokens), `delay`
    (seconds slept before answering each token request), `fail_next()` (script errors),
    `token_requests` (token POSTs received), `issued` (claims of every token issued, in order).
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
        self._tenants: dict[str, dict[str, list[x509.Certificate]]] = {}
        self._failures_left = 0
        self._failure = _Failure(500, "temporarily_unavailable", 50001, "")
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        public_der = self._signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._key_id = _b64url_digest(public_der, hashes.SHA1())  # noqa: S303 - an identifier
        server_certificate = ca.issue_server_certificate(certificate_hosts(host))
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._metadata)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        self._server = LocalServer(
            app, host=host, port=port, ssl_context=server_certificate.ssl_context()
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def authority(self) -> str:
        """`https://127.0.0.1:PORT`: what the proxy gets as `AZURE_AUTHORITY_HOST`."""
        return self._server.origin

    def token_endpoint(self, tenant_id: str) -> str:
        """The URL a client assertion's `aud` must name."""
        return f"{self.authority}/{tenant_id}/oauth2/v2.0/token"

    # -- registrations and knobs ----------------------------------------------------------

    def register_client(
        self, tenant_id: str, client_id: str, certificate: x509.Certificate
    ) -> None:
        """Add a certificate to an app registration; an app may hold several (rotation)."""
        certificates = self._tenants.setdefault(tenant_id, {}).setdefault(client_id, [])
        if certificate not in certificates:
            certificates.append(certificate)

    def revoke_certificate(
        self, tenant_id: str, client_id: str, certificate: x509.Certificate
    ) -> None:
        """Remove a certificate from an app registration (the end of a rotation)."""
        self._tenants[tenant_id][client_id].remove(certificate)

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
        self._failure = _Failure(status, error, code, description)

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
                raise _Rejected(self._failure)
            form = await request.post()
            body = self._client_credentials(request, request.match_info["tenant"], form)
        except _Rejected as rejected:
            return self._error_response(request, rejected.failure)
        return web.json_response(body, headers={"Cache-Control": "no-store, no-cache"})

    def _client_credentials(
        self, request: web.Request, tenant_id: str, form: Mapping[str, Any]
    ) -> dict[str, Any]:
        apps = self._tenants.get(tenant_id)
        if apps is None:
            raise _reject(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant_id}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud.",
            )
        grant_type = _require(form, "grant_type")
        if grant_type != "client_credentials":
            raise _reject(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        client_id = _require(form, "client_id")
        certificates = apps.get(client_id)
        if certificates is None:
            raise _reject(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant_id}'. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. You "
                "may have sent your authentication request to the wrong tenant.",
            )
        if _form_value(form, "client_secret") is not None:
            raise _reject(401, "invalid_client", 7000215, "Invalid client secret provided.")
        assertion = _form_value(form, "client_assertion")
        assertion_type = _form_value(form, "client_assertion_type")
        if assertion is None or assertion_type is None:
            raise _reject(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        if assertion_type != JWT_BEARER_ASSERTION_TYPE:
            raise _reject(400, "invalid_request", 90011, "Unexpected client assertion type.")
        endpoints = {
            self.token_endpoint(tenant_id),
            # The same service reached under another name (e.g. localhost) is still this one.
            f"https://{request.host}/{tenant_id}/oauth2/v2.0/token",
        }
        self._verify_assertion(assertion, client_id, certificates, endpoints)
        resource = self._resource(_require(form, "scope"))
        token, claims = self._sign_access_token(tenant_id, client_id, resource, None)
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
        assertion: str,
        client_id: str,
        certificates: list[x509.Certificate],
        endpoints: set[str],
    ) -> None:
        """RFC 7523 section 3 checks, each answered with the AADSTS code Entra uses."""
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.DecodeError as exc:
            raise _reject(
                401, "invalid_client", 50027, f"JWT token is invalid or malformed. ({exc})"
            ) from exc
        # azure-identity pads the thumbprint (base64.urlsafe_b64encode); compare without padding.
        by_sha256 = {_thumbprints(c)[1]: c for c in certificates}
        by_sha1 = {_thumbprints(c)[0]: c for c in certificates}
        sent_sha256 = str(header.get("x5t#S256", "")).rstrip("=")
        sent_sha1 = str(header.get("x5t", "")).rstrip("=")
        certificate = by_sha256.get(sent_sha256) or by_sha1.get(sent_sha1)
        if certificate is None:
            raise _reject(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The key was not "
                f"found., Thumbprint of key used by client: '{sent_sha256 or sent_sha1}', "
                f"Please visit the Azure Portal to see configured keys for app Id '{client_id}'.]",
            )
        now = dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise _reject(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The key used is "
                f"expired or not yet valid., Thumbprint of key used by client: "
                f"'{sent_sha256 or sent_sha1}']",
            )
        algorithm = header.get("alg")
        if algorithm not in ASSERTION_ALGORITHMS:
            raise _reject(
                401,
                "invalid_client",
                5002738,
                f"Invalid JWT token. '{algorithm}' is not a supported signature algorithm.",
            )
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise _reject(401, "invalid_client", 700027, "The certificate's key is not RSA.")
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                public_key,
                algorithms=list(ASSERTION_ALGORITHMS),
                # Claims are checked below so each failure gets its own AADSTS code.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            raise _reject(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - Key was found, but "
                f"use of the key to verify the signature failed.] ({exc})",
            ) from exc
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise _reject(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )
        if claims.get("aud") not in endpoints:
            raise _reject(
                401,
                "invalid_client",
                700023,
                "Client assertion audience claim does not match Realm issuer. The audience must "
                f"be the token endpoint; got {claims.get('aud')!r}.",
            )
        self._check_lifetime(claims)

    @staticmethod
    def _check_lifetime(claims: Mapping[str, Any]) -> None:
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if (
            not isinstance(exp, int | float)
            or not isinstance(nbf, int | float)
            or exp <= now
            or nbf > now + CLOCK_SKEW
        ):
            raise _reject(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: "
                f"{_timestamp(now)}, assertion valid from {_describe_time(nbf)}, "
                f"expiry time of assertion {_describe_time(exp)}.",
            )

    @staticmethod
    def _resource(scope: str) -> str:
        scopes = scope.split()
        if len(scopes) != 1:
            raise _reject(
                400,
                "invalid_scope",
                700022,
                f"The provided value for the input parameter scope '{scope}' is not valid "
                "because it contains more than one resource.",
            )
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX) or scope == DEFAULT_SCOPE_SUFFIX:
            raise _reject(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        return scope.removesuffix(DEFAULT_SCOPE_SUFFIX)

    def _sign_access_token(
        self, tenant_id: str, client_id: str, resource: str, lifetime: float | None
    ) -> tuple[str, dict[str, Any]]:
        now = int(time.time())
        lifetime = self.token_lifetime if lifetime is None else lifetime
        issuer = f"https://sts.windows.net/{tenant_id}/"
        # A service principal's object id is stable per app and tenant, as in a real directory.
        object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant_id}/{client_id}"))
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "aio": "",
            "appid": client_id,
            "appidacr": "2",  # 2: the client authenticated with a certificate
            "azp": client_id,
            "idp": issuer,
            "idtyp": "app",
            "jti": str(uuid.uuid4()),
            "oid": object_id,
            "sub": object_id,
            "tid": tenant_id,
            "ver": "1.0",
        }
        headers = {"typ": "JWT", "x5t": self._key_id, "kid": self._key_id}
        unpadded = jwt.encode(claims, self._signing_key, algorithm="RS256", headers=headers)
        # `aio` is opaque in real tokens too; base64 grows 4/3, so pad a quarter less.
        padding = max(0, (ACCESS_TOKEN_TARGET_BYTES - len(unpadded)) * 3 // 4)
        claims["aio"] = secrets.token_urlsafe(padding)[:padding]
        token = jwt.encode(claims, self._signing_key, algorithm="RS256", headers=headers)
        return token, claims

    def _error_response(self, request: web.Request, failure: _Failure) -> web.Response:
        """Entra's error body: azure-identity puts `error_description` in its exception."""
        trace_id = str(uuid.uuid4())
        correlation_id = _correlation_id(request.headers.get("client-request-id"))
        timestamp = _timestamp(time.time())
        description = (
            f"AADSTS{failure.code}: {failure.message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        )
        body = {
            "error": failure.error,
            "error_description": description,
            "error_codes": [failure.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.authority}/error?code={failure.code}",
        }
        return web.json_response(
            body,
            status=failure.status,
            headers={"x-ms-request-id": trace_id, "Cache-Control": "no-store, no-cache"},
        )

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
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "grant_types_supported": ["client_credentials"],
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        jwk = RSAAlgorithm.to_jwk(self._signing_key.public_key(), as_dict=True)
        jwk.update({"kid": self._key_id, "x5t": self._key_id, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": [jwk]})


def _timestamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe_time(value: object) -> str:
    return _timestamp(value) if isinstance(value, int | float) else repr(value)


def _correlation_id(sent: str | None) -> str:
    """Entra echoes the client's `client-request-id` as the correlation id when it is a GUID."""
    if sent is not None:
        try:
            return str(uuid.UUID(sent))
        except ValueError:
            pass
    return str(uuid.uuid4())
