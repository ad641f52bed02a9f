"""Child processes of the bench (upstream, proxy, load), CPU pinning, and stopping them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PYTHON = sys.executable
STOP_GRACE_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Pinning:
    """`taskset` prefixes: the proxy alone on one core; load, upstream and driver on another."""

    proxy: tuple[str, ...]
    load: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Stack:
    """What is running: the two base URLs under test and the processes behind them."""

    direct_url: str
    proxy_url: str
    proxy: subprocess.Popen[bytes]
    upstream: subprocess.Popen[bytes]
    pinning: Pinning


def cpu_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None or len(cpus) < 2:
        return Pinning((), (), f"no CPU pinning ({len(cpus)} CPUs usable, taskset={taskset})")
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load_cpu})  # the driver (Entra stand-in, stream clients) too
    return Pinning(
        (taskset, "-c", str(proxy_cpu)),
        (taskset, "-c", str(load_cpu)),
        f"proxy pinned to CPU {proxy_cpu}; wrk, the upstream, the latency client and this "
        f"driver pinned to CPU {load_cpu} (the same placement for direct and proxy runs)",
    )


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every child the bench starts, each in its own process group, so one kill stops it all."""

    def __init__(self) -> None:
        self._popen: list[subprocess.Popen[bytes]] = []
        self._async: list[asyncio.subprocess.Process] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(log.open("ab")) if log is not None else None
            process = subprocess.Popen(
                list(argv),
                env=None if env is None else dict(env),
                stdout=stdout if stdout is not None else stderr,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=REPO_DIR,
                start_new_session=True,
            )
        self._popen.append(process)
        return process

    async def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Run a load generator to completion; returns (exit status, stdout, stderr).
        Bound it with `asyncio.timeout`: on cancellation the child is killed and reaped."""
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_DIR,
            start_new_session=True,
        )
        self._async.append(process)
        try:
            out, err = await process.communicate()
        finally:
            if process.returncode is None:  # timed out or cancelled: stop it and reap it
                _kill_group(process.pid, None)
                await process.wait()
            self._async.remove(process)
        return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def stop_all(self) -> None:
        """SIGTERM every group, wait up to STOP_GRACE_SECONDS in total, then SIGKILL."""
        for child in self._async:
            _kill_group(child.pid, child.returncode)
        for process in self._popen:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self._popen:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, None)
                process.wait()
        self._popen.clear()


def _kill_group(pid: int, returncode: int | None) -> None:
    if returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


async def read_ready_line(process: subprocess.Popen[bytes], prefix: str) -> str:
    """The rest of the first stdout line starting with `prefix` (the child's "I am up")."""
    stream = process.stdout
    if stream is None:
        raise RuntimeError("child started without a stdout pipe")
    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
        while True:
            line = (await asyncio.to_thread(stream.readline)).decode().strip()
            if not line and process.poll() is not None:
                raise RuntimeError(f"child exited with {process.returncode} before it was ready")
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()


async def wait_healthy(
    session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]
) -> float:
    """Poll `GET url` until 200; returns the seconds it took. Fails fast if the child exits."""
    started = time.monotonic()
    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"proxy exited with {process.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.05)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class PeakRss:
    """Samples a process's RSS in the background while the `async with` block runs."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self._pid = pid
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.peak_mb = 0.0

    async def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, rss_mb(self._pid))
            await asyncio.sleep(self._interval)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.peak_mb = max(self.peak_mb, rss_mb(self._pid))


@dataclass(frozen=True)
class _CpuSnapshot:
    at: float
    busy: float
    steal: float
    ours: float


class CpuMeter:
    """How much CPU processes outside the bench used while it measured: a noise gauge.

    Busy time of the whole machine, minus this driver and its reaped children (wrk, the latency
    client) and the long-running `pids` (proxy, upstream), is everyone else's load.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = tuple(pids)
        self._start = self._snapshot()

    def _snapshot(self) -> _CpuSnapshot:
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        ours += sum(cpu_seconds(pid) for pid in self._pids)
        return _CpuSnapshot(time.monotonic(), busy, machine.steal, ours)

    def foreign(self) -> dict[str, float]:
        """Since construction: other processes' and hypervisor steal CPU, in % of the machine."""
        end = self._snapshot()
        capacity = max(1e-9, (end.at - self._start.at) * (psutil.cpu_count() or 1))
        foreign = max(0.0, (end.busy - self._start.busy) - (end.ours - self._start.ours))
        return {
            "other_processes_percent": 100 * foreign / capacity,
            "steal_percent": 100 * (end.steal - self._start.steal) / capacity,
        }
