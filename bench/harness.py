"""Child processes of the bench (upstreams, relays, load), CPU pinning, and stopping them all."""

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
from collections.abc import Callable, Mapping, Sequence
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
    """`taskset` prefixes: the relay under test (proxy or nginx) alone on one core; load,
    upstreams and driver on another; `anywhere` undoes the driver's own pinning for a child."""

    proxy: tuple[str, ...]
    load: tuple[str, ...]
    anywhere: tuple[str, ...]
    description: str
    proxy_cpu: int | None = None
    load_cpu: int | None = None


def cpu_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None or len(cpus) < 2:
        return Pinning((), (), (), f"no CPU pinning ({len(cpus)} CPUs usable, taskset={taskset})")
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load_cpu})  # the driver (Entra stand-in, stream clients) too
    return Pinning(
        (taskset, "-c", str(proxy_cpu)),
        (taskset, "-c", str(load_cpu)),
        (taskset, "-c", ",".join(map(str, cpus))),
        f"relay under test (proxy or nginx) pinned to CPU {proxy_cpu}; wrk, the upstreams, the "
        f"latency and SSE clients and this driver pinned to CPU {load_cpu} (the same placement "
        "for direct, nginx and proxy runs)",
        proxy_cpu,
        load_cpu,
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

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM one child's group, SIGKILL it after STOP_GRACE_SECONDS."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, None)
                process.wait()
        if process in self._popen:
            self._popen.remove(process)

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


def _tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (the proxy's workers, if it forks any)."""
    process = psutil.Process(pid)
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def rss_mb(pid: int) -> float:
    """RSS of a process and its descendants, MB."""
    total = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / 2**20


def anonymous_mb(pid: int) -> float:
    """Anonymous memory of a process and its descendants (heap, objects, stacks), MB: RSS
    without the pages of mapped files (the interpreter, libraries, extensions), which every
    copy of the same image on a node shares through the page cache (Linux smaps_rollup)."""
    total = 0
    for process in _tree(pid):
        with contextlib.suppress(OSError, psutil.Error):
            rollup = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
            anonymous = (
                int(line.split()[1])
                for line in rollup.splitlines()
                if line.startswith("Anonymous:")
            )
            total += next(anonymous, 0)
    return total / 2**10


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants, seconds."""
    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def set_affinity(pid: int, cpu: int | None) -> None:
    """Move a process and its descendants to one CPU (None: leave them where they are)."""
    if cpu is None:
        return
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            process.cpu_affinity([cpu])


def process_count(pid: int) -> int:
    return len(_tree(pid))


def cpu_busy_seconds(cpu: int | None) -> float:
    """Busy time of one CPU (the whole machine's if None), seconds."""
    times = psutil.cpu_times(percpu=True)[cpu] if cpu is not None else psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


async def quiet_cpu(cpu: int | None, *, below_percent: float = 10.0, within: float = 3.0) -> float:
    """Wait (at most `within` s) until `cpu` is busy less than `below_percent` of a 50 ms window,
    so that a run does not start while a relay still works off the previous one. Returns the
    seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        before, at = cpu_busy_seconds(cpu), time.monotonic()
        await asyncio.sleep(0.05)
        if 100 * (cpu_busy_seconds(cpu) - before) / (time.monotonic() - at) < below_percent:
            break
    return time.monotonic() - started


async def wait_accepting(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until 127.0.0.1:`port` accepts a connection; fails fast if `process` exits."""
    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"child exited with {process.returncode} before it listened")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            await asyncio.sleep(0.05)


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
class Route:
    """One way to an upstream: `direct`, `nginx` or `proxy`, its base URL, and the process that
    relays it (its pid, None for direct)."""

    name: str
    url: str
    relay_pid: int | None


@dataclass(frozen=True)
class Stack:
    """What is running. `routes[transport][name]`: transport `http` and `tls` reach the static
    upstream (nginx) over HTTP and HTTPS, `streams` the aiohttp upstream (SSE, uploads)."""

    pinning: Pinning
    routes: Mapping[str, Mapping[str, Route]]
    upstream_pid: int  # the static upstream nginx (master; its worker is in its tree)
    streams_upstream_pid: int
    nginx_pid: int  # the relay nginx (master)
    ca_file: Path
    pids: tuple[int, ...]  # every long-running child, for the noise gauge

    @property
    def streams_upstream_url(self) -> str:
        return self.routes["streams"]["direct"].url


class LogKeeper:
    """Keeps a busy log file small: between runs, counts and drops its access lines (those
    `is_access` says are), keeps every other line in memory, and empties the file.

    The writer must append (O_APPEND), as a child given an "ab" file and nginx's logs do, so
    that after the truncation its next line lands at the start of the file, not after a hole.
    """

    def __init__(
        self, path: Path, is_access: Callable[[str], bool], max_kept: int = 20_000
    ) -> None:
        self.path = path
        self._is_access = is_access
        self._max_kept = max_kept
        self.access_lines = 0
        self.kept: list[str] = []
        self.dropped = 0  # other lines past `max_kept` (a proxy logging a traceback per request)

    def collect(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r+", errors="replace") as file:
            text = file.read()
            file.truncate(0)
        for line in text.splitlines():
            if self._is_access(line):
                self.access_lines += 1
            elif len(self.kept) < self._max_kept:
                self.kept.append(line)
            else:
                self.dropped += 1


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
