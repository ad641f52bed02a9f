"""Formats the bench results (the dict bench/run.py writes to latest.json) as a text table."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

# The proxy's text log format: "2026-01-01 12:00:00,123 LEVEL logger: message".
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (\w+) (\S+?):? (.*)$")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return ("  " + "  ".join([first, *rest])).rstrip()

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
                f"{max(direct['max_other_load_percent'], proxy['max_other_load_percent']):.0f}%",
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
        "other load",
    ]
    return [
        f"Throughput: POST chat completion, {results['setup']['response_bytes']}-byte JSON "
        f"answer; wrk, mean of {options['rounds']} interleaved rounds x {options['seconds']} s",
        *_table(header, rows),
        "  (CPU: share of one core during the proxy runs; errors: wrk socket errors + non-2xx;",
        "   other load: worst share of the machine used by processes outside the bench in a run)",
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
    peak = max(s["proxy"]["proxy_peak_rss_mb"] for s in results["throughput"].values())
    rows = [
        ["at rest, token held (after start-up)", f"{results['rest_mb']:.1f}", ""],
        ["peak during the wrk runs", f"{peak:.1f}", ""],
    ]
    for number, streams in enumerate(results["streams"], start=1):
        rows += [
            [f"round {number}: at rest before the streams", f"{streams['rest_before_mb']:.1f}", ""],
            [
                f"round {number}: {streams['first_events']} SSE streams open",
                f"{streams['open_mb']:.1f}",
                f"+{streams['kb_per_stream']:.1f} KB per stream",
            ],
            [f"round {number}: after the streams ended", f"{streams['after_mb']:.1f}", ""],
        ]
    return [
        "Memory: proxy RSS (KB per stream = open minus rest before, over the streams open)",
        *_table(["", "MB", ""], rows),
        *(
            f"  {'round ' + str(n) + ':' if i == 0 else ''}".ljust(12) + line
            for n, streams in enumerate(results["streams"], start=1)
            for i, line in enumerate(_streams_outcome(streams))
        ),
    ]


def _streams_outcome(streams: Mapping[str, Any]) -> list[str]:
    cancelled = streams["upstream_cancelled_seconds"]
    cancel_text = "NOT within 10 s" if cancelled is None else f"within {cancelled:.2f} s"
    return [
        f"{streams['opened_200']}/{streams['requested']} answered 200, "
        f"{streams['first_events']} first events read in {streams['open_seconds']:.1f} s, "
        f"{streams['upstream_open']} open upstream, failures: {streams['failures'] or 'none'}",
        f"{streams['client_closed']} closed by their client -> cancelled upstream {cancel_text}; "
        f"{streams['released']} released -> {streams['completed']} read to [DONE]",
        f"then /health {streams['health_after']}, chat completion {streams['chat_after']}, "
        f"upstream streams {streams['upstream_after']}",
    ]


def _noise(results: Mapping[str, Any]) -> str:
    noise = results["noise"]
    latency = results["latency"]["noise"]
    worst = max(s["proxy"]["max_other_load_percent"] for s in results["throughput"].values())
    return (
        f"machine noise: other processes used {noise['other_processes_percent']:.0f}% of the "
        f"machine over the whole bench (latency phase {latency['other_processes_percent']:.0f}%, "
        f"worst proxy wrk run {worst:.0f}%), hypervisor steal {noise['steal_percent']:.1f}%"
    )


def summarize_log(lines: Sequence[str]) -> list[dict[str, Any]]:
    """Group log records by level, logger, message (digits masked) and the exception that ended
    their traceback, if any; most frequent first."""
    groups: Counter[tuple[str, str, str, str]] = Counter()
    current: list[str] | None = None

    def close(record: list[str] | None) -> None:
        if record is not None:
            level, logger, message, *rest = record
            exception = next((line for line in reversed(rest) if not line[:1].isspace()), "")
            groups[level, logger, re.sub(r"\d+", "N", message)[:120], exception[:160]] += 1

    for line in lines:
        match = _LOG_RECORD.match(line)
        if match is not None:
            close(current)
            current = list(match.groups())
        elif current is not None and line.strip() and not line.startswith("Traceback"):
            current.append(line)
    close(current)
    return [
        {"count": n, "level": level, "logger": logger, "message": message, "exception": exc}
        for (level, logger, message, exc), n in groups.most_common()
    ]


def _log_lines(results: Mapping[str, Any]) -> list[str]:
    summary = results["proxy_log_summary"]
    lines = [
        f"proxy log (bench/results/proxy.log): {sum(g['count'] for g in summary)} record(s) "
        f"at WARNING or above in {results['proxy_log_lines']} line(s)"
    ]
    for group in summary:
        lines.append(
            f"  {group['count']:>5} x {group['level']} {group['logger']}: {group['message']}"
        )
        if group["exception"]:
            lines.append(f"          -> {group['exception']}")
    return lines


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
        _noise(results),
        *_log_lines(results),
        f"bench took {results['duration_seconds']:.0f} s",
    ]
    return "\n".join(lines)
