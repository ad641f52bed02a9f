"""Runs the built container image the way its users do, against the local stand-ins.

`make check-deploy` runs this after `podman build` (it is not a pytest module: it needs root,
podman and the image). Usage:

    python -m tests.deploy.run_image IMAGE --compose BINARY --demo-compose FILE

1. The runtime image holds no compiler, pip, build backend or cache, and carries the modules
   hatch_build.py compiles as compiled extensions.
2. The proxy, as the README's `docker run` line starts it: only environment variables, the
   certificate directory mounted read-only, `--read-only --cap-drop ALL`, no new privileges,
   host networking on loopback (the CI machine has no bridge networking). It must turn ready,
   forward a chat completion with the Entra bearer the stand-in verifies, run as uid 10001 as
   PID 1, pass its own HEALTHCHECK, finish a stream that is in flight when `podman stop` sends
   SIGTERM, and exit 0 within the grace period.
3. `aoai-auth-proxy check` in the same conditions exits 0.
4. The demo service of compose.demo.yml, translated setting by setting from the Compose
   binary's normalized `config` output (an unknown setting fails the check rather than being
   ignored): ready, a chat completion, its healthcheck, and a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import hatch_build

from aoai_auth_proxy.testing import (
    AzureOpenAIStandIn,
    CertificateAuthority,
    ClientCertificate,
    EntraStandIn,
)

TENANT_ID = "00000000-0000-4000-8000-0000000c1de0"
CLIENT_ID = "00000000-0000-4000-8000-0000000c1de1"
IMAGE_UID = 10001
IMAGE_GID = 10001
CERTS_IN_CONTAINER = "/app/certs"  # the README's `docker run -v ...:/app/certs:ro`
CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"

READY_TIMEOUT = 60.0
# Drain settings of the main run: `podman stop -t STOP_GRACE` must see the process exit by
# itself (SIGKILL would show as exit code 137) well before the grace period ends.
SHUTDOWN_DELAY = 1
SHUTDOWN_TIMEOUT = 10
STOP_GRACE = 20
STREAM_DELAY = 0.25  # seconds between SSE events, so a stream is still open at SIGTERM
# Compose settings the demo translation understands; `build`, `image` and `restart` do not
# apply to a CI run of an already built image.
COMPOSE_KEYS = {
    "build",
    "entrypoint",
    "image",
    "restart",
    "command",
    "environment",
    "network_mode",
    "read_only",
    "tmpfs",
    "cap_drop",
    "security_opt",
    "healthcheck",
    "stop_grace_period",
}


# The image's HEALTHCHECK is run by hand (see `healthcheck`): podman would schedule it with
# systemd timers, and CI machines have no systemd.
NO_HEALTHCHECK = ("--no-healthcheck",)


class CheckFailed(Exception):
    """A check of the image failed; the message says which and why."""


class Podman:
    """The podman command line, run without blocking the event loop that serves the stand-ins."""

    def __init__(self) -> None:
        path = shutil.which("podman")
        if path is None:
            raise CheckFailed("podman is not installed")
        self.path = path

    async def run(self, *args: str, check: bool = True) -> tuple[int, str]:
        """Exit code and standard output (with standard error, when the command failed)."""
        process = await asyncio.create_subprocess_exec(
            self.path,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        text = stdout.decode(errors="replace").strip()
        code = process.returncode if process.returncode is not None else -1
        if code != 0:
            text = f"{text}\n{stderr.decode(errors='replace')}".strip()
            if check:
                raise CheckFailed(f"podman {' '.join(args)} exited {code}:\n{text}")
        return code, text

    async def inspect(self, container: str, template: str) -> str:
        return (await self.run("inspect", "--format", template, container))[1]

    @contextlib.asynccontextmanager
    async def container(
        self, name: str, options: Sequence[str], image: str, *command: str
    ) -> AsyncIterator[str]:
        """`podman run --detach`, removed on exit whatever happened."""
        await self.run("rm", "--force", "--ignore", name)
        await self.run(
            "run", "--detach", "--name", name, *NO_HEALTHCHECK, *options, image, *command
        )
        try:
            yield name
        finally:
            await self.run("rm", "--force", "--ignore", name, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def passed(what: str) -> None:
    print(f"  ok  {what}", flush=True)


def write_certificates(certs: Path) -> tuple[CertificateAuthority, ClientCertificate]:
    """A throw-away CA and client certificate, laid out as the README tells users to: the
    directory and files owned by root, readable by the image's group (10001) only."""
    ca = CertificateAuthority.create("aoai-auth-proxy image check CA")
    client = ca.issue_client_certificate(
        "aoai-auth-proxy image check",
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=365),
    )
    certs.mkdir()
    client.write(certs / "certificate.pem")
    ca.write_ca_file(certs / "ca.pem")
    for path, mode in ((certs, 0o750), *((p, 0o640) for p in certs.iterdir())):
        os.chown(path, 0, IMAGE_GID)
        path.chmod(mode)
    return ca, client


