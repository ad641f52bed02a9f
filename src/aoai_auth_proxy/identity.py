"""Which identity signs in to Entra ID: chosen from the environment, every conflict named."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .certificate import CertificateError, ClientCertificate, load_client_certificate

# The seed's message, which its troubleshooting guide tells users to look for.
MISSING = "Missing required Azure AD configuration"


class CredentialKind(StrEnum):
    CERTIFICATE = "certificate"
    SECRET = "secret"  # noqa: S105 - the name of a credential kind, not a password
    WORKLOAD_IDENTITY = "workload_identity"
    MANAGED_IDENTITY = "managed_identity"


# What each kind reads; a variable of another kind is a conflict, except the ones a platform
# injects into every container of a pod (AKS workload identity, App Service managed identity).
KIND_VARIABLES = {
    CredentialKind.CERTIFICATE: (
        "AZURE_CERTIFICATE_PATH",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD_FILE",
        "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
    ),
    CredentialKind.SECRET: ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_SECRET_FILE"),
    CredentialKind.WORKLOAD_IDENTITY: ("AZURE_FEDERATED_TOKEN_FILE",),
    CredentialKind.MANAGED_IDENTITY: (),
}
PLATFORM_INJECTED = frozenset({"AZURE_FEDERATED_TOKEN_FILE"})
_TENANT_ID = re.compile(r"[A-Za-z0-9.-]+")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True)
class SecretSource:
    """A secret given inline or as a file; a file is re-read on every use, so a Kubernetes
    Secret rotated on disk is picked up without a restart. Never shown in `repr`."""

    variable: str
    value: str | None = field(default=None, repr=False)
    path: Path | None = None

    def read(self) -> str:
        """The secret, stripped of surrounding whitespace; ValueError naming the source."""
        if self.path is None:
            return self.value or ""
        try:
            text = self.path.read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"{self.variable}_FILE {self.path} cannot be read: {exc.strerror}"
            ) from None
        if not text:
            raise ValueError(f"{self.variable}_FILE {self.path} is empty")
        return text


@dataclass(frozen=True)
class Identity:
    """Who the proxy signs in as, and with what."""

    kind: CredentialKind
    client_id: str = ""  # empty only for a system-assigned managed identity
    tenant_id: str = ""
    certificate_path: Path | None = None
    certificate_password: SecretSource | None = None
    send_certificate_chain: bool = False
    client_secret: SecretSource | None = None
    federated_token_file: Path | None = None

    def load_certificate(self) -> ClientCertificate:
        """The certificate as it is on disk now (CertificateError if unusable)."""
        assert self.certificate_path is not None
        password = None
        if self.certificate_password is not None:
            try:
                password = self.certificate_password.read().encode()
            except ValueError as exc:
                raise CertificateError(str(exc)) from None
        return load_client_certificate(self.certificate_path, password=password)

    def describe(self) -> str:
        """One line for `check` and the start-up log; names files, never secrets."""
        who = f"client {self.client_id or '(system-assigned)'}"
        if self.tenant_id:
            who += f" in tenant {self.tenant_id}"
        how = {
            CredentialKind.CERTIFICATE: f"certificate {self.certificate_path}"
            + (" with its chain (subject name/issuer)" if self.send_certificate_chain else ""),
            CredentialKind.SECRET: "client secret"
            + (
                f" from {self.client_secret.path}"
                if self.client_secret and self.client_secret.path
                else ""
            ),
            CredentialKind.WORKLOAD_IDENTITY: f"federated token {self.federated_token_file}",
            CredentialKind.MANAGED_IDENTITY: "managed identity",
        }[self.kind]
        return f"{who}, {self.kind.value}: {how}"


def load_identity(
    env: Mapping[str, str], problems: list[str], *, check_files: bool = True
) -> Identity:
    """Choose the credential (AZURE_CREDENTIAL, else inferred) and check what it needs."""

    def get(name: str) -> str:
        return env.get(name, "").strip()

    def given(name: str) -> bool:
        return bool(get(name)) or bool(get(f"{name}_FILE"))

    secret_given = given("AZURE_CLIENT_SECRET")
    explicit = get("AZURE_CREDENTIAL").lower()
    if explicit:
        try:
            kind = CredentialKind(explicit)
        except ValueError:
            choices = ", ".join(k.value for k in CredentialKind)
            problems.append(f"AZURE_CREDENTIAL={explicit!r} is invalid: must be one of {choices}")
            return Identity(CredentialKind.CERTIFICATE)
        for other, names in KIND_VARIABLES.items():
            stray = [n for n in names if other != kind and get(n) and n not in PLATFORM_INJECTED]
            if stray:
                problems.append(
                    f"AZURE_CREDENTIAL={kind.value} conflicts with {', '.join(stray)} "
                    f"(set for {other.value}); unset them or choose AZURE_CREDENTIAL={other.value}"
                )
    elif get("AZURE_CERTIFICATE_PATH") and secret_given:
        problems.append(
            "AZURE_CERTIFICATE_PATH and AZURE_CLIENT_SECRET are both set: "
            "set AZURE_CREDENTIAL=certificate or AZURE_CREDENTIAL=secret to choose"
        )
        kind = CredentialKind.CERTIFICATE
    elif get("AZURE_CERTIFICATE_PATH"):
        kind = CredentialKind.CERTIFICATE
    elif secret_given:
        kind = CredentialKind.SECRET
    elif get("AZURE_FEDERATED_TOKEN_FILE"):
        kind = CredentialKind.WORKLOAD_IDENTITY
    else:
        kind = CredentialKind.CERTIFICATE  # the seed's only mode: name what it needs

    required = {
        CredentialKind.CERTIFICATE: (
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_CERTIFICATE_PATH",
        ),
        CredentialKind.SECRET: ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"),
        CredentialKind.WORKLOAD_IDENTITY: (
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
        ),
        CredentialKind.MANAGED_IDENTITY: (),
    }[kind]
    missing = [
        name
        for name in required
        if not (given(name) if name == "AZURE_CLIENT_SECRET" else get(name))
    ]
    if missing:
        hint = ""
        if (
            not explicit
            and kind is CredentialKind.CERTIFICATE
            and "AZURE_CERTIFICATE_PATH" in missing
        ):
            hint = (
                " (or, instead of a certificate, AZURE_CLIENT_SECRET, AZURE_FEDERATED_TOKEN_FILE "
                "or AZURE_CREDENTIAL=managed_identity)"
            )
        problems.append(f"{MISSING}: {', '.join(missing)}{hint}")

    def secret(name: str) -> SecretSource | None:
        inline, path = get(name), get(f"{name}_FILE")
        if inline and path:
            problems.append(f"{name} and {name}_FILE are both set: keep one")
        if path:
            source = SecretSource(name, path=Path(path))
            if check_files:
                try:
                    source.read()
                except ValueError as exc:
                    problems.append(str(exc))
            return source
        return SecretSource(name, value=inline) if inline else None

    send_chain = get("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN").lower()
    if send_chain not in TRUE_VALUES | FALSE_VALUES:
        problems.append(
            f"AZURE_CLIENT_SEND_CERTIFICATE_CHAIN={send_chain!r} is invalid: must be true or false"
        )

    identity = Identity(
        kind=kind,
        client_id=get("AZURE_CLIENT_ID"),
        tenant_id=get("AZURE_TENANT_ID"),
        certificate_path=Path(get("AZURE_CERTIFICATE_PATH"))
        if get("AZURE_CERTIFICATE_PATH")
        else None,
        certificate_password=secret("AZURE_CLIENT_CERTIFICATE_PASSWORD"),
        send_certificate_chain=send_chain in TRUE_VALUES,
        client_secret=secret("AZURE_CLIENT_SECRET"),
        federated_token_file=(
            Path(get("AZURE_FEDERATED_TOKEN_FILE")) if get("AZURE_FEDERATED_TOKEN_FILE") else None
        ),
    )
    if identity.tenant_id and not _TENANT_ID.fullmatch(identity.tenant_id):
        # azure-identity refuses anything else with a ValueError deep inside a token fetch.
        problems.append(
            f"AZURE_TENANT_ID={identity.tenant_id!r} is invalid: use the directory (tenant) id "
            "or a domain such as contoso.onmicrosoft.com"
        )
    if check_files:
        _check_material(identity, problems)
    return identity


def _check_material(identity: Identity, problems: list[str]) -> None:
    check: Callable[[], object] | None = None
    if identity.kind is CredentialKind.CERTIFICATE and identity.certificate_path is not None:
        check = identity.load_certificate
    elif identity.kind is CredentialKind.WORKLOAD_IDENTITY and identity.federated_token_file:
        check = SecretSource("AZURE_FEDERATED_TOKEN", path=identity.federated_token_file).read
    if check is None:
        return
    try:
        check()
    except CertificateError as exc:
        problems.append(f"AZURE_CERTIFICATE_PATH: {exc}")
    except ValueError as exc:
        problems.append(str(exc))
