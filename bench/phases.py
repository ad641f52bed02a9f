"""The measurements: sequential latency, wrk throughput, timed SSE streams, a large upload,
held-open SSE streams, and PROXY_WORKERS scaling. Each compares direct, nginx and the proxy
where it can, with their runs interleaved so machine drift hits them alike."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
from harness import (
    CpuMeter,
    PeakRss,
    Processes,
    Route,
    Stack,
    cpu_busy_seconds,
    cpu_seconds,
    quiet_cpu,
    rss_mb,
    set_affinity,
)
from load import hold_streams, run_latency, run_sse, run_wrk
from workload import CHAT_BODY, CHAT_PATH, HEADERS, UPLOAD_PATH

TARGETS = ("direct", "nginx", "proxy")
RELAYS = ("nginx", "proxy")
THROUGHPUT_TRANSPORTS = ("http", "tls")
UPLOAD_CHUNK_BYTES = 256 * 1024
# A wrk run during which processes outside the bench used more than this share of the machine
# is run again (keeping the quietest try), within a budget of retries for the whole phase.
NOISY_RUN_PERCENT = 20.0
RETRIES_PER_RUN = 2


async def settled_rss(pid: int, samples: int = 4, interval: float = 0.25) -> float:
    """The largest of a few RSS samples, so a measurement does not catch a momentary dip."""
    peak = 0.0
    for _ in range(samples):
        await asyncio.sleep(interval)
        peak = max(peak, rss_mb(pid))
    return peak


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- latency -----------------------------------------------------------------------------------


LATENCY_PLACEMENTS = ("one_core", "two_cores")
# A third, shown beside the target: one core, HTTP, each target's requests in a block of its
# own, so a relay's caches stay as warm as its own traffic leaves them; rounds alternate the
# blocks against drift.
BLOCK_ROUNDS = 3


async def measure_latency(
    processes: Processes, stack: Stack, *, count: int, warmup: int
) -> dict[str, Any]:
    """p50/p99 of sequential requests on one connection each, direct, through nginx and through
    the proxy, over HTTP and HTTPS to the upstream, alternating request by request. Twice:
    `one_core`, the client and the upstream moved onto the relays' core, so that what a relay
    adds is its own work and no cross-core wake-ups (the issue's "same core"); `two_cores`,
    the placement of the throughput runs (client and upstream on the load core). Then
    `one_core_blocks`: one core, HTTP, each target alone (_latency_in_blocks)."""
    meter = CpuMeter(stack.pids)
    pinning = stack.pinning
    order = [(transport, name) for transport in THROUGHPUT_TRANSPORTS for name in TARGETS]
    result: dict[str, Any] = {}
    for placement in LATENCY_PLACEMENTS:
        one_core = placement == "one_core"
        if one_core:
            set_affinity(stack.upstream_pid, pinning.proxy_cpu)
        try:
            await quiet_cpu(pinning.proxy_cpu)
            stats = await run_latency(
                processes,
                pinning.proxy if one_core else pinning.load,
                [stack.routes[transport][name].url for transport, name in order],
                count=count,
                warmup=warmup,
                ca_file=stack.ca_file,
            )
        finally:
            if one_core:
                set_affinity(stack.upstream_pid, pinning.load_cpu)
        by_transport: dict[str, Any] = {}
        for (transport, name), measured in zip(order, stats, strict=True):
            by_transport.setdefault(transport, {})[name] = measured
        for by_target in by_transport.values():
            by_target["added"] = _added(by_target)
        result[placement] = by_transport
    result["one_core_blocks"] = {"http": await _latency_in_blocks(processes, stack, count, warmup)}
    result["block_rounds"] = BLOCK_ROUNDS
    result["noise"] = meter.foreign()
    return result


async def _latency_in_blocks(
    processes: Processes, stack: Stack, count: int, warmup: int
) -> dict[str, Any]:
    """One core, HTTP: direct, nginx and proxy each measured alone, BLOCK_ROUNDS rounds; each
    statistic is the median of the rounds'."""
    pinning = stack.pinning
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in TARGETS}
    set_affinity(stack.upstream_pid, pinning.proxy_cpu)
    try:
        for _ in range(BLOCK_ROUNDS):
            for name in TARGETS:
                await quiet_cpu(pinning.proxy_cpu)
                (measured,) = await run_latency(
                    processes,
                    pinning.proxy,
                    [stack.routes["http"][name].url],
                    count=count,
                    warmup=warmup,
                )
                rounds[name].append(measured)
    finally:
        set_affinity(stack.upstream_pid, pinning.load_cpu)
    by_target: dict[str, Any] = {}
    for name, runs in rounds.items():
        statuses: dict[str, int] = {}
        for run in runs:
            for status, number in run["statuses"].items():
                statuses[status] = statuses.get(status, 0) + number
        by_target[name] = {
            f"{stat}_us": _median([run[f"{stat}_us"] for run in runs])
            for stat in ("p50", "p90", "p99")
        } | {"errors": sum(run["errors"] for run in runs), "statuses": statuses}
    by_target["added"] = _added(by_target)
    return by_target