@contextlib.asynccontextmanager
async def stand_ins() -> AsyncIterator[tuple[AzureOpenAIStandIn, dict[str, str], Path]]:
    """Entra and Azure OpenAI stand-ins on loopback, as `demo_environment()` starts them but
    keeping the Azure OpenAI stand-in at hand to read what it received."""
    with tempfile.TemporaryDirectory(prefix="aoai-auth-proxy-image-") as scratch:
        certs = Path(scratch, "certs")
        ca, client = write_certificates(certs)
        async with EntraStandIn(ca) as entra, AzureOpenAIStandIn(entra, ca) as aoai:
            entra.register_client(TENANT_ID, CLIENT_ID, client.certificate)
            env = {
                "AZURE_CLIENT_ID": CLIENT_ID,
                "AZURE_TENANT_ID": TENANT_ID,
                "AZURE_CERTIFICATE_PATH": f"{CERTS_IN_CONTAINER}/certificate.pem",
                "API_BASE_URL": aoai.base_url,
                # Only because the stand-ins are local; a real deployment sets neither.
                "AZURE_AUTHORITY_HOST": entra.authority,
                "SSL_CERT_FILE": f"{CERTS_IN_CONTAINER}/ca.pem",
            }
            yield aoai, env, certs


def hardened(env: Mapping[str, str], certs: Path) -> list[str]:
    """`podman run` options of the main run: the README's `docker run`, locked down."""
    return [
        "--network=host",
        "--read-only",
        "--read-only-tmpfs=false",  # podman adds tmpfs mounts, Docker does not
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--volume={certs}:{CERTS_IN_CONTAINER}:ro",
        *env_options(env),
    ]


def env_options(env: Mapping[str, str]) -> list[str]:
    return [option for name, value in env.items() for option in ("--env", f"{name}={value}")]


async def wait_ready(http: aiohttp.ClientSession, podman: Podman, name: str, url: str) -> None:
    """Poll /health until 200; fail at once, with the logs, if the container stops."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        if await podman.inspect(name, "{{.State.Running}}") != "true":
            raise CheckFailed(f"{name} stopped before turning ready:\n{await logs(podman, name)}")
        await asyncio.sleep(0.25)
    raise CheckFailed(f"{name}: /health not 200 after {READY_TIMEOUT:.0f} s")


async def logs(podman: Podman, name: str) -> str:
    return (await podman.run("logs", name, check=False))[1]


async def chat(http: aiohttp.ClientSession, url: str, content: str) -> str:
    """A chat completion as an Azure SDK sends it, with the dummy key the proxy replaces."""
    body = {"messages": [{"role": "user", "content": content}]}
    async with http.post(f"{url}{CHAT}", json=body, headers={"api-key": "dummy"}) as response:
        text = await response.text()
        if response.status != 200:
            raise CheckFailed(f"chat completion through {url}: {response.status} {text}")
        reply: str = json.loads(text)["choices"][0]["message"]["content"]
        return reply


async def healthcheck(podman: Podman, name: str, test: Sequence[str]) -> None:
    """Runs a HEALTHCHECK test (["CMD", ...] or ["CMD-SHELL", "..."]) as Docker would."""
    kind, *command = test
    argv = command if kind == "CMD" else ["/bin/sh", "-c", *command]
    code, output = await podman.run("exec", name, *argv, check=False)
    if code != 0:
        raise CheckFailed(f"{name}: healthcheck {argv} exited {code}: {output}")


async def process_status(podman: Podman, name: str) -> dict[str, str]:
    """/proc/PID/status of the container's main process, as the host sees it."""
    pid = await podman.inspect(name, "{{.State.Pid}}")
    return read_status(Path(f"/proc/{pid}/status"))


