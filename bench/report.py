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
    summary = [g for g in results["proxy_log_summary"] if g["level"] not in ("INFO", "DEBUG")]
    dropped = results.get("proxy_log_lines_dropped", 0)
    lines = [
        f"proxy logs (bench/results/proxy.log, access lines left out): "
        f"{sum(g['count'] for g in summary)} record(s) at WARNING or above in "
        f"{results['proxy_log_lines']} line(s)"
        + (f", {dropped} more line(s) not kept" if dropped else "")
    ]
    for group in summary[:15]:
        lines.append(
            f"  {group['count']:>5} x {group['level']} {group['logger']}: {group['message']}"
        )
        if group["exception"]:
            lines.append(f"          -> {group['exception']}")
    return lines


def is_access_line(line: str) -> bool:
    """A record of the proxy's access logger (one per request at INFO)."""
    match = _LOG_RECORD.match(line)
    return match is not None and match.group(2).endswith(".access")


# -- the targets of issue 8 ---------------------------------------------------------------------

THROUGHPUT_MIN_RATIO = 0.6  # proxy req/s over nginx's
ADDED_LATENCY_MAX_US = 40.0  # proxy p50 minus direct p50, one connection
SSE_MAX_BEHIND_NGINX_MS = 0.5  # first byte and per-event lag, proxy minus nginx
STREAM_MAX_KB = 64.0  # proxy RSS per open SSE stream
UPLOAD_MAX_GROWTH_MB = 5.0  # proxy RSS growth during a 100 MB upload
REST_MAX_MB = 50.0  # proxy RSS at rest, token held
WORKERS_MIN_RATIO = 1.2  # PROXY_WORKERS=2 over 1 (2 cores shared with wrk and the upstream)
_TRANSPORT_NAMES = {"http": "HTTP", "tls": "HTTPS"}
TARGETS = ("direct", "nginx", "proxy")
RELAYS = ("nginx", "proxy")


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:{spec}}{suffix}"


def _row(
    name: str, cells: Sequence[str], goal: str, met: bool | None, **values: Any
) -> dict[str, Any]:
    """`cells`: direct, nginx, proxy, proxy vs nginx, proxy vs direct."""
    return {
        "name": name,
        "cells": [*cells, *[""] * (5 - len(cells))],
        "goal": goal,
        "met": _met(met),
        "values": values,
    }


def _throughput_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for transport, by_connections in results["throughput"].items():
        for connections, summary in by_connections.items():
            rps = {name: summary[name]["requests_per_second"] for name in TARGETS}
            ratio = summary["ratio"]
            errors = summary["proxy"]["errors"] + summary["nginx"]["errors"]
            cells = [_num(rps[name], ",.0f") for name in TARGETS]
            cells += [f"{ratio['proxy/nginx']:.2f}x", f"{ratio['proxy/direct']:.2f}x"]
            rows.append(
                _row(
                    f"req/s, {_TRANSPORT_NAMES[transport]} upstream, {connections} conns",
                    cells,
                    f">= {THROUGHPUT_MIN_RATIO:.1f}x nginx" + (", no errors" if errors else ""),
                    ratio["proxy/nginx"] >= THROUGHPUT_MIN_RATIO and errors == 0,
                    requests_per_second=rps,
                    ratio=ratio,
                    errors=errors,
                )
            )
    for transport, by_connections in results["throughput"].items():
        connections = max(by_connections, key=int)
        summary = by_connections[connections]
        cpu = {name: summary[name]["relay_cpu_us_per_request"] for name in RELAYS}
        times = None if None in cpu.values() else cpu["proxy"] / max(1e-9, cpu["nginx"])
        rows.append(
            _row(
                f"relay CPU per request, {_TRANSPORT_NAMES[transport]}, {connections} conns (us)",
                ["", _num(cpu["nginx"], ".1f"), _num(cpu["proxy"], ".1f"), _num(times, ".1f", "x")],
                "(shown)",
                None,
                cpu_us_per_request=cpu,
            )
        )
    return rows


