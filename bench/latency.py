"""Sequential keep-alive latency client: one connection per URL, requests alternate between URLs.

    python bench/latency.py --count 2000 --warmup 200 [--ca CA.pem] http://127.0.0.1:A https://...

Prints one JSON object: for each URL, count, errors, statuses and p50/p90/p99/mean/max in us.
Alternating request by request means every target sees the same machine noise. An https URL is
verified against `--ca` (the bench's test CA).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import ssl
import time
from collections import Counter
from urllib.parse import urlsplit

from workload import CHAT_BODY, CHAT_PATH, HEADERS


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class Target:
    """One keep-alive connection to one base URL, and what it measured."""

    def __init__(self, base_url: str, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        host = parts.hostname or "127.0.0.1"
        self._connection = (
            http.client.HTTPSConnection(host, parts.port, context=context)
            if parts.scheme == "https"
            else http.client.HTTPConnection(host, parts.port)
        )
        self._headers = dict(HEADERS)
        self.samples_us: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0

    def request(self, *, record: bool) -> None:
        started = time.perf_counter_ns()
        try:
            self._connection.request("POST", CHAT_PATH, body=CHAT_BODY, headers=self._headers)
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.errors += 1
            self._connection.close()  # http.client reconnects on the next request
            return
        elapsed_us = (time.perf_counter_ns() - started) / 1000
        if record:
            self.statuses[response.status] += 1
            if response.status == 200:
                self.samples_us.append(elapsed_us)

    def summary(self) -> dict[str, object]:
        values = sorted(self.samples_us)
        stats: dict[str, object] = {
            "url": self.base_url,
            "count": len(values),
            "errors": self.errors,
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
        }
        if values:
            stats |= {
                "p50_us": percentile(values, 0.50),
                "p90_us": percentile(values, 0.90),
                "p99_us": percentile(values, 0.99),
                "mean_us": sum(values) / len(values),
                "max_us": values[-1],
            }
        return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="measured requests per URL")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per URL")
    parser.add_argument("--ca", help="CA file that https URLs are verified against")
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca) if args.ca else None
    targets = [Target(url, context) for url in args.urls]
    for index in range(args.warmup + args.count):
        for target in targets:
            target.request(record=index >= args.warmup)
    print(json.dumps([target.summary() for target in targets]))


if __name__ == "__main__":
    main()
