"""A minimal, fast plain-HTTP Azure OpenAI stand-in for benchmarks: it never checks the token.

    python bench/upstream.py [--port 0]

Prints `listening on PORT` once ready. Routes:
- `POST /openai/deployments/{d}/chat/completions` -> 200 with a fixed ~600-byte chat completion;
  with `"stream": true` in the body, one SSE event, then the stream stays open until released.
- `POST /bench/release` ends every open stream (`data: [DONE]`) and answers how many it ended.
- `GET /bench/stats` -> `{"open": N, "opened": N, "completed": N}` streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field

from aiohttp import web

COMPLETION_PATH = "/openai/deployments/{deployment}/chat/completions"
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


@dataclass
class Streams:
    """Open SSE streams and the event that releases them (replaced after each release)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    open: int = 0
    opened: int = 0
    completed: int = 0


STREAMS = web.AppKey("streams", Streams)


def _wants_stream(body: bytes) -> bool:
    # Cheap test first: the throughput path must not pay for a JSON parse.
    if b'"stream"' not in body:
        return False
    try:
        return json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        return False


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if not _wants_stream(body):
        return web.Response(body=COMPLETION_BODY, content_type="application/json")
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


async def release_streams(request: web.Request) -> web.Response:
    streams = request.app[STREAMS]
    held = streams.open
    streams.release.set()
    streams.release = asyncio.Event()
    return web.json_response({"released": held})


async def stats(request: web.Request) -> web.Response:
    streams = request.app[STREAMS]
    return web.json_response(
        {"open": streams.open, "opened": streams.opened, "completed": streams.completed}
    )


def create_app() -> web.Application:
    app = web.Application()
    app[STREAMS] = Streams()
    app.router.add_post(COMPLETION_PATH, chat_completions)
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