# (placement, transport, statistic, whether it is the target): the rest is shown for context.
_LATENCY_ROWS = (
    ("one_core", "http", "p50", True),
    ("one_core", "http", "p99", False),
    ("one_core", "tls", "p50", False),
    ("one_core_blocks", "http", "p50", False),
    ("two_cores", "http", "p50", False),
)
_PLACEMENTS = {
    "one_core": "one core",
    "one_core_blocks": "one core, targets in turn",
    "two_cores": "two cores",
}


def _latency_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for placement, transport, stat, target in _LATENCY_ROWS:
        if placement not in results["latency"]:
            continue  # a results file from before the bench measured it
        latency = results["latency"][placement][transport]
        added = latency["added"]
        proxy_added, nginx_added = added["proxy"][stat], added["nginx"][stat]
        cells = [_num(latency[name].get(f"{stat}_us"), ",.0f") for name in TARGETS]
        cells += [
            _num(proxy_added - nginx_added, "+,.0f", " us"),
            f"{_num(proxy_added, '+,.0f', ' us')} (nginx {_num(nginx_added, '+,.0f')})",
        ]
        rows.append(
            _row(
                f"latency {stat}, 1 conn, {_TRANSPORT_NAMES[transport]}, "
                f"{_PLACEMENTS[placement]} (us)",
                cells,
                f"proxy - direct <= {ADDED_LATENCY_MAX_US:.0f} us" if target else "(shown)",
                proxy_added <= ADDED_LATENCY_MAX_US if target else None,
                added_us={"nginx": nginx_added, "proxy": proxy_added},
            )
        )
    return rows


def _sse_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    sse = results["sse"]
    rows = []
    labels = {"first_byte": "SSE first byte", "lag": "SSE per-event lag"}
    errors = sum(sse[name]["errors"] for name in RELAYS)
    for measure, label in labels.items():
        for stat in ("p50_us", "p99_us"):
            values = {name: sse[name].get(measure, {}).get(stat) for name in TARGETS}
            behind_ms = sse["proxy-nginx"][measure][stat] / 1000
            target = stat == "p50_us"
            direct, proxy = values["direct"], values["proxy"]
            cells = [_num(None if v is None else v / 1000, ".2f") for v in values.values()]
            cells += [
                _num(behind_ms, "+.2f", " ms"),
                "-" if direct is None or proxy is None else f"{(proxy - direct) / 1000:+.2f} ms",
            ]
            rows.append(
                _row(
                    f"{label} {stat[:3]} (ms)",
                    cells,
                    f"proxy - nginx <= {SSE_MAX_BEHIND_NGINX_MS} ms" if target else "(shown)",
                    behind_ms <= SSE_MAX_BEHIND_NGINX_MS and errors == 0 if target else None,
                    us=values,
                    proxy_minus_nginx_ms=behind_ms,
                )
            )
    return rows


def _memory_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    streams = results["streams"]
    if streams:
        per_stream = [s["kb_per_stream"] for s in streams if s["kb_per_stream"] is not None]
        worst = max(per_stream, default=None)
        complete = all(s["first_events"] == s["requested"] for s in streams)
        rows.append(
            _row(
                f"RSS per open SSE stream, {streams[0]['requested']} streams (KB)",
                ["", "", _num(worst, ".1f")],
                f"<= {STREAM_MAX_KB:.0f} KB, all open",
                worst is not None and worst <= STREAM_MAX_KB and complete,
                kb_per_stream=[s["kb_per_stream"] for s in streams],
                all_open=complete,
            )
        )
    upload = results["upload"]
    proxy = upload["proxy"]
    arrived = proxy["status"] == 200 and proxy["received_bytes"] == upload["megabytes"] * 2**20
    rows.append(
        _row(
            f"RSS growth, {upload['megabytes']} MB upload (MB)",
            ["", _num(upload["nginx"]["growth_mb"], ".1f"), _num(proxy["growth_mb"], ".1f")],
            f"< {UPLOAD_MAX_GROWTH_MB:.0f} MB, all bytes arrive",
            proxy["growth_mb"] < UPLOAD_MAX_GROWTH_MB and arrived,
            growth_mb={name: upload[name]["growth_mb"] for name in RELAYS},
            arrived=arrived,
        )
    )
    rows.append(
        _row(
            "RSS at rest, token held (MB)",
            ["", _num(results["nginx_rest_mb"], ".1f"), _num(results["rest_mb"], ".1f")],
            f"<= {REST_MAX_MB:.0f} MB",
            results["rest_mb"] <= REST_MAX_MB,
            rest_mb=results["rest_mb"],
        )
    )
    return rows


