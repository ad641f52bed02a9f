"""A local Azure OpenAI resource with key authentication disabled: only Entra bearer tokens pass."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import struct
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ._server import LocalServer, StandIn, certificate_hosts
from .entra import EntraStandIn, InvalidAccessToken
from .pki import CertificateAuthority
from .realtime import RealtimeEndpoint, RealtimeSession, offers_key_credential

DEFAULT_AUDIENCE = "https://cognitiveservices.azure.com"
REGION = "Sweden Central"
SYSTEM_FINGERPRINT = "fp_standin01"
# Azure's own answers, byte for byte where clients or users match on them.
KEY_AUTH_DISABLED = {
    "error": {
        "code": "AuthenticationTypeDisabled",
        "message": "Key based authentication is disabled for this resource.",
    }
}
MISSING_CREDENTIALS = {
    "error": {
        "code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. Make "
        "sure to provide a valid key for an active subscription and use a correct regional API "
        "endpoint for your resource.",
    }
}
RESOURCE_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
# Tests read why a token was refused from this response header; Azure itself never says.
AUTH_ERROR_HEADER = "x-stand-in-auth-error"
_SAFE = {"filtered": False, "severity": "safe"}
_CONTENT_FILTER_RESULTS = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
_PROMPT_FILTER_RESULTS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **_CONTENT_FILTER_RESULTS,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the resource received it, before any interpretation."""

    method: str
    raw_path: str  # path and query exactly as sent
    headers: list[tuple[str, str]]  # in received order and letter case, repeats kept
    body_length: int
    # None when a scripted handler consumed `request.content` itself (the stand-in did not see
    # every byte); otherwise the SHA-256 hex of the body exactly as received (never decoded).
    body_sha256: str | None
    client_id: str | None = None  # `appid` of a valid bearer token

    def header_values(self, name: str) -> list[str]:
        """Every value sent under `name`, compared case-insensitively."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None


@dataclass
class _Recorder:
    """Builds a request's `RecordedRequest` once its body has been read."""

    request: web.Request
    sink: list[RecordedRequest]
    client_id: str | None = None
    done: bool = field(default=False, init=False)

    async def record(self) -> None:
        if self.done:
            return
        try:
            # aiohttp caches a body read with `request.read()`; otherwise this drains the rest.
            body = await self.request.read()
        except asyncio.CancelledError:
            self.record_unread()
            raise
        self._append(body)

    def record_unread(self) -> None:
        """Record without reading on: the client went away and the handler is cancelled."""
        if not self.done:
            self._append(None)

    def _append(self, body: bytes | None) -> None:
        self.done = True
        received = self.request.content.total_bytes
        if body is None:
            # Bytes consumed by a cancelled handler are gone; only an empty body is known.
            complete = received == 0 and not self.request.body_exists
            body = b""
        else:
            complete = len(body) >= received
        self.sink.append(
            RecordedRequest(
                method=self.request.method,
                raw_path=self.request.raw_path,
                headers=[
                    (
                        name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"),
                    )
                    for name, value in self.request.raw_headers
                ],
                body_length=max(received, len(body)),
                body_sha256=hashlib.sha256(body).hexdigest() if complete else None,
                client_id=self.client_id,
            )
        )


_RECORDER = web.RequestKey("aoai_stand_in_recorder", _Recorder)


