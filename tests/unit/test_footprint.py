"""What a serving proxy imports at start-up: not what only some deployments use (issue 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVING = ("aoai_auth_proxy.cli", "aoai_auth_proxy.server", "aoai_auth_proxy.app")


@pytest.mark.parametrize(
    "module",
    [
        "websockets",  # the first WebSocket session imports it (0.65 MB)
        "jwt",  # subject-name/issuer sign-in imports it (0.4 MB)
        "aoai_auth_proxy.testing",  # the stand-ins: `demo` and the tests only
        "aiohttp",  # the stand-ins' server; the proxy has its own HTTP/1.1 (10 MB, issue 8)
    ],
)
def test_start_up_does_not_import(module: str) -> None:
    code = f"import sys; import {', '.join(SERVING)}; print({module!r} in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
