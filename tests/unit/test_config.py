"""Settings from the environment: defaults, validation, and every problem named at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aoai_auth_proxy.cli import exposure_warning
from aoai_auth_proxy.config import DEFAULT_SCOPE, load_settings
from aoai_auth_proxy.errors import ConfigError


def env(certificate_file: Path, **overrides: str) -> dict[str, str]:
    base = {
        "AZURE_CLIENT_ID": "client",
        "AZURE_TENANT_ID": "tenant",
        "AZURE_CERTIFICATE_PATH": str(certificate_file),
        "API_BASE_URL": "https://res.openai.azure.com/",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def problems(environment: dict[str, str]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        load_settings(environment)
    return raised.value.problems


def test_defaults_match_the_contract(certificate_file: Path) -> None:
    settings = load_settings(env(certificate_file))
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.scope == DEFAULT_SCOPE == "https://cognitiveservices.azure.com/.default"
    assert settings.authority_host == "https://login.microsoftonline.com"
    assert settings.api_base_url == "https://res.openai.azure.com"
    assert settings.upstream_host == "res.openai.azure.com"
    assert settings.binds_loopback_only


def test_settings_are_frozen(certificate_file: Path) -> None:
    settings = load_settings(env(certificate_file))
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]  # frozen


def test_seed_variables_are_read(certificate_file: Path) -> None:
    settings = load_settings(
        env(
            certificate_file,
            HOST="0.0.0.0",
            PORT="9000",
            AZURE_SCOPE="https://cognitiveservices.azure.us/.default",
            AZURE_AUTHORITY_HOST="login.microsoftonline.us",
            API_BASE_URL="https://res.openai.azure.com:8443/openai/v1/",
        )
    )
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert not settings.binds_loopback_only
    assert settings.scope == "https://cognitiveservices.azure.us/.default"
    assert settings.authority_host == "https://login.microsoftonline.us"
    assert settings.api_base_url == "https://res.openai.azure.com:8443/openai/v1"
    assert settings.upstream_host == "res.openai.azure.com:8443"


def test_missing_required_variables_are_named_together() -> None:
    found = problems({})
    assert found[0].startswith(
        "Missing required Azure AD configuration: "
        "AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CERTIFICATE_PATH"
    )
    assert any("API_BASE_URL" in p for p in found)


def test_every_invalid_value_is_reported_at_once(certificate_file: Path) -> None:
    found = problems(
        env(
            certificate_file,
            AZURE_CLIENT_ID="",
            PORT="http",
            API_BASE_URL="ftp://x",
            AZURE_SCOPE="https://cognitiveservices.azure.com",
            AZURE_AUTHORITY_HOST="http://login.example",
            PROXY_READ_TIMEOUT="-1",
            PROXY_LOG_LEVEL="LOUD",
        )
    )
    joined = "\n".join(found)
    for name in (
        "AZURE_CLIENT_ID",
        "PORT",
        "API_BASE_URL",
        "AZURE_SCOPE",
        "AZURE_AUTHORITY_HOST",
        "PROXY_READ_TIMEOUT",
        "PROXY_LOG_LEVEL",
    ):
        assert name in joined
    assert len(found) == 7


@pytest.mark.parametrize(
    "url",
    [
        "res.openai.azure.com",
        "https://user:pw@res.openai.azure.com",
        "https://res.openai.azure.com/?api-key=x",
        "https://res.openai.azure.com:port",
    ],
)
def test_bad_api_base_urls_are_refused(certificate_file: Path, url: str) -> None:
    assert any("API_BASE_URL" in p for p in problems(env(certificate_file, API_BASE_URL=url)))


def test_port_out_of_range(certificate_file: Path) -> None:
    assert problems(env(certificate_file, PORT="70000")) == (
        "PORT='70000' is invalid: must be between 0 and 65535",
    )


def test_identity_is_part_of_the_settings(certificate_file: Path) -> None:
    settings = load_settings(env(certificate_file))
    assert settings.identity.client_id == "client"
    assert settings.identity.certificate_path == certificate_file


def test_certificate_problem_is_named_with_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    found = problems(env(missing))
    assert found == (f"AZURE_CERTIFICATE_PATH: certificate file {missing} does not exist",)


def test_ssl_cert_file_must_exist(certificate_file: Path, tmp_path: Path) -> None:
    found = problems(env(certificate_file, SSL_CERT_FILE=str(tmp_path / "ca.pem")))
    assert any("SSL_CERT_FILE" in p for p in found)


def test_tenant_id_is_checked_before_azure_identity_sees_it(certificate_file: Path) -> None:
    (problem,) = problems(env(certificate_file, AZURE_TENANT_ID="contoso tenant"))
    assert problem.startswith("AZURE_TENANT_ID='contoso tenant' is invalid")
    load_settings(env(certificate_file, AZURE_TENANT_ID="contoso.onmicrosoft.com"))


def test_ssl_cert_file_must_be_a_pem_bundle(certificate_file: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate")
    (problem,) = problems(env(certificate_file, SSL_CERT_FILE=str(garbage)))
    assert "is not a readable PEM CA bundle" in problem


def test_shutdown_delay_and_timeout(certificate_file: Path) -> None:
    settings = load_settings(
        env(certificate_file, PROXY_SHUTDOWN_DELAY="5", PROXY_SHUTDOWN_TIMEOUT="20")
    )
    assert (settings.shutdown_delay, settings.shutdown_timeout) == (5.0, 20.0)
    assert load_settings(env(certificate_file)).shutdown_timeout == 25.0


def test_an_exposed_listener_without_a_key_is_warned_about(certificate_file: Path) -> None:
    assert exposure_warning(load_settings(env(certificate_file))) is None
    exposed = load_settings(env(certificate_file, HOST="0.0.0.0"))
    assert "without PROXY_API_KEY" in (exposure_warning(exposed) or "")
    keyed = load_settings(env(certificate_file, HOST="0.0.0.0", PROXY_API_KEY="k"))
    assert exposure_warning(keyed) is None


def test_a_proxy_reached_over_tls_is_refused_rather_than_silently_bypassed(
    certificate_file: Path,
) -> None:
    (problem,) = problems(env(certificate_file, HTTPS_PROXY="https://proxy.corp:3128"))
    assert problem.startswith("HTTPS_PROXY='https://proxy.corp:3128': a proxy reached over TLS")
    load_settings(env(certificate_file, HTTPS_PROXY="http://proxy.corp:3128"))


def test_the_proxy_urls_checked_are_the_ones_used(certificate_file: Path) -> None:
    # urllib's rule (egress.setting): the lowercase variable wins, even empty; a blank value
    # is a value, and the token path would fail on it.
    (problem,) = problems(env(certificate_file, HTTPS_PROXY=" "))
    assert problem.startswith("HTTPS_PROXY=' ' is not a proxy URL: use http://")
    load_settings(env(certificate_file, HTTPS_PROXY="proxy.corp:3128", https_proxy=""))
    (problem,) = problems(
        env(certificate_file, HTTPS_PROXY="http://ok:1", https_proxy="http://u:pw@proxy:3128/x")
    )
    assert problem.startswith("https_proxy='http://<credentials>@proxy:3128/x' is not a proxy")
    # HTTP_PROXY is checked only where it is used: an http:// upstream
    load_settings(env(certificate_file, HTTP_PROXY="proxy.corp:3128"))
    (problem,) = problems(
        env(
            certificate_file,
            HTTP_PROXY="proxy.corp:3128",
            API_BASE_URL="http://aoai.internal:8080",
        )
    )
    assert problem.startswith("HTTP_PROXY='proxy.corp:3128' is not a proxy URL")


def test_workers_default_to_one_and_accept_a_count_or_auto(certificate_file: Path) -> None:
    assert load_settings(env(certificate_file)).workers == 1
    assert load_settings(env(certificate_file, PROXY_WORKERS="3")).workers == 3
    assert load_settings(env(certificate_file, PROXY_WORKERS="auto")).workers == len(
        os.sched_getaffinity(0)
    )


@pytest.mark.parametrize("raw", ["0", "65", "two", "-1"])
def test_bad_worker_counts_are_refused(certificate_file: Path, raw: str) -> None:
    (problem,) = problems(env(certificate_file, PROXY_WORKERS=raw))
    assert problem.startswith(f"PROXY_WORKERS={raw!r} is invalid")


def test_workers_need_fixed_ports(certificate_file: Path) -> None:
    found = problems(env(certificate_file, PROXY_WORKERS="2", PORT="0", PROXY_ADMIN_PORT="0"))
    assert found == (
        "PROXY_WORKERS=2 needs a fixed PORT, not 0",
        "PROXY_WORKERS=2 needs a fixed PROXY_ADMIN_PORT, not 0",
    )
