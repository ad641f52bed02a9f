"""Formats the bench results (the dict bench/run.py writes to latest.json) as a text table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest])

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _throughput(results: Mapping[str, Any]) -> list[str]:
    options = results["options"]
    rows = []
    for connections, summary in results["throughput"].items():
        direct, proxy = summary["direct"], summary["proxy"]
        rows.append(
            [
                connections,
                f"{direct['requests_per_second']:,.0f}",
                f"{proxy['requests_per_second']:,.0f}",
                f"{summary['ratio']:.2f}",
                f"{direct['p50_us'] / 1000:.2f} / {direct['p99_us'] / 1000:.2f}",
                f"{proxy['p50_us'] / 1000:.2f} / {proxy['p99_us'] / 1000:.2f}",
                f"{proxy['proxy_cpu_percent']:.0f}%",
                f"{proxy['upstream_cpu_percent']:.0f}%",
                f"{direct['errors']} / {proxy['errors']}",
            ]
        )
    header = [
        "conns",
        "direct req/s",
        "proxy req/s",
        "proxy/direct",
        "direct p50/p99 ms",
        "proxy p50/p99 ms",
        "proxy CPU",
        "upstream CPU",
        "errors d/p",
    ]
    return [
        f"Throughput: POST chat completion, {results['setup']['response_bytes']}-byte JSON "
        f"answer; wrk, mean of {options['rounds']} interleaved rounds x {options['seconds']:g} s",
        *_table(header, rows),
        "  (CPU = share of one core during the proxy runs; errors = wrk socket errors + non-2xx)",
    ]


def _latency(results: Mapping[str, Any]) -> list[str]:
    latency = results["latency"]
    direct, proxy = latency["direct"], latency["proxy"]
    rows = [
        [
            name,
            f"{direct[f'{name}_us']:,.0f}",
            f"{proxy[f'{name}_us']:,.0f}",
            f"{latency[name]['added_us']:,.0f}",
            f"{latency[name]['ratio']:.2f}",
        ]
        for name in ("p50", "p99")
    ]
    options = results["options"]
    failed = [
        f"{side}: {stats['errors']} errors, statuses {stats['statuses']}"
        for side, stats in (("direct", direct), ("proxy", proxy))
        if stats["errors"] or set(stats["statuses"]) != {"200"}
    ]
    return [
        f"Added latency: 1 connection, {options['latency_count']} sequential requests each "
        f"(after {options['latency_warmup']} warm-up), direct and proxy alternating",
        *_table(["", "direct us", "proxy us", "added us", "proxy/direct"], rows),
        *(f"  ! {line}" for line in failed),
    ]


def _memory(results: Mapping[str, Any]) -> list[str]:
    streams = results["streams"]
    peak_64 = max(s["proxy"]["proxy_peak_rss_mb"] for s in results["throughput"].values())
    cancelled = streams["upstream_cancelled_seconds"]
    cancel_text = "never (within 10 s)" if cancelled is None else f"within {cancelled:.2f} s"
    rows = [
        ["at rest, token held (after start-up)", f"{results['rest_mb']:.1f}", ""],
        ["peak during the wrk runs", f"{peak_64:.1f}", ""],
        ["at rest, just before the streams", f"{streams['rest_before_mb']:.1f}", ""],
        [
            f"{streams['first_events']} SSE streams open",
            f"{streams['open_mb']:.1f}",
            f"+{streams['kb_per_stream']:.1f} KB/stream",
        ],
        ["after the streams ended", f"{streams['after_mb']:.1f}", ""],
    ]
    return [
        "Memory: proxy RSS",
        *_table(["", "MB", ""], rows),
        f"  streams: {streams['opened_200']}/{streams['requested']} answered 200, "
        f"{streams['first_events']} first events read in {streams['open_seconds']:.1f} s, "
        f"{streams['upstream_open']} open upstream; failures {streams['failures'] or 'none'}",
        f"  {streams['client_closed']} closed by their client -> proxy cancelled them upstream "
        f"{cancel_text}; {streams['released']} released upstream -> "
        f"{streams['completed']} read to [DONE]",
        f"  afterwards: /health {streams['health_after']}, chat completion "
        f"{streams['chat_after']}, upstream streams {streams['upstream_after']}",
    ]


def format_report(results: Mapping[str, Any]) -> str:
    setup, machine = results["setup"], results["machine"]
    lines = [
        f"aoai-auth-proxy bench, {results['timestamp']}: {machine['cpus']} CPUs, "
        f"Python {machine['python']}, aiohttp {machine['aiohttp']}",
        f"  load: {setup['load_generator']}",
        f"  {setup['pinning']}",
        f"  upstream: {setup['upstream']}",
        f"  proxy: python -m aoai_auth_proxy, PROXY_LOG_LEVEL={setup['proxy_log_level']} "
        "(the INFO access log is off in every run); ready "
        f"{results['proxy_ready_seconds']:.1f} s after start, "
        f"{results['token_requests']} token request(s) to the Entra stand-in",
        "",
        *_throughput(results),
        "",
        *_latency(results),
        "",
        *_memory(results),
        "",
        f"proxy log: {results['proxy_log_lines']} line(s) at WARNING or above",
        *(f"  | {line}" for line in results["proxy_log_head"]),
        f"bench took {results['duration_seconds']:.0f} s",
    ]
    return "\n".join(lines)
