"""A plain-HTTP Azure OpenAI stand-in for the bench's streams and uploads: it never checks the
token, it only counts what credentials arrived (the throughput upstream is nginx, bench/nginx.py).

    python bench/upstream.py [--port 0]

Prints `listening on PORT` once ready. Routes:
- `POST /openai/deployments/{d}/chat/completions` -> 200 with a fixed ~600-byte chat completion;
  with `"stream": true` in the body, one SSE event, then the stream stays open until released;
  with `"bench_events": N, "bench_interval_ms": I` too, N events I ms apart, each carrying
  `"t": <CLOCK_MONOTONIC ns when written>`, then `[DONE]` (the bench's timed SSE streams).
- `POST /openai/files` reads the body to its end, keeps none of it, answers `{"bytes": N}`.
- `POST /bench/release` ends every open stream (`data: [DONE]`) and answers how many it ended.
- `GET /bench/stats` -> `{"open": N, "opened": N, "completed": N}` streams, and the credentials
  seen: `authorization_bytes` (length of each `Authorization` value seen -> count), `api_key`
  (requests that carried a token and still the client's `api-key`: a relay that did not strip it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

COMPLETION_PATH = "/openai/deployments/{deployment}/chat/completions"
UPLOAD_PATH = "/openai/files"
# An open stream ends by itself after this many seconds even if never released.
MAX_HOLD_SECONDS = 180.0
_LISTEN_BACKLOG = 2048


def _completion(content: str) -> bytes:
    """A realistic non-streamed chat completion carrying `content`."""
    safe = {"filtered": False, "severity": "safe"}
    completion = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1732800000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "refusal": None, "content": content},
                "content_filter_results": {
                    "hate": safe,
                    "self_harm": safe,
                    "sexual": safe,
                    "violence": safe,
                },
            }
        ],
        "usage": {"prompt_tokens": 19, "completion_tokens": 12, "total_tokens": 31},
    }
    return json.dumps(completion, separators=(",", ":")).encode()


def _completion_body(size: int = 600) -> bytes:
    """A chat completion padded to `size` bytes, as a short real answer would be."""
    text = "The quick brown fox jumps over the lazy dog. " * (size // 40 + 1)
    return _completion(text[: max(0, size - len(_completion("")))])


COMPLETION_BODY = _completion_body()
FIRST_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732800000,'
    b'"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},'
    b'"finish_reason":null}]}\n\n'
)
LAST_EVENTS = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732800000,'
    b'"model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
# A timed event: a real chunk's shape, with its write time in `t` (time.monotonic_ns()).
TIMED_EVENT = (
    'data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732800000,'
    '"model":"gpt-4o","choices":[{{"index":0,"delta":{{"content":" token"}},'
    '"finish_reason":null}}],"t":{t}}}\n\n'
)
MAX_TIMED_EVENTS = 10_000


@dataclass
class Streams:
    """Open SSE streams and the event that releases them (replaced after each release)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    open: int = 0
    opened: int = 0
    completed: int = 0
    authorization_bytes: Counter[int] = field(default_factory=Counter)
    api_key: int = 0


STREAMS = web.AppKey("streams", Streams)


def _stream_request(body: bytes) -> dict[str, Any] | None:
    """The request's JSON if it asks for a stream, else None."""
    if b'"stream"' not in body:  # cheap test first: most requests need no JSON parse
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return request if isinstance(request, dict) and request.get("stream") is True else None


def _count_credentials(request: web.Request) -> None:
    streams = request.app[STREAMS]
    authorization = request.headers.getall("Authorization", [])
    for value in authorization:
        streams.authorization_bytes[len(value)] += 1
    if (
        authorization and "api-key" in request.headers
    ):  # relayed, yet the client's key is still there
        streams.api_key += 1


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _count_credentials(request)
    body = await request.read()
    stream = _stream_request(body)
    if stream is None:
        return web.Response(body=COMPLETION_BODY, content_type="application/json")
    if "bench_events" in stream:
        events = min(MAX_TIMED_EVENTS, max(1, int(stream["bench_events"])))
        return await _timed_stream(request, events, float(stream["bench_interval_ms"]) / 1000)
    streams = request.app[STREAMS]
    release = streams.release
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    streams.open += 1
    streams.opened += 1
    try:
        await response.prepare(request)
        await response.write(FIRST_EVENT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), MAX_HOLD_SECONDS)
        await response.write(LAST_EVENTS)
        await response.write_eof()
        streams.completed += 1
    finally:
        streams.open -= 1
    return response


async def _timed_stream(request: web.Request, events: int, interval: float) -> web.StreamResponse:
    """`events` chunks `interval` s apart, each stamped with the monotonic time it was written."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for index in range(events):
        if index:
            await asyncio.sleep(interval)
        await response.write(TIMED_EVENT.format(t=time.monotonic_ns()).encode())
    await response.write(LAST_EVENTS)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """Read an upload to its end, chunk by chunk, keeping none of it."""
    _count_credentials(request)
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"bytes": received})


async def release_streams(request: web.Request) -> web.Response:
    streams = request.app[STREAMS]
    held = streams.open
    streams.release.set()
    streams.release = asyncio.Event()
    return web.json_response({"released": held})


async def stats(request: web.Request) -> web.Response:
    streams = request.app[STREAMS]
    return web.json_response(
        {
            "open": streams.open,
            "opened": streams.opened,
            "completed": streams.completed,
            "authorization_bytes": {
                str(k): v for k, v in sorted(streams.authorization_bytes.items())
            },
            "api_key": streams.api_key,
        }
    )


def create_app() -> web.Application:
    app = web.Application()
    app[STREAMS] = Streams()
    app.router.add_post(COMPLETION_PATH, chat_completions)
    app.router.add_post(UPLOAD_PATH, upload)
    app.router.add_post("/bench/release", release_streams)
    app.router.add_get("/bench/stats", stats)
    return app


async def serve(port: int) -> None:
    # handler_cancellation: a stream whose client (the proxy) hangs up ends here at once, so
    # `open` in /bench/stats shows whether the proxy really cancels its upstream requests.
    runner = web.AppRunner(
        create_app(), access_log=None, handle_signals=True, handler_cancellation=True
    )
    await runner.setup()
    try:
        sock = socket.create_server(("127.0.0.1", port), backlog=_LISTEN_BACKLOG)
        site = web.SockSite(runner, sock, backlog=_LISTEN_BACKLOG)
        await site.start()
        print(f"listening on {sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()  # until SIGTERM/SIGINT (GracefulExit) ends the process
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