def _added(by_target: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """What each relay adds to the direct call's p50 and p99."""
    direct = by_target["direct"]
    return {
        relay: {
            stat: _stat(by_target[relay], f"{stat}_us") - _stat(direct, f"{stat}_us")
            for stat in ("p50", "p99")
        }
        for relay in RELAYS
    }


# -- throughput --------------------------------------------------------------------------------


async def _wrk_run(
    processes: Processes,
    stack: Stack,
    script: Path,
    route: Route,
    connections: int,
    seconds: int,
) -> dict[str, Any]:
    """One wrk run, with the relay's and the upstream's CPU, both cores' use, the relay's peak
    RSS, and other processes' load."""
    pinning = stack.pinning
    pids = [pid for pid in (route.relay_pid, stack.upstream_pid) if pid is not None]
    meter = CpuMeter(stack.pids)
    before = {pid: cpu_seconds(pid) for pid in pids}
    cores = (pinning.proxy_cpu, pinning.load_cpu)
    await quiet_cpu(pinning.proxy_cpu)
    cores_before = [cpu_busy_seconds(cpu) for cpu in cores]
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as context:
        peak = None
        if route.relay_pid is not None:
            peak = await context.enter_async_context(PeakRss(route.relay_pid))
        result = await run_wrk(
            processes, pinning.load, script, route.url, connections=connections, seconds=seconds
        )
    elapsed = time.monotonic() - started
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    relay_core, load_core = (
        100 * (cpu_busy_seconds(cpu) - start) / elapsed
        for cpu, start in zip(cores, cores_before, strict=True)
    )
    relay_cpu = used.get(route.relay_pid) if route.relay_pid is not None else None
    return asdict(result) | {
        "relay_cpu_percent": None if relay_cpu is None else 100 * relay_cpu / elapsed,
        "relay_cpu_us_per_request": (
            None if relay_cpu is None else 1e6 * relay_cpu / max(1, result.requests)
        ),
        "upstream_cpu_percent": 100 * used[stack.upstream_pid] / elapsed,
        "relay_core_busy_percent": relay_core,
        "load_core_busy_percent": load_core,
        "relay_peak_rss_mb": None if peak is None else peak.peak_mb,
        "noise": meter.foreign(),
    }


class Retries:
    """The bench's budget of re-runs for runs disturbed by other processes."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.used = 0


async def _quiet_wrk_run(
    processes: Processes,
    stack: Stack,
    script: Path,
    route: Route,
    connections: int,
    seconds: int,
    retries: Retries,
) -> dict[str, Any]:
    """A wrk run, run again while other processes disturbed it (see NOISY_RUN_PERCENT); the
    quietest try counts, and says how many tries it took."""
    tries = [await _wrk_run(processes, stack, script, route, connections, seconds)]
    while (
        min(t["noise"]["other_processes_percent"] for t in tries) > NOISY_RUN_PERCENT
        and len(tries) <= RETRIES_PER_RUN
        and retries.left > 0
    ):
        retries.left -= 1
        retries.used += 1
        tries.append(await _wrk_run(processes, stack, script, route, connections, seconds))
    best = min(tries, key=lambda t: t["noise"]["other_processes_percent"])
    return best | {"tries": len(tries)}


async def measure_throughput(
    processes: Processes,
    stack: Stack,
    script: Path,
    *,
    connections: Sequence[int],
    seconds: int,
    warmup_seconds: int,
    rounds: int,
    between_runs: Callable[[], None],
    retries: Retries,
) -> dict[str, Any]:
    """Requests/s direct, through nginx and through the proxy, over HTTP and HTTPS to the
    upstream. In each round the three runs of one (transport, connections) follow each other,
    in an order that rotates from round to round; ratios are medians of each round's ratio."""
    for transport in THROUGHPUT_TRANSPORTS:  # warm every path: pools, TLS sessions, caches
        for name in TARGETS:
            await run_wrk(
                processes,
                stack.pinning.load,
                script,
                stack.routes[transport][name].url,
                connections=max(connections),
                seconds=warmup_seconds,
            )
    between_runs()
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for round_index in range(rounds):
        shift = round_index % len(TARGETS)
        order = TARGETS[shift:] + TARGETS[:shift]
        for transport in THROUGHPUT_TRANSPORTS:
            for count in connections:
                for name in order:
                    route = stack.routes[transport][name]
                    run = await _quiet_wrk_run(
                        processes, stack, script, route, count, seconds, retries
                    )
                    runs.setdefault((transport, count, name), []).append(run)
                    between_runs()
    return {
        transport: {
            str(count): _throughput_summary(runs, transport, count) for count in connections
        }
        for transport in THROUGHPUT_TRANSPORTS
    }


def _optional_median(runs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return _median(values) if values else None


def _throughput_summary(
    runs: Mapping[tuple[str, int, str], list[dict[str, Any]]], transport: str, connections: int
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in TARGETS:
        measured = runs[transport, connections, name]
        summary[name] = {
            "requests_per_second": _median([r["requests_per_second"] for r in measured]),
            "p50_us": _median([r["p50_us"] for r in measured]),
            "p99_us": _median([r["p99_us"] for r in measured]),
            "errors": sum(r["socket_errors"] + r["non_2xx"] for r in measured),
            "requests": sum(r["requests"] for r in measured),
            "relay_cpu_percent": _optional_median(measured, "relay_cpu_percent"),
            "relay_cpu_us_per_request": _optional_median(measured, "relay_cpu_us_per_request"),
            "upstream_cpu_percent": _median([r["upstream_cpu_percent"] for r in measured]),
            "relay_core_busy_percent": _median([r["relay_core_busy_percent"] for r in measured]),
            "load_core_busy_percent": _median([r["load_core_busy_percent"] for r in measured]),
            "relay_peak_rss_mb": max(
                (r["relay_peak_rss_mb"] for r in measured if r["relay_peak_rss_mb"] is not None),
                default=None,
            ),
            "max_other_load_percent": max(r["noise"]["other_processes_percent"] for r in measured),
            "runs": measured,
        }

    def ratio(numerator: str, denominator: str) -> float:
        pairs = zip(
            runs[transport, connections, numerator],
            runs[transport, connections, denominator],
            strict=True,
        )
        return _median(
            [a["requests_per_second"] / max(1e-9, b["requests_per_second"]) for a, b in pairs]
        )

    summary["ratio"] = {
        "proxy/nginx": ratio("proxy", "nginx"),
        "proxy/direct": ratio("proxy", "direct"),
        "nginx/direct": ratio("nginx", "direct"),
    }
    return summary


# -- timed SSE streams -------------------------------------------------------------------------


async def measure_sse(
    processes: Processes,
    stack: Stack,
    *,
    streams: int,
    events: int,
    interval_ms: float,
) -> dict[str, Any]:
    """First SSE byte and per-event lag, direct, through nginx and through the proxy."""
    meter = CpuMeter(stack.pids)
    await quiet_cpu(stack.pinning.proxy_cpu)
    stats = await run_sse(
        processes,
        stack.pinning.load,
        [stack.routes["streams"][name].url for name in TARGETS],
        streams=streams,
        events=events,
        interval_ms=interval_ms,
    )
    result: dict[str, Any] = dict(zip(TARGETS, stats, strict=True))
    result["proxy-nginx"] = {
        measure: {
            stat: _stat(result["proxy"], measure, stat) - _stat(result["nginx"], measure, stat)
            for stat in ("p50_us", "p99_us")
        }
        for measure in ("first_byte", "lag")
    }
    result["noise"] = meter.foreign()
    return result


def _stat(stats: Mapping[str, Any], *keys: str) -> float:
    """stats[key][key]..., NaN where a target measured nothing (every request failed)."""
    value: Any = stats
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return float(value) if value is not None else float("nan")


# -- a large upload ----------------------------------------------------------------------------


async def _upload_body(total: int) -> AsyncIterator[bytes]:
    chunk = bytes(UPLOAD_CHUNK_BYTES)
    sent = 0
    while sent < total:
        piece = chunk[: min(UPLOAD_CHUNK_BYTES, total - sent)]
        sent += len(piece)
        yield piece


async def measure_upload(
    session: aiohttp.ClientSession, stack: Stack, *, megabytes: int
) -> dict[str, Any]:
    """One upload of `megabytes` MiB (with its Content-Length, as SDKs send files) through nginx
    and through the proxy, each relay's RSS sampled every 20 ms."""
    total = megabytes * 2**20
    result: dict[str, Any] = {"megabytes": megabytes}
    for name in RELAYS:
        route = stack.routes["streams"][name]
        assert route.relay_pid is not None
        rest = await settled_rss(route.relay_pid)
        started = time.monotonic()
        headers = dict(HEADERS) | {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(total),
        }
        async with (
            PeakRss(route.relay_pid, interval=0.02) as peak,
            asyncio.timeout(120),
            session.post(
                route.url + UPLOAD_PATH, data=_upload_body(total), headers=headers
            ) as response,
        ):
            status = response.status
            answer = await response.json(content_type=None) if status == 200 else {}
        seconds = time.monotonic() - started
        result[name] = {
            "status": status,
            "received_bytes": answer.get("bytes"),
            "seconds": seconds,
            "mb_per_second": megabytes / max(1e-9, seconds),
            "rest_mb": rest,
            "peak_mb": peak.peak_mb,
            "growth_mb": peak.peak_mb - rest,
            "after_mb": await settled_rss(route.relay_pid),
        }
    return result


# -- held-open SSE streams ---------------------------------------------------------------------


async def upstream_stats(session: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with session.get(stack.streams_upstream_url + "/bench/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def _wait_upstream_open(
    session: aiohttp.ClientSession, stack: Stack, at_most: int, within: float
) -> float | None:
    """Seconds until the upstream holds at most `at_most` open streams, None if not `within`."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            # Another process's state: polling is the only way to observe it.
            while (await upstream_stats(session, stack))["open"] > at_most:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        return None
    return time.monotonic() - started


async def chat_status(session: aiohttp.ClientSession, base_url: str) -> int:
    async with session.post(base_url + CHAT_PATH, data=CHAT_BODY, headers=dict(HEADERS)) as r:
        await r.read()
        return r.status


async def measure_streams(
    session: aiohttp.ClientSession, stack: Stack, *, count: int
) -> dict[str, Any]:
    """Hold `count` streams open through the proxy and sample its RSS; then half are closed by
    their clients (the proxy must cancel those upstream) and half released and read to the end.
    """
    proxy = stack.routes["streams"]["proxy"]
    assert proxy.relay_pid is not None
    pid = proxy.relay_pid
    rest_mb = await settled_rss(pid)
    async with hold_streams(proxy.url, count) as held:
        upstream_open = (await upstream_stats(session, stack))["open"]
        open_mb = await settled_rss(pid)
        aborted = held.abort(len(held.responses) // 2)
        cancelled_in = await _wait_upstream_open(session, stack, upstream_open - aborted, within=10)
        async with session.post(stack.streams_upstream_url + "/bench/release") as response:
            released = (await response.json())["released"]
        async with asyncio.timeout(30):
            completed = await held.drain()
    await asyncio.sleep(0.5)
    async with session.get(proxy.url + "/health") as response:
        health_after = response.status
    after_stats = await upstream_stats(session, stack)
    return {
        "requested": held.requested,
        "opened_200": held.statuses.get(200, 0),
        "statuses": {str(k): v for k, v in held.statuses.items()},
        "failures": dict(held.failures),
        "first_events": held.first_events,
        "open_seconds": held.open_seconds,
        "upstream_open": upstream_open,
        "client_closed": aborted,
        "upstream_cancelled_seconds": cancelled_in,
        "released": released,
        "completed": completed,
        "rest_before_mb": rest_mb,
        "open_mb": open_mb,
        "kb_per_stream": (
            (open_mb - rest_mb) * 1024 / held.first_events if held.first_events else None
        ),
        "health_after": health_after,
        "chat_after": await chat_status(session, proxy.url),
        "after_mb": await settled_rss(pid),
        "upstream_after": {k: after_stats[k] for k in ("open", "opened", "completed")},
    }


# -- PROXY_WORKERS -----------------------------------------------------------------------------


async def measure_workers(
    processes: Processes,
    stack: Stack,
    script: Path,
    routes: Mapping[str, Route],
    *,
    connections: int,
    seconds: int,
    warmup_seconds: int,
    rounds: int,
    between_runs: Callable[[], None],
    retries: Retries,
) -> dict[str, Any]:
    """wrk against unpinned proxies with PROXY_WORKERS=1 and =2 (`routes` "1" and "2"),
    alternating; the ratio is the median of each round's 2-workers/1-worker ratio."""
    for route in routes.values():
        await run_wrk(
            processes,
            stack.pinning.load,
            script,
            route.url,
            connections=connections,
            seconds=warmup_seconds,
        )
    between_runs()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in routes}
    names = list(routes)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            run = await _quiet_wrk_run(
                processes, stack, script, routes[name], connections, seconds, retries
            )
            runs[name].append(run)
            between_runs()
    summary: dict[str, Any] = {
        name: {
            "requests_per_second": _median([r["requests_per_second"] for r in measured]),
            "relay_cpu_percent": _optional_median(measured, "relay_cpu_percent"),
            "errors": sum(r["socket_errors"] + r["non_2xx"] for r in measured),
            "runs": measured,
        }
        for name, measured in runs.items()
    }
    summary["ratio"] = _median(
        [
            two["requests_per_second"] / max(1e-9, one["requests_per_second"])
            for one, two in zip(runs["1"], runs["2"], strict=True)
        ]
    )
    return summary