def read_status(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def stop(podman: Podman, name: str, grace: int) -> float:
    """`podman stop -t grace` (SIGTERM, SIGKILL after `grace` s); exit 0 required."""
    started = time.monotonic()
    await podman.run("stop", "--time", str(grace), name)
    elapsed = time.monotonic() - started
    code = await podman.inspect(name, "{{.State.ExitCode}}")
    if code != "0":
        raise CheckFailed(f"{name} exited {code} on SIGTERM:\n{await logs(podman, name)}")
    if elapsed >= grace:
        raise CheckFailed(f"{name} took {elapsed:.1f} s to stop, grace period {grace} s")
    return elapsed


# Run inside the image: what must not be in the runtime stage. (The official base keeps its own
# pip in /usr/local; the venv that runs the proxy has none.)
LEFTOVERS = """
import importlib.util, pathlib, shutil
tools = [t for t in ("gcc", "cc", "c++", "make", "git") if shutil.which(t)]
modules = [m for m in ("pip", "setuptools", "hatchling", "wheel", "mypy", "mypyc")
           if importlib.util.find_spec(m)]
paths = [p for p in ("/src", "/dist", "/opt/build", "/root/.cache") if pathlib.Path(p).exists()]
print(" ".join(tools + modules + paths))
"""


# Run inside the image: which of the modules hatch_build.py compiles run as Python there.
NOT_COMPILED = """
import importlib, sys
names = sys.argv[1:]
print(" ".join(n for n in names
               if not importlib.import_module("aoai_auth_proxy." + n).__file__.endswith(".so")))
"""


async def check_contents(podman: Podman, image: str) -> None:
    # As root, to see into /root; nothing runs but this inspection.
    options = ["--rm", "--network=none", "--user=0:0", "--entrypoint=python", *NO_HEALTHCHECK]
    _, found = await podman.run("run", *options, image, "-c", LEFTOVERS)
    if found:
        raise CheckFailed(f"the runtime image still holds: {found}")
    passed("runtime image: no compiler, no pip or build backend in the venv, no caches")
    _, pure = await podman.run("run", *options, image, "-c", NOT_COMPILED, *hatch_build.NATIVE)
    if pure:
        raise CheckFailed(f"the image runs these as Python, not compiled by mypyc: {pure}")
    passed(f"runtime image: {', '.join(hatch_build.NATIVE)} compiled by mypyc")


async def check_proxy(podman: Podman, http: aiohttp.ClientSession, image: str) -> None:
    async with stand_ins() as (aoai, env, certs):
        port = free_port()
        admin_port = free_port()
        url = f"http://127.0.0.1:{port}"
        env |= {
            # The image's default is HOST=0.0.0.0; host networking shares the machine's
            # interfaces, so bind loopback as a Kubernetes sidecar does.
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "PROXY_ADMIN_PORT": str(admin_port),
            "PROXY_ADMIN_HOST": "127.0.0.1",
            "PROXY_SHUTDOWN_DELAY": str(SHUTDOWN_DELAY),
            "PROXY_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        }
        async with podman.container(
            f"aoai-auth-proxy-ci-{os.getpid()}", hardened(env, certs), image
        ) as name:
            await wait_ready(http, podman, name, url)
            passed(f"{image} turned ready (read-only root, no capabilities, certificate ro)")

            before = len(aoai.requests)
            reply = await chat(http, url, "Hello from the container")
            seen = aoai.requests[before:]
            if not (
                reply == "Echo: Hello from the container"
                and len(seen) == 1
                and seen[0].client_id == CLIENT_ID
                and (seen[0].header("Authorization") or "").startswith("Bearer ")
                and seen[0].header("api-key") is None
            ):
                raise CheckFailed(f"the stand-in did not see the expected request: {seen}")
            passed("chat completion forwarded; the stand-in verified the Entra bearer")

            status = await process_status(podman, name)
            uid = (await podman.run("exec", name, "id", "-u"))[1]
            if not (
                uid == str(IMAGE_UID)
                and status["Uid"].split() == [str(IMAGE_UID)] * 4
                and status["NSpid"].split()[-1] == "1"
                and int(status["CapEff"], 16) == 0
                and status["NoNewPrivs"] == "1"
            ):
                raise CheckFailed(f"unexpected process identity: id -u {uid}, {status}")
            passed(f"runs as uid {IMAGE_UID}, PID 1, no capabilities, no new privileges")

            _, test = await podman.run(
                "image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", image
            )
            await healthcheck(podman, name, json.loads(test))
            async with http.get(f"http://127.0.0.1:{admin_port}/health/ready") as response:
                if response.status != 200:
                    raise CheckFailed(f"admin /health/ready: {response.status}")
            passed("image HEALTHCHECK passes; probes answer on the admin port")

            aoai.stream_delay = STREAM_DELAY
            stream = asyncio.create_task(read_stream(http, url))
            await asyncio.sleep(STREAM_DELAY * 2)  # the stream is under way
            elapsed = await stop(podman, name, STOP_GRACE)
            events = await stream
            if events[-1] != "[DONE]":
                raise CheckFailed(f"the stream in flight at SIGTERM was cut: {events}")
            passed(
                f"podman stop: in-flight stream finished ({len(events)} events), "
                f"exit 0 after {elapsed:.1f} s (grace {STOP_GRACE} s)"
            )

        options = hardened({k: v for k, v in env.items() if not k.startswith("PROXY_")}, certs)
        code, output = await podman.run(
            "run", "--rm", *NO_HEALTHCHECK, *options, image, "check", check=False
        )
        if code != 0 or "token:        OK" not in output:
            raise CheckFailed(f"aoai-auth-proxy check exited {code}:\n{output}")
        passed("aoai-auth-proxy check: configuration, certificate and one token OK")


async def read_stream(http: aiohttp.ClientSession, url: str) -> list[str]:
    body = {
        "messages": [{"role": "user", "content": "one two three four five six"}],
        "stream": True,
    }
    async with http.post(f"{url}{CHAT}", json=body, headers={"api-key": "dummy"}) as response:
        if response.status != 200:
            raise CheckFailed(f"stream through {url}: {response.status}")
        return [
            line.decode().removeprefix("data: ").strip()
            async for line in response.content
            if line.startswith(b"data: ")
        ]


async def check_demo(
    podman: Podman, http: aiohttp.ClientSession, image: str, compose: str, demo_file: Path
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        compose,
        "--env-file=/dev/null",
        f"--file={demo_file}",
        "config",
        "--format=json",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DEMO_PORT": str(port)},
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise CheckFailed(f"{compose} config on {demo_file} exited {process.returncode}")
    services: dict[str, dict[str, Any]] = json.loads(output)["services"]
    (service_name, service), *others = services.items()
    if others:
        raise CheckFailed(f"{demo_file}: expected one service, found {list(services)}")
    options, command, test, grace = compose_to_podman(service)
    async with podman.container(
        f"aoai-auth-proxy-demo-ci-{os.getpid()}", options, image, *command
    ) as name:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(http, podman, name, url)
        reply = await chat(http, url, "Hello from the demo")
        if reply != "Echo: Hello from the demo":
            raise CheckFailed(f"demo answered {reply!r}")
        if test:
            await healthcheck(podman, name, test)
        elapsed = await stop(podman, name, grace)
        passed(
            f"{demo_file.name} service {service_name!r}: ready, chat completion, healthcheck, "
            f"exit 0 after {elapsed:.1f} s"
        )


def compose_to_podman(service: Mapping[str, Any]) -> tuple[list[str], list[str], list[str], int]:
    """podman options, command, healthcheck test and stop grace for one normalized service."""
    unknown = set(service) - COMPOSE_KEYS
    if unknown:
        raise CheckFailed(f"the demo check does not translate {sorted(unknown)}: teach it")
    if service.get("entrypoint") is not None:
        raise CheckFailed("the demo service must keep the image's entry point")
    if service.get("network_mode") != "host":
        raise CheckFailed("the demo service must use network_mode: host (see README)")
    options = ["--network", "host"]
    if service.get("read_only"):
        options += ["--read-only", "--read-only-tmpfs=false"]
    options += [o for path in service.get("tmpfs", []) for o in ("--tmpfs", path)]
    options += [o for cap in service.get("cap_drop", []) for o in ("--cap-drop", cap)]
    options += [o for opt in service.get("security_opt", []) for o in ("--security-opt", opt)]
    options += env_options({k: v for k, v in service.get("environment", {}).items() if v})
    test = service.get("healthcheck", {}).get("test", [])
    grace = parse_duration(service.get("stop_grace_period", "10s"))
    return options, list(service.get("command", [])), test, grace


def parse_duration(value: str) -> int:
    """Compose durations as `config` normalizes them (`30s`, `1m30s`), in whole seconds."""
    seconds, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for char in value:
        if char in units:
            seconds += float(number) * units[char]
            number = ""
        else:
            number += char
    return int(seconds)


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--compose", required=True, help="the Compose binary")
    parser.add_argument("--demo-compose", required=True, type=Path, help="compose.demo.yml")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run_image.py: needs root (rootful podman, certificate ownership)", file=sys.stderr)
        return 1
    podman = Podman()
    # No proxy from the environment: every request here goes to loopback.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), trust_env=False
    ) as http:
        try:
            await check_contents(podman, args.image)
            await check_proxy(podman, http, args.image)
            await check_demo(podman, http, args.image, args.compose, args.demo_compose)
        except CheckFailed as exc:
            print(f"  FAILED  {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