class AzureOpenAIStandIn(StandIn):
    """Serves chat completions (streamed or not) and embeddings for any deployment name, and
    Realtime API WebSocket sessions (`aoai_auth_proxy.testing.realtime`).

    Every request is recorded in `requests`, then must carry no `api-key` (403
    `AuthenticationTypeDisabled`) and a bearer token `entra` signed for `audience` (401).
    Realtime sessions are recorded in `realtime_sessions` too.
    Knobs: `stream_delay` (seconds between SSE events, and between the deltas of realtime
    sessions opened after it is set), `embedding_dimensions`, `revoked_token_ids`,
    `add_route()`.
    """

    def __init__(
        self,
        entra: EntraStandIn,
        ca: CertificateAuthority,
        *,
        audience: str = DEFAULT_AUDIENCE,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        allowed_clients: Collection[str] | None = None,
    ) -> None:
        self.requests: list[RecordedRequest] = []
        # `jti`s of tokens to refuse with 401 although valid (revoked, or a role removed):
        # what makes a proxy renew its token before expiry.
        self.revoked_token_ids: set[str] = set()
        self.stream_delay = 0.0
        self.embedding_dimensions = 8
        self._entra = entra
        self._audience = audience
        self._allowed_clients = None if allowed_clients is None else frozenset(allowed_clients)
        self._realtime = RealtimeEndpoint()
        self._app = web.Application(middlewares=[self._middleware])
        ssl_context = (
            ca.issue_server_certificate(certificate_hosts(host)).ssl_context() if tls else None
        )
        self._server = LocalServer(
            self._app,
            host=host,
            port=port,
            ssl_context=ssl_context,
            # Record and hash request bodies exactly as they were sent.
            auto_decompress=False,
            # A client (or proxy) that goes away cancels the handler, as it stops generation on
            # Azure; tests observe that as CancelledError in their scripted handlers.
            handler_cancellation=True,
        )

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Add a scripted endpoint (before `start()`); it takes precedence over the built-in
        ones and passes through the same authentication and recording."""
        self._app.router.add_route(method, path, handler)

    async def start(self) -> None:
        # Built-in routes go last so scripted routes added earlier win on the same path.
        router = self._app.router
        router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        router.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)
        router.add_post("/openai/v1/chat/completions", self._chat)
        router.add_post("/openai/v1/embeddings", self._embeddings)
        router.add_get("/openai/realtime", self._realtime_session)
        router.add_get("/openai/v1/realtime", self._realtime_session)
        await super().start()

    async def close(self) -> None:
        # Open realtime sessions end with 1001 (going away) first: once aiohttp's shutdown has
        # begun it no longer reads, so it would miss the clients' answering close frames.
        await self._realtime.close_sessions()
        await super().close()

    @property
    def realtime_sessions(self) -> list[RealtimeSession]:
        """Every realtime WebSocket session, in the order they were upgraded."""
        return self._realtime.sessions

    @property
    def base_url(self) -> str:
        """`https://127.0.0.1:PORT`: the resource endpoint (`azure_endpoint`, `API_BASE_URL`)."""
        return self._server.origin

    # -- authentication and recording ------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        recorder = _Recorder(request, self.requests)
        request[_RECORDER] = recorder
        try:
            response = await self._authenticated(request, handler, recorder)
        except web.HTTPNotFound:
            response = web.json_response(RESOURCE_NOT_FOUND, status=404)
        finally:
            if _being_cancelled():
                recorder.record_unread()
            else:
                await recorder.record()
        if not response.prepared and "apim-request-id" not in response.headers:
            # Azure tags every answer, errors included, with its request ids and region.
            response.headers.update(_request_id_headers())
        return response

    async def _authenticated(
        self, request: web.Request, handler: Handler, recorder: _Recorder
    ) -> web.StreamResponse:
        # CIMultiDict lookups ignore letter case, as HTTP field names do (RFC 9110 5.1).
        if "api-key" in request.headers:
            return web.json_response(KEY_AUTH_DISABLED, status=403)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return web.json_response(
                MISSING_CREDENTIALS, status=401, headers={AUTH_ERROR_HEADER: "no bearer token"}
            )
        try:
            claims = self._entra.verify_access_token(token.strip(), audience=self._audience)
        except InvalidAccessToken as exc:
            message = (
                "Unauthorized. Access token is missing, invalid, audience is incorrect "
                f"({self._audience}), or have expired."
            )
            return web.json_response(
                {"error": {"code": "401", "message": message}},
                status=401,
                headers={AUTH_ERROR_HEADER: str(exc)},
            )
        client_id = str(claims["appid"])
        if claims.get("jti") in self.revoked_token_ids:
            return web.json_response(
                {"error": {"code": "401", "message": "Unauthorized. Access token was revoked."}},
                status=401,
                headers={AUTH_ERROR_HEADER: "token revoked"},
            )
        if self._allowed_clients is not None and client_id not in self._allowed_clients:
            message = "Principal does not have access to API/Operation."
            return web.json_response(
                {"error": {"code": "PermissionDenied", "message": message}},
                status=401,
                headers={AUTH_ERROR_HEADER: f"client {client_id} is not allowed"},
            )
        recorder.client_id = client_id
        return await handler(request)

    # -- chat completions ------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await self._read_json(request)
        if isinstance(payload, web.Response):
            return payload
        model = self._model(request, payload)
        if isinstance(model, web.Response):
            return model
        reply = "Echo: " + _last_user_message(payload.get("messages"))
        completion_id = "chatcmpl-" + secrets.token_urlsafe(22)[:29]
        created = int(time.time())
        usage = _chat_usage(payload.get("messages"), reply)
        headers = _response_headers(request)
        if payload.get("stream") is True:
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            common = {
                "id": completion_id,
                "created": created,
                "model": model,
                "object": "chat.completion.chunk",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
            events = _stream_events(common, reply, usage if include_usage else None)
            return await self._stream(request, headers, events)
        body = {
            "choices": [
                {
                    "content_filter_results": _CONTENT_FILTER_RESULTS,
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                    "message": {
                        "annotations": [],
                        "content": reply,
                        "refusal": None,
                        "role": "assistant",
                    },
                }
            ],
            "created": created,
            "id": completion_id,
            "model": model,
            "object": "chat.completion",
            "prompt_filter_results": _PROMPT_FILTER_RESULTS,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage,
        }
        return web.json_response(body, headers=headers)

    async def _stream(
        self, request: web.Request, headers: dict[str, str], events: Iterator[dict[str, Any]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        first = True
        for event in events:
            if not first and self.stream_delay > 0:
                await asyncio.sleep(self.stream_delay)
            first = False
            # One write per event, so a client (or proxy) that buffers is caught by the delay.
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        if self.stream_delay > 0:
            await asyncio.sleep(self.stream_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- realtime --------------------------------------------------------------------------

    async def _realtime_session(self, request: web.Request) -> web.StreamResponse:
        recorder = request[_RECORDER]
        # A session lasts as long as the client keeps it open: record the upgrade request now.
        await recorder.record()
        if offers_key_credential(request):
            return web.json_response(KEY_AUTH_DISABLED, status=403)
        return await self._realtime.serve(
            request,
            client_id=recorder.client_id,
            headers=_request_id_headers(),
            delay=self.stream_delay,
        )

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        payload = await self._read_json(request)
        if isinstance(payload, web.Response):
            return payload
        model = self._model(request, payload)
        if isinstance(model, web.Response):
            return model
        texts = _embedding_inputs(payload.get("input"))
        if not texts:
            return _invalid_request("'input' must be a non-empty string or array", "input")
        dimensions = payload.get("dimensions")
        if not isinstance(dimensions, int) or dimensions < 1:
            dimensions = self.embedding_dimensions
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(f"{model}\x00{text}", dimensions)
            embedding: list[float] | str = vector
            if as_base64:
                # What the openai SDK asks for by default and decodes: little-endian float32.
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(text.split()) for text in texts)
        body = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.json_response(body, headers=_response_headers(request))

    # -- shared request handling -----------------------------------------------------------

    async def _read_json(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await request.read()
        # Record now, before a streamed answer starts, so tests see the request at once.
        await request[_RECORDER].record()
        try:
            payload = json.loads(body)
        except ValueError as exc:
            return _invalid_request(f"The request body is not valid JSON: {exc}", None)
        if not isinstance(payload, dict):
            return _invalid_request("The request body must be a JSON object.", None)
        return payload

    @staticmethod
    def _model(request: web.Request, payload: dict[str, Any]) -> str | web.Response:
        deployment = request.match_info.get("deployment")
        if deployment is not None:
            # Deployment routes need an api-version; Azure answers a bare 404 without one.
            if not request.query.get("api-version"):
                return web.json_response(RESOURCE_NOT_FOUND, status=404)
            return deployment
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return _invalid_request("you must provide a model parameter", "model")
        return model


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _invalid_request(message: str, param: str | None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return web.json_response({"error": error}, status=400)


def _request_id_headers() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return {"apim-request-id": request_id, "x-request-id": request_id, "x-ms-region": REGION}


def _response_headers(request: web.Request) -> dict[str, str]:
    """What Azure sends with a completion: request ids, region, rate-limit budget, model."""
    headers = {
        **_request_id_headers(),
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-remaining-tokens": "99000",
        "azureml-model-session": "d001-20250101000000",
    }
    client_request_id = request.headers.get("x-ms-client-request-id")
    if client_request_id is not None:
        headers["x-ms-client-request-id"] = client_request_id
    return headers


def _text_of(content: object) -> str:
    """Message content is a string or a list of parts; only text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _last_user_message(messages: object) -> str:
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
    return ""


