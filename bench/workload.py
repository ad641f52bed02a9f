"""The requests every benchmark phase sends: one chat completion, streamed or not."""

from __future__ import annotations

import json

DEPLOYMENT = "gpt-4o"
API_VERSION = "2024-10-21"
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"


def _chat_request(*, stream: bool, extra: dict[str, object] | None = None) -> bytes:
    request: dict[str, object] = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark."},
        ],
        "max_tokens": 32,
    }
    if stream:
        request["stream"] = True
    request |= extra or {}
    return json.dumps(request, separators=(",", ":")).encode()


CHAT_BODY = _chat_request(stream=False)
STREAM_BODY = _chat_request(stream=True)
# What the openai SDK sends to an Azure endpoint; the proxy strips `api-key` and adds a token.
HEADERS = (("Content-Type", "application/json"), ("api-key", "bench-dummy-key"))
STREAM_END = b"data: [DONE]\n\n"
UPLOAD_PATH = f"/openai/files?api-version={API_VERSION}"


def timed_stream_body(events: int, interval_ms: float) -> bytes:
    """A streamed chat completion whose answer is `events` chunks `interval_ms` apart, each
    stamped by bench/upstream.py with the monotonic time it was written."""
    return _chat_request(
        stream=True, extra={"bench_events": events, "bench_interval_ms": interval_ms}
    )
