"""The three measurements: sequential latency, wrk throughput, and held-open SSE streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
from harness import CpuMeter, PeakRss, Processes, Stack, cpu_seconds, rss_mb
from load import hold_streams, run_latency, run_wrk
from workload import CHAT_BODY, CHAT_PATH, HEADERS


async def settled_rss(pid: int, samples: int = 4, interval: float = 0.25) -> float:
    """The largest of a few RSS samples, so a measurement does not catch a momentary dip."""
    peak = 0.0
    for _ in range(samples):
        await asyncio.sleep(interval)
        peak = max(peak, rss_mb(pid))
    return peak


async def measure_latency(
    processes: Processes, stack: Stack, *, count: int, warmup: int
) -> dict[str, Any]:
    """p50/p99 of sequential requests, direct and through the proxy, and what the proxy adds."""
    meter = CpuMeter([stack.proxy.pid, stack.upstream.pid])
    direct, proxy = await run_latency(
        processes,
        stack.pinning.load,
        [stack.direct_url, stack.proxy_url],
        count=count,
        warmup=warmup,
    )
    result: dict[str, Any] = {"direct": direct, "proxy": proxy, "noise": meter.foreign()}
    for stat in ("p50", "p99"):
        d, p = float(direct[f"{stat}_us"]), float(proxy[f"{stat}_us"])
        result[stat] = {"added_us": p - d, "ratio": p / d}
    return result


async def _wrk_run(
    processes: Processes, stack: Stack, script: Path, url: str, connections: int, seconds: int
) -> dict[str, Any]:
    """One wrk run, with the proxy's and upstream's CPU, the proxy's peak RSS, other load."""
    pids = stack.proxy.pid, stack.upstream.pid
    meter = CpuMeter(pids)
    before = [cpu_seconds(pid) for pid in pids]
    async with PeakRss(stack.proxy.pid) as rss:
        result = await run_wrk(
            processes, stack.pinning.load, script, url, connections=connections, seconds=seconds
        )
    proxy_cpu, upstream_cpu = (
        100 * (cpu_seconds(pid) - start) / seconds for pid, start in zip(pids, before, strict=True)
    )
    return asdict(result) | {
        "proxy_cpu_percent": proxy_cpu,
        "upstream_cpu_percent": upstream_cpu,
        "proxy_peak_rss_mb": rss.peak_mb,
        "noise": meter.foreign(),
    }


async def measure_throughput(
    processes: Processes,
    stack: Stack,
    script: Path,
    *,
    connections: Sequence[int],
    seconds: int,
    warmup_seconds: int,
    rounds: int,
) -> dict[str, Any]:
    """Requests/s direct and through the proxy; runs interleave so drift hits both alike."""
    targets = {"direct": stack.direct_url, "proxy": stack.proxy_url}
    for url in targets.values():  # warm both paths: connection pools, allocators, caches
        await run_wrk(
            processes,
            stack.pinning.load,
            script,
            url,
            connections=max(connections),
            seconds=warmup_seconds,
        )
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_index in range(rounds):
        order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
        for count in connections:
            for name in order:
                run = await _wrk_run(processes, stack, script, targets[name], count, seconds)
                runs.setdefault(f"{name}/{count}", []).append(run)
    return {str(count): _throughput_summary(runs, count) for count in connections}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _throughput_summary(
    runs: Mapping[str, list[dict[str, Any]]], connections: int
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in ("direct", "proxy"):
        measured = runs[f"{name}/{connections}"]
        summary[name] = {
            "requests_per_second": _mean([r["requests_per_second"] for r in measured]),
            "p50_us": _mean([r["p50_us"] for r in measured]),
            "p99_us": _mean([r["p99_us"] for r in measured]),
            "errors": sum(r["socket_errors"] + r["non_2xx"] for r in measured),
            "proxy_cpu_percent": _mean([r["proxy_cpu_percent"] for r in measured]),
            "upstream_cpu_percent": _mean([r["upstream_cpu_percent"] for r in measured]),
            "proxy_peak_rss_mb": max(r["proxy_peak_rss_mb"] for r in measured),
            "max_other_load_percent": max(r["noise"]["other_processes_percent"] for r in measured),
            "runs": measured,
        }
    summary["ratio"] = (
        summary["proxy"]["requests_per_second"] / summary["direct"]["requests_per_second"]
    )
    return summary


async def _upstream_stats(session: aiohttp.ClientSession, stack: Stack) -> dict[str, int]:
    async with session.get(stack.direct_url + "/bench/stats") as response:
        stats: dict[str, int] = await response.json()
        return stats


async def _wait_upstream_open(
    session: aiohttp.ClientSession, stack: Stack, at_most: int, within: float
) -> float | None:
    """Seconds until the upstream holds at most `at_most` open streams, None if not `within`."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            # Another process's state: polling is the only way to observe it.
            while (await _upstream_stats(session, stack))["open"] > at_most:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        return None
    return time.monotonic() - started


async def _chat_status(session: aiohttp.ClientSession, base_url: str) -> int:
    async with session.post(base_url + CHAT_PATH, data=CHAT_BODY, headers=dict(HEADERS)) as r:
        await r.read()
        return r.status


async def measure_streams(
    session: aiohttp.ClientSession, stack: Stack, *, count: int
) -> dict[str, Any]:
    """Hold `count` streams open through the proxy and sample its RSS; then half are closed by
    their clients (the proxy must cancel those upstream) and half released and read to the end.
    """
    pid = stack.proxy.pid
    rest_mb = await settled_rss(pid)
    async with hold_streams(stack.proxy_url, count) as held:
        upstream_open = (await _upstream_stats(session, stack))["open"]
        open_mb = await settled_rss(pid)
        aborted = held.abort(len(held.responses) // 2)
        cancelled_in = await _wait_upstream_open(session, stack, upstream_open - aborted, within=10)
        async with session.post(stack.direct_url + "/bench/release") as response:
            released = (await response.json())["released"]
        async with asyncio.timeout(30):
            completed = await held.drain()
    await asyncio.sleep(0.5)
    async with session.get(stack.proxy_url + "/health") as response:
        health_after = response.status
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
        "kb_per_stream": (open_mb - rest_mb) * 1024 / max(1, held.first_events),
        "health_after": health_after,
        "chat_after": await _chat_status(session, stack.proxy_url),
        "after_mb": await settled_rss(pid),
        "upstream_after": await _upstream_stats(session, stack),
    }