def _chat_usage(messages: object, reply: str) -> dict[str, Any]:
    # Words stand in for tokens: deterministic and good enough for assertions.
    prompt = sum(
        len(_text_of(m.get("content")).split())
        for m in (messages if isinstance(messages, list) else [])
        if isinstance(m, dict)
    )
    completion = len(reply.split())
    return {
        "completion_tokens": completion,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "reasoning_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _stream_events(
    common: dict[str, Any], reply: str, usage: dict[str, Any] | None
) -> Iterator[dict[str, Any]]:
    """Azure's chunk sequence: prompt filter results first, then the content word by word."""
    yield {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": _PROMPT_FILTER_RESULTS,
    }
    for number, word in enumerate(re.findall(r"\s*\S+", reply)):
        delta: dict[str, Any] = {"content": word}
        if number == 0:
            delta.update(role="assistant", refusal=None)
        choice = {
            "content_filter_results": _CONTENT_FILTER_RESULTS,
            "delta": delta,
            "finish_reason": None,
            "index": 0,
            "logprobs": None,
        }
        yield {**common, "choices": [choice]}
    final = {
        "content_filter_results": {},
        "delta": {},
        "finish_reason": "stop",
        "index": 0,
        "logprobs": None,
    }
    yield {**common, "choices": [final]}
    if usage is not None:
        yield {**common, "choices": [], "usage": usage}


def _embedding_inputs(value: object) -> list[str]:
    """`input` is a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list) or not value:
        return []
    if all(isinstance(item, int) for item in value):
        return [" ".join(map(str, value))]
    texts = []
    for item in value:
        if isinstance(item, str) and item:
            texts.append(item)
        elif isinstance(item, list) and item and all(isinstance(i, int) for i in item):
            texts.append(" ".join(map(str, item)))
        else:
            return []
    return texts


def _embedding(seed: str, dimensions: int) -> list[float]:
    """A unit vector derived from `seed`, exact in float32 so JSON and base64 forms agree."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(f"{counter}\x00{seed}".encode()).digest()
        counter += 1
    values = [
        (n / 0xFFFFFFFF) * 2 - 1 for n in struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])
    ]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    unit = [v / norm for v in values]
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *unit)))
