"""Timed SSE client: first-byte latency and per-event lag of streamed chat completions.

    python bench/sse.py --streams 20 --events 20 --interval-ms 5 http://127.0.0.1:A http://...

One keep-alive connection per URL; stream after stream, the URLs take turns (the order rotates
each round, so none always goes first). bench/upstream.py stamps every event with the
CLOCK_MONOTONIC time it wrote it, which is the same clock in every process of the machine: an
event's lag is its arrival time here minus that stamp. The first byte is timed from just before
the request is sent to the arrival of the first event. Prints one JSON list, one object per URL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import time
from urllib.parse import urlsplit

from latency import percentile
from workload import CHAT_PATH, HEADERS, STREAM_END, timed_stream_body

_STAMP = re.compile(rb'"t":(\d+)')
# Bounds one stream's wait for its next bytes, so a stuck relay cannot hang the bench.
SOCKET_TIMEOUT_SECONDS = 10.0


def _summary(values_us: list[float]) -> dict[str, float]:
    if not values_us:
        return {}
    values = sorted(values_us)
    return {
        "p50_us": percentile(values, 0.50),
        "p90_us": percentile(values, 0.90),
        "p99_us": percentile(values, 0.99),
        "max_us": values[-1],
        "mean_us": sum(values) / len(values),
    }


class Target:
    def __init__(self, base_url: str, body: bytes) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self._body = body
        self._connection = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=SOCKET_TIMEOUT_SECONDS
        )
        self._headers = dict(HEADERS)
        self.first_byte_us: list[float] = []
        self.lag_us: list[float] = []
        self.events = 0
        self.errors: list[str] = []
        self.statuses: dict[str, int] = {}

    def stream(self, *, record: bool) -> None:
        started = time.monotonic_ns()
        try:
            self._connection.request("POST", CHAT_PATH, body=self._body, headers=self._headers)
            response = self._connection.getresponse()
            self.statuses[str(response.status)] = self.statuses.get(str(response.status), 0) + 1
            if response.status != 200:
                response.read()
                return
            self._read_events(response, started, record=record)
        except (OSError, http.client.HTTPException) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            self._connection.close()  # http.client reconnects on the next request

    def _read_events(
        self, response: http.client.HTTPResponse, started: int, *, record: bool
    ) -> None:
        pending = b""
        first = True
        while True:
            data = response.read1(65536)
            now = time.monotonic_ns()
            if not data:
                raise http.client.IncompleteRead(pending)
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event + b"\n\n" == STREAM_END:
                    response.read()  # the end of the chunked body, so the connection is reused
                    return
                stamp = _STAMP.search(event)
                if stamp is None:
                    continue
                if record:
                    self.events += 1
                    if first:
                        self.first_byte_us.append((now - started) / 1000)
                    else:
                        self.lag_us.append((now - int(stamp.group(1))) / 1000)
                first = False

    def summary(self) -> dict[str, object]:
        return {
            "url": self.base_url,
            "streams": len(self.first_byte_us),
            "events": self.events,
            "statuses": self.statuses,
            "errors": len(self.errors),
            "error_examples": self.errors[:3],
            "first_byte": _summary(self.first_byte_us),
            "lag": _summary(self.lag_us),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=20, help="measured streams per URL")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured streams per URL")
    parser.add_argument("--events", type=int, default=20, help="events per stream")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="between events")
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    body = timed_stream_body(args.events, args.interval_ms)
    targets = [Target(url, body) for url in args.urls]
    for index in range(args.warmup + args.streams):
        shift = index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            target.stream(record=index >= args.warmup)
    print(json.dumps([target.summary() for target in targets]))


if __name__ == "__main__":
    main()