def _workers_target(results: Mapping[str, Any]) -> dict[str, Any]:
    workers = results["workers"]
    goal = f">= {WORKERS_MIN_RATIO}x 1 worker"
    if workers.get("status") != "measured":
        reason = workers.get("reason") or workers.get("status", "")
        return _row("PROXY_WORKERS=2 vs 1, unpinned", ["", "", "n/a"], goal, None, reason=reason)
    one, two = workers["1"]["requests_per_second"], workers["2"]["requests_per_second"]
    errors = workers["1"]["errors"] + workers["2"]["errors"]
    return _row(
        f"PROXY_WORKERS=2 vs 1, unpinned, {workers['connections']} conns (req/s)",
        ["", "", f"{one:,.0f} -> {two:,.0f}", "", f"{workers['ratio']:.2f}x (2 vs 1)"],
        goal,
        workers["ratio"] >= WORKERS_MIN_RATIO and errors == 0,
        ratio=workers["ratio"],
    )


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per figure of issue 8: the values, the goal and whether it is met."""
    return [
        *_throughput_targets(results),
        *_latency_targets(results),
        *_sse_targets(results),
        *_memory_targets(results),
        _workers_target(results),
    ]


LOAD_BOUND_PERCENT = 95.0


def _load_bound(results: Mapping[str, Any]) -> list[str]:
    """Runs in which the load core (wrk and the upstream) was full: their figure is a floor."""
    bound = [
        f"{_TRANSPORT_NAMES[transport]} {connections} {name} "
        f"({summary[name]['load_core_busy_percent']:.0f}%)"
        for transport, by_connections in results["throughput"].items()
        for connections, summary in by_connections.items()
        for name in RELAYS
        if summary[name]["load_core_busy_percent"] >= LOAD_BOUND_PERCENT
    ]
    if not bound:
        return []
    return [
        "  note: the load core (wrk + upstream) was full in the runs of "
        + ", ".join(bound)
        + ": those relays' req/s are lower bounds (a nginx one makes proxy/nginx an upper bound)"
    ]


def _warnings(results: Mapping[str, Any]) -> list[str]:
    """What the proxy got wrong while it was measured (not targets, but they void some)."""
    lines = []
    for number, streams in enumerate(results["streams"], start=1):
        if streams["upstream_cancelled_seconds"] is None:
            lines.append(
                f"streams round {number}: {streams['client_closed']} streams closed by their "
                "client were NOT cancelled upstream within 10 s"
            )
    authorization = results["authorization"]
    sizes = {name: authorization[name]["authorization_bytes"] for name in RELAYS}
    if None in sizes.values() or abs(sizes["proxy"] - sizes["nginx"]) > 64:
        lines.append(f"Authorization header sizes differ: {sizes}")
    if results["credentials_at_streams_upstream"]["api_key"]:
        lines.append("a relayed request reached the upstream with the client's api-key")
    return [f"  ! {line}" for line in lines]


def _targets_table(results: Mapping[str, Any]) -> list[str]:
    rows = results["targets"]
    header = ["", "direct", "nginx", "proxy", "proxy vs nginx", "proxy vs direct", "target", "met?"]
    body = [[row["name"], *row["cells"], row["goal"], row["met"]] for row in rows]
    checked = [row for row in rows if row["met"] != "n/a"]
    met = sum(row["met"] == "yes" for row in checked)
    options = results["options"]
    lines = [
        f"Targets of issue 8: {met} of {len(checked)} met. Throughput: median of "
        f"{options['rounds']} interleaved rounds x {options['seconds']} s (ratios: median of "
        "each round's ratio); latency: sequential, 1 keep-alive connection",
        *_table(header, body),
        *_load_bound(results),
        *_warnings(results),
    ]
    workers = results["workers"]
    if workers.get("status") != "measured":
        lines.append(f"  PROXY_WORKERS: {workers.get('reason') or workers.get('status')}")
    return lines


# -- details ------------------------------------------------------------------------------------


def _throughput_details(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for transport, by_connections in results["throughput"].items():
        for connections, summary in by_connections.items():
            for name in ("direct", "nginx", "proxy"):
                s = summary[name]
                rows.append(
                    [
                        f"{_TRANSPORT_NAMES[transport]} {connections} {name}",
                        f"{s['requests_per_second']:,.0f}",
                        f"{s['p50_us'] / 1000:.2f} / {s['p99_us'] / 1000:.2f}",
                        _num(s["relay_cpu_percent"], ".0f", "%"),
                        _num(s["relay_cpu_us_per_request"], ".1f"),
                        f"{s['upstream_cpu_percent']:.0f}%",
                        f"{s['relay_core_busy_percent']:.0f}% / {s['load_core_busy_percent']:.0f}%",
                        f"{s['errors']}",
                        f"{s['max_other_load_percent']:.0f}%",
                    ]
                )
    header = [
        "transport conns target",
        "req/s",
        "p50/p99 ms",
        "relay CPU",
        "CPU us/req",
        "upstream CPU",
        "core busy relay/load",
        "errors",
        "other load",
    ]
    return [
        "Throughput details (medians; CPU as share of one core; errors: wrk socket errors + "
        "non-2xx; other load: worst share of the machine used outside the bench in a run)",
        *_table(header, rows),
    ]


def _latency_details(results: Mapping[str, Any]) -> list[str]:
    rows = []
    failed = []
    for placement in _PLACEMENTS:
        for transport, latency in results["latency"].get(placement, {}).items():
            for name in TARGETS:
                stats = latency[name]
                added = latency["added"].get(name, {})
                rows.append(
                    [
                        f"{_PLACEMENTS[placement]}, {_TRANSPORT_NAMES[transport]} {name}",
                        *(_num(stats.get(f"{s}_us"), ",.0f") for s in ("p50", "p90", "p99")),
                        _num(added.get("p50"), "+,.0f") if added else "",
                        _num(added.get("p99"), "+,.0f") if added else "",
                    ]
                )
                if stats["errors"] or set(stats["statuses"]) != {"200"}:
                    failed.append(
                        f"{placement} {transport} {name}: {stats['errors']} errors, "
                        f"statuses {stats['statuses']}"
                    )
    options = results["options"]
    rounds = results["latency"].get("block_rounds")
    return [
        f"Latency details: {options['latency_count']} sequential requests per target after "
        f"{options['latency_warmup']} warm-up, the six targets alternating request by request; "
        "one core: client, relay and upstream all on the relays' core (what a relay adds is its "
        "own work); one core, targets in turn: the same, HTTP, each target's requests in a block "
        f"of their own, {rounds} rounds, medians (caches as warm as a relay's own traffic leaves "
        "them); two cores: client and upstream on the load core, as in the throughput runs; "
        "HTTPS direct: the client itself speaks TLS",
        *_table(
            ["client, transport, target", "p50 us", "p90 us", "p99 us", "added p50", "added p99"],
            rows,
        ),
        *(f"  ! {line}" for line in failed),
    ]


def _sse_details(results: Mapping[str, Any]) -> list[str]:
    sse = results["sse"]
    options = results["options"]
    rows = []
    for name in ("direct", "nginx", "proxy"):
        s = sse[name]
        rows.append(
            [
                name,
                *(
                    _num(s.get(measure, {}).get(stat), ",.0f")
                    for measure in ("first_byte", "lag")
                    for stat in ("p50_us", "p99_us")
                ),
                f"{s['streams']} / {s['events']}",
                f"{s['errors']}",
            ]
        )
    lines = [
        f"SSE details: {options['sse_streams']} streams per target of {options['sse_events']} "
        f"events {options['sse_interval_ms']:g} ms apart, targets taking turns; lag = arrival "
        "minus the upstream's write time (same monotonic clock)",
        *_table(
            ["", "first byte p50 us", "p99 us", "lag p50 us", "p99 us", "streams/events", "errors"],
            rows,
        ),
    ]
    for name in ("direct", "nginx", "proxy"):
        for example in sse[name].get("error_examples", []):
            lines.append(f"  ! {name}: {example}")
    return lines


def _memory_details(results: Mapping[str, Any]) -> list[str]:
    peaks = [
        summary["proxy"]["relay_peak_rss_mb"]
        for by_connections in results["throughput"].values()
        for summary in by_connections.values()
        if summary["proxy"]["relay_peak_rss_mb"] is not None
    ]
    rows = [
        ["proxy at rest, token held (after start-up)", f"{results['rest_mb']:.1f}", ""],
        ["proxy peak during the wrk runs", _num(max(peaks, default=None), ".1f"), ""],
        ["nginx relay at rest (master + worker)", f"{results['nginx_rest_mb']:.1f}", ""],
    ]
    if "rest_anonymous_mb" in results:  # absent from results files of earlier benches
        rows[1:1] = [
            [
                "  of which anonymous (RSS less the mapped files' pages)",
                f"{results['rest_anonymous_mb']:.1f}",
                "",
            ]
        ]
        rows.append(["  of which anonymous", f"{results['nginx_rest_anonymous_mb']:.1f}", ""])
    upload = results["upload"]
    for name in ("nginx", "proxy"):
        u = upload[name]
        rows.append(
            [
                f"{name}: {upload['megabytes']} MB upload, rest -> peak -> after",
                f"{u['rest_mb']:.1f} -> {u['peak_mb']:.1f} -> {u['after_mb']:.1f}",
                f"{u['mb_per_second']:.0f} MB/s, status {u['status']}, "
                f"{u['received_bytes']} bytes arrived",
            ]
        )
    for number, streams in enumerate(results["streams"], start=1):
        rows += [
            [f"round {number}: at rest before the streams", f"{streams['rest_before_mb']:.1f}", ""],
            [
                f"round {number}: {streams['first_events']} SSE streams open",
                f"{streams['open_mb']:.1f}",
                _num(streams["kb_per_stream"], "+.1f", " KB per stream"),
            ],
            [f"round {number}: after the streams ended", f"{streams['after_mb']:.1f}", ""],
        ]
    return [
        "Memory: RSS, MB (KB per stream = open minus rest before, over the streams open; the "
        "upload is sampled every 20 ms)",
        *_table(["", "MB", ""], rows),
        *(
            f"  {'round ' + str(n) + ':' if i == 0 else ''}".ljust(12) + line
            for n, streams in enumerate(results["streams"], start=1)
            for i, line in enumerate(_streams_outcome(streams))
        ),
    ]


def _workers_details(results: Mapping[str, Any]) -> list[str]:
    workers = results["workers"]
    if workers.get("status") != "measured":
        return [f"PROXY_WORKERS: {workers.get('status')}: {workers.get('reason', '')}"]
    parts = [
        f"{n} worker(s) {workers[n]['requests_per_second']:,.0f} req/s "
        f"(CPU {_num(workers[n]['relay_cpu_percent'], '.0f', '%')}, errors {workers[n]['errors']})"
        for n in ("1", "2")
    ]
    return [
        f"PROXY_WORKERS at {workers['connections']} conns, proxies unpinned: "
        + "; ".join(parts)
        + f"; ratio {workers['ratio']:.2f}x"
    ]


def _credentials(results: Mapping[str, Any]) -> list[str]:
    authorization = results["authorization"]
    seen = results["credentials_at_streams_upstream"]
    return [
        f"Authorization header sent upstream: proxy {authorization['proxy']['authorization_bytes']}"
        f" bytes, nginx {authorization['nginx']['authorization_bytes']} bytes (token "
        f"{results['setup']['nginx_token_bytes']} bytes, minted by the same Entra stand-in); "
        f"the streams upstream saw api-key {seen['api_key']} time(s); access lines written: "
        + ", ".join(f"{name} {n:,}" for name, n in results["access_lines"].items())
    ]


def _noise(results: Mapping[str, Any]) -> str:
    noise = results["noise"]
    latency = results["latency"]["noise"]  # both placements
    worst = max(
        summary[name]["max_other_load_percent"]
        for by_connections in results["throughput"].values()
        for summary in by_connections.values()
        for name in ("direct", "nginx", "proxy")
    )
    return (
        f"machine noise: other processes used {noise['other_processes_percent']:.0f}% of the "
        f"machine over the whole bench (latency phase {latency['other_processes_percent']:.0f}%, "
        f"worst wrk run kept {worst:.0f}%), hypervisor steal {noise['steal_percent']:.1f}%; "
        f"{results.get('retried_runs', 0)} wrk run(s) run again for noise above 20%"
    )


def _nginx_logs(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, errors in results.get("nginx_error_logs", {}).items():
        levels = ", ".join(f"{n} [{level}]" for level, n in errors["levels"].items())
        lines.append(f"{name} error log: {levels or 'empty'}")
        lines += [f"  {example[:160]}" for example in errors["examples"]]
    return lines


def _proxy_build(build: Mapping[str, Any] | None) -> str:
    if build is None:  # a results file from before the bench recorded it
        return "  proxy build: not recorded"
    compiled = "compiled by mypyc" if build["compiled"] else "PURE PYTHON (not what ships)"
    return (
        f"  proxy build: Python {build['python']} ({build['executable']}), package in "
        f"{build['package']}, {compiled}"
    )


def format_report(results: Mapping[str, Any]) -> str:
    setup, machine = results["setup"], results["machine"]
    ready = ", ".join(f"{k} {v:.1f} s" for k, v in results["proxy_ready_seconds"].items())
    lines = [
        f"aoai-auth-proxy bench, {results['timestamp']}: {machine['cpus']} CPUs, "
        f"Python {machine['python']}, aiohttp {machine['aiohttp']}, nginx {machine['nginx']}",
        f"  load: {setup['load_generator']}",
        f"  {setup['pinning']}",
        f"  upstream: {setup['upstream']}",
        f"  nginx relay: {setup['nginx_relay']}",
        f"  proxy: python -m aoai_auth_proxy, PROXY_LOG_LEVEL={setup['proxy_log_level']}, one "
        f"process per upstream; ready after {ready}; {results['token_requests']} token "
        "request(s) to the Entra stand-in",
        _proxy_build(setup.get("proxy_build")),
        "",
        *_targets_table(results),
        "",
        *_throughput_details(results),
        "",
        *_latency_details(results),
        "",
        *_sse_details(results),
        "",
        *_memory_details(results),
        "",
        *_workers_details(results),
        *_credentials(results),
        _noise(results),
        *_nginx_logs(results),
        *_log_lines(results),
        f"bench took {results['duration_seconds']:.0f} s",
    ]
    return "\n".join(lines)
