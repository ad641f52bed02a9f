"""Choosing the credential: explicit, inferred, and each conflict or gap named."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from aoai_auth_proxy.identity import CredentialKind, Identity, SecretSource, load_identity
from aoai_auth_proxy.testing import ClientCertificate


def identity(env: dict[str, str]) -> Identity:
    problems: list[str] = []
    found = load_identity(env, problems)
    assert problems == []
    return found


def problems_of(env: dict[str, str]) -> list[str]:
    problems: list[str] = []
    load_identity(env, problems)
    assert problems
    return problems


IDS = {"AZURE_CLIENT_ID": "c", "AZURE_TENANT_ID": "t"}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "azure-identity-token"
    path.write_text("eyJhbGciOiJSUzI1NiJ9.e30.sig\n")
    return path


def test_certificate_is_inferred_first(certificate_file: Path, token_file: Path) -> None:
    # AKS injects AZURE_FEDERATED_TOKEN_FILE into every container of a labelled pod; an
    # explicitly configured certificate still wins.
    found = identity(
        {
            **IDS,
            "AZURE_CERTIFICATE_PATH": str(certificate_file),
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        }
    )
    assert found.kind is CredentialKind.CERTIFICATE


def test_secret_is_inferred_from_the_variable_or_a_file(tmp_path: Path) -> None:
    assert identity({**IDS, "AZURE_CLIENT_SECRET": "s"}).kind is CredentialKind.SECRET
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    found = identity({**IDS, "AZURE_CLIENT_SECRET_FILE": str(secret_file)})
    assert found.kind is CredentialKind.SECRET
    assert found.client_secret is not None
    assert found.client_secret.read() == "from-file"


def test_aks_workload_identity_starts_with_exactly_what_aks_injects(token_file: Path) -> None:
    found = identity(
        {
            **IDS,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        }
    )
    assert found.kind is CredentialKind.WORKLOAD_IDENTITY
    assert found.federated_token_file == token_file


def test_managed_identity_needs_nothing_else() -> None:
    assert identity({"AZURE_CREDENTIAL": "managed_identity"}).client_id == ""
    user_assigned = identity({"AZURE_CREDENTIAL": "managed_identity", "AZURE_CLIENT_ID": "u"})
    assert user_assigned.client_id == "u"


def test_nothing_configured_names_the_seed_variables_and_the_alternatives() -> None:
    (problem,) = problems_of({})
    assert problem.startswith(
        "Missing required Azure AD configuration: "
        "AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CERTIFICATE_PATH"
    )
    assert "AZURE_CLIENT_SECRET" in problem
    assert "managed_identity" in problem


def test_certificate_and_secret_together_is_a_conflict(certificate_file: Path) -> None:
    (problem,) = problems_of(
        {**IDS, "AZURE_CERTIFICATE_PATH": str(certificate_file), "AZURE_CLIENT_SECRET": "s"}
    )
    assert "both set" in problem
    assert "AZURE_CREDENTIAL" in problem


def test_explicit_choice_conflicts_with_another_kinds_variables(certificate_file: Path) -> None:
    (problem,) = problems_of(
        {
            **IDS,
            "AZURE_CREDENTIAL": "secret",
            "AZURE_CLIENT_SECRET": "s",
            "AZURE_CERTIFICATE_PATH": str(certificate_file),
        }
    )
    assert problem.startswith("AZURE_CREDENTIAL=secret conflicts with AZURE_CERTIFICATE_PATH")


def test_explicit_choice_tolerates_platform_injected_variables(token_file: Path) -> None:
    found = identity(
        {
            **IDS,
            "AZURE_CREDENTIAL": "secret",
            "AZURE_CLIENT_SECRET": "s",
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        }
    )
    assert found.kind is CredentialKind.SECRET


def test_unknown_credential_kind() -> None:
    (problem,) = problems_of({"AZURE_CREDENTIAL": "password"})
    assert "must be one of certificate, secret, workload_identity, managed_identity" in problem


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        (
            {"AZURE_CREDENTIAL": "secret", "AZURE_CLIENT_ID": "c"},
            "AZURE_TENANT_ID, AZURE_CLIENT_SECRET",
        ),
        ({"AZURE_CREDENTIAL": "workload_identity", **IDS}, "AZURE_FEDERATED_TOKEN_FILE"),
        ({"AZURE_CREDENTIAL": "certificate", **IDS}, "AZURE_CERTIFICATE_PATH"),
    ],
)
def test_incomplete_combinations_name_what_is_missing(env: dict[str, str], missing: str) -> None:
    assert problems_of(env) == [f"Missing required Azure AD configuration: {missing}"]


def test_variable_and_file_form_together_is_a_conflict(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("x")
    problems = problems_of(
        {**IDS, "AZURE_CLIENT_SECRET": "s", "AZURE_CLIENT_SECRET_FILE": str(secret_file)}
    )
    assert problems == ["AZURE_CLIENT_SECRET and AZURE_CLIENT_SECRET_FILE are both set: keep one"]


def test_unreadable_or_empty_files_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    assert problems_of({**IDS, "AZURE_CLIENT_SECRET_FILE": str(empty)}) == [
        f"AZURE_CLIENT_SECRET_FILE {empty} is empty"
    ]
    missing = tmp_path / "missing"
    (problem,) = problems_of({**IDS, "AZURE_FEDERATED_TOKEN_FILE": str(missing)})
    assert str(missing) in problem
    assert "cannot be read" in problem


def test_encrypted_certificate_needs_the_right_password(
    tmp_path: Path, client_certificate: ClientCertificate
) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(
        client_certificate.certificate_pem
        + client_certificate.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"right"),
        )
    )
    env = {**IDS, "AZURE_CERTIFICATE_PATH": str(path)}
    (problem,) = problems_of({**env, "AZURE_CLIENT_CERTIFICATE_PASSWORD": "wrong"})
    assert "does not decrypt the private key" in problem
    password_file = tmp_path / "password"
    password_file.write_text("right\n")
    found = identity({**env, "AZURE_CLIENT_CERTIFICATE_PASSWORD_FILE": str(password_file)})
    assert found.load_certificate().certificate == client_certificate.certificate


def test_send_certificate_chain_flag(certificate_file: Path) -> None:
    env = {**IDS, "AZURE_CERTIFICATE_PATH": str(certificate_file)}
    assert identity({**env, "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN": "true"}).send_certificate_chain
    assert not identity(env).send_certificate_chain
    (problem,) = problems_of({**env, "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN": "maybe"})
    assert "must be true or false" in problem


def test_secrets_never_appear_in_repr() -> None:
    source = SecretSource("AZURE_CLIENT_SECRET", value="hunter2")
    found = Identity(CredentialKind.SECRET, "c", "t", client_secret=source)
    assert "hunter2" not in repr(found)
    assert "hunter2" not in found.describe()
