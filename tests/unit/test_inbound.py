"""Inbound rules without sockets: which Host names a loopback proxy answers to."""

from __future__ import annotations

import pytest

from aoai_auth_proxy.inbound import LOOPBACK_NAMES, host_problem

ALLOWED = LOOPBACK_NAMES | {"aoai-gateway.ai.svc.cluster.local"}


@pytest.mark.parametrize(
    "host",
    [
        "",  # HTTP/1.0 without Host: no browser sends that
        "localhost",
        "LOCALHOST:8080",
        "127.0.0.1",
        "127.0.0.1:8080",
        "127.255.255.254",
        "[::1]:8080",
        "aoai-gateway.ai.svc.cluster.local:8080",
    ],
)
def test_loopback_and_configured_names_are_accepted(host: str) -> None:
    assert host_problem(ALLOWED, host) is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "127.attacker.example",  # starts like a loopback address, is a DNS name
        "127.0.0.1.nip.io",
        "127.0.0.1x",
        "127.0.0.256",
        "127.0.0",
        "127.0.0.1.",
        "127.0.0.٣",  # a non-ASCII digit
        "128.0.0.1",
        "localhost.evil.example",
    ],
)
def test_other_names_are_refused(host: str) -> None:
    problem = host_problem(ALLOWED, host)
    assert problem is not None
    assert problem.status == 400
