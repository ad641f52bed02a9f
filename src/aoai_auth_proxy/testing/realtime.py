"""The Realtime API of the Azure OpenAI stand-in: WebSocket sessions that real clients can drive."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import string
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import WSMessage, WSMsgType, hdrs, web

# aiohttp refuses bigger messages (its default is 4 MiB); OpenAI takes 15 MiB audio appends.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Offered by a client, this subprotocol turns the session into a raw echo of every frame.
ECHO_SUBPROTOCOL = "echo"
# What browsers offer next to their credentials; the stand-in selects it when offered.
REALTIME_SUBPROTOCOL = "realtime"
# The beta protocol (`response.audio.delta`, ...) is asked for with this header, as the openai
# SDK's `client.beta.realtime` does, or with this subprotocol, as browsers do; the GA protocol
# (`response.output_audio.delta`, ...) otherwise.
BETA_HEADER = "OpenAI-Beta"
BETA_HEADER_VALUE = "realtime=v1"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
# A key offered as a subprotocol (OpenAI's browser convention) is a key all the same.
INSECURE_KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
# Stand-in extensions, not part of the Realtime API: the server closes the session with the
# event's `code` and `reason`, or drops the TCP connection without a close frame.
TEST_CLOSE_EVENT = "test.close"
TEST_DROP_EVENT = "test.drop"
# How long a close waits for the client's closing frame (seconds).
CLOSE_TIMEOUT = 2.0
SAMPLE_RATE = 24_000  # PCM16 mono, the Realtime API's `pcm16` / `audio/pcm` format
AUDIO_DELTAS = 3
AUDIO_DELTA_SAMPLES = SAMPLE_RATE // 10  # 100 ms each

SessionProtocol = Literal["ga", "beta", "echo"]

DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. If you created the "
        "deployment within the last 5 minutes, please wait a moment and try again.",
    }
}
_RESOURCE_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
_CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "response.create",
    "response.cancel",
)
_ALPHANUMERIC = string.ascii_letters + string.digits


def _triangle_wave(samples: int, frequency: int = 400, amplitude: int = 8192) -> bytes:
    """Little-endian PCM16, computed in integers so every platform makes the same bytes."""
    period = SAMPLE_RATE // frequency
    values = []
    for n in range(samples):
        phase = n % period
        rising = 4 * amplitude * phase // period
        values.append(rising - amplitude if 2 * phase < period else 3 * amplitude - rising)
    return struct.pack(f"<{samples}h", *values)


# Every audio response carries exactly these bytes, split over `AUDIO_DELTAS` deltas.
RESPONSE_AUDIO = _triangle_wave(AUDIO_DELTAS * AUDIO_DELTA_SAMPLES)


def response_text(user_text: str) -> str:
    """The transcript (or text) of the response to a conversation whose last user text is this."""
    return "Echo: " + user_text


def offers_key_credential(request: web.Request) -> bool:
    """An `api-key` query parameter (Azure's browser convention) or key subprotocol."""
    if any(name.lower() == "api-key" for name in request.query):
        return True
    return any(
        p.startswith(INSECURE_KEY_SUBPROTOCOL_PREFIX) for p in _offered_subprotocols(request)
    )


def _offered_subprotocols(request: web.Request) -> list[str]:
    # The header may repeat; each carries a comma-separated list (RFC 6455 section 11.3.4).
    return [
        token.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for token in value.split(",")
        if token.strip()
    ]


@dataclass(eq=False)
class RealtimeSession:
    """One Realtime WebSocket session as the resource saw it, filled in while it runs."""

    path: str  # path and query exactly as sent
    headers: list[tuple[str, str]]  # handshake headers in received order and letter case
    subprotocol: str | None  # the one the stand-in selected
    protocol: SessionProtocol  # "ga" or "beta" event names, or "echo" for raw frames
    model: str  # the `deployment` (Azure style) or `model` (v1) query parameter
    client_id: str | None  # `appid` of the bearer token
    # In order: (event type, event) for JSON events; ("text", str) for other text frames and
    # every text frame in echo mode; ("binary", bytes) for binary frames.
    messages: list[tuple[str, Any]] = field(default_factory=list)
    # The code and reason of the client's close frame; None until it arrives, or never if the
    # connection went away without one. After a close the server started, aiohttp keeps only
    # the code of the client's answer: the reason stays None.
    close_code: int | None = None
    close_reason: str | None = None
    _socket: web.WebSocketResponse | None = field(default=None, repr=False)
    _transport: asyncio.Transport | None = field(default=None, repr=False)
    # A close asked for by another task; the session's own task performs it, so that it can
    # read the client's answer (aiohttp drops the connection after a close from elsewhere).
    _close_request: asyncio.Future[tuple[int, str]] | None = field(default=None, repr=False)
    _ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def header_values(self, name: str) -> list[str]:
        """Every value sent under `name`, compared case-insensitively."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def event_types(self) -> list[str]:
        return [kind for kind, _ in self.messages]

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        """Wait until the server side of the session is over (closed, dropped or cancelled);
        `close_code` is final then."""
        await self._ended.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the server side with `code` and `reason`, as a restarting Azure would;
        returns once the session is over (the client answered, or `CLOSE_TIMEOUT` passed)."""
        request = self._close_request
        if request is None or self.ended:
            return
        if not request.done():
            request.set_result((code, reason))
        await self._ended.wait()

    async def _close_here(self, code: int, reason: str) -> None:
        """Close from the session's own task and note the code of the client's answer."""
        socket = self._socket
        if socket is None or socket.closed:
            return
        await socket.close(code=code, message=reason.encode())
        # aiohttp keeps the code of the client's answer (1006 when none came), not its reason.
        if self.close_code is None and socket.close_code not in (None, 1006):
            self.close_code = int(socket.close_code)

    def drop(self) -> None:
        """Abort the TCP connection without a close frame, as a vanishing upstream would."""
        if self._transport is not None:
            self._transport.abort()


class RealtimeEndpoint:
    """Serves `/openai/realtime?api-version=&deployment=` and `/openai/v1/realtime?model=`.

    Authentication and recording happen before (the stand-in's middleware); this owns the
    upgrade and the session. `sessions` records every session that was upgraded.
    """

    def __init__(self) -> None:
        self.sessions: list[RealtimeSession] = []

    async def serve(
        self,
        request: web.Request,
        *,
        client_id: str | None,
        headers: Mapping[str, str],
        delay: float = 0.0,
    ) -> web.StreamResponse:
        model = _model(request)
        if isinstance(model, web.Response):
            return model
        offered = _offered_subprotocols(request)
        if ECHO_SUBPROTOCOL in offered:
            protocols: tuple[str, ...] = (ECHO_SUBPROTOCOL,)
            protocol: SessionProtocol = "echo"
        else:
            protocols = (REALTIME_SUBPROTOCOL,) if REALTIME_SUBPROTOCOL in offered else ()
            beta = BETA_SUBPROTOCOL in offered or any(
                BETA_HEADER_VALUE in value.replace(" ", "")
                for value in request.headers.getall(BETA_HEADER, ())
            )
            protocol = "beta" if beta else "ga"
        socket = web.WebSocketResponse(
            protocols=protocols,
            max_msg_size=MAX_MESSAGE_SIZE,
            timeout=CLOSE_TIMEOUT,
        )
        if not socket.can_prepare(request).ok:
            message = "This endpoint expects a WebSocket upgrade request."
            error = {"message": message, "type": "invalid_request_error", "code": None}
            return web.json_response({"error": error}, status=400)
        socket.headers.update(headers)
        await socket.prepare(request)
        session = RealtimeSession(
            path=request.raw_path,
            headers=[
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in request.raw_headers
            ],
            subprotocol=socket.ws_protocol,
            protocol=protocol,
            model=model,
            client_id=client_id,
            _socket=socket,
            _transport=request.transport,
            _close_request=asyncio.get_running_loop().create_future(),
        )
        self.sessions.append(session)
        try:
            if protocol == "echo":
                await _echo(socket, session)
            else:
                await _Conversation(socket, session, protocol, delay).run()
        except (ConnectionResetError, _Closed):
            pass  # the client went away, or `close()` cut an answer short
        finally:
            session._ended.set()
        return socket

    async def close_sessions(self) -> None:
        """Close every open session with 1001 (going away), as a server shutting down does."""
        open_sessions = [s for s in self.sessions if not s.ended]
        await asyncio.gather(*(s.close(1001, "server shutting down") for s in open_sessions))


class _Closed(Exception):
    """`RealtimeSession.close()` ended the session while an answer was being written."""


def _model(request: web.Request) -> str | web.Response:
    if request.path.startswith("/openai/v1/"):
        model = request.query.get("model")
        if not model:
            message = "Missing required parameter: 'model'."
            error = {
                "message": message,
                "type": "invalid_request_error",
                "param": "model",
                "code": "missing_required_parameter",
            }
            return web.json_response({"error": error}, status=400)
        return model
    # Azure style: like its deployment routes, a bare 404 without api-version.
    if not request.query.get("api-version"):
        return web.json_response(_RESOURCE_NOT_FOUND, status=404)
    deployment = request.query.get("deployment")
    if not deployment:
        return web.json_response(DEPLOYMENT_NOT_FOUND, status=404)
    return deployment


async def _next_frame(socket: web.WebSocketResponse, session: RealtimeSession) -> WSMessage | None:
    """The next text or binary message; None once the session is over. Records the client's
    close frame, and performs a close `RealtimeSession.close()` asked for."""
    requested = session._close_request
    assert requested is not None
    while not socket.closed:
        if requested.done():
            await session._close_here(*requested.result())
            return None
        receiving = asyncio.ensure_future(socket.receive())
        either: set[asyncio.Future[Any]] = {receiving, requested}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():
                # Safe: aiohttp's reader keeps a frame that a cancelled receive did not take.
                receiving.cancel()
                await asyncio.wait({receiving})
        if receiving.cancelled():
            continue
        message = receiving.result()
        if message.type is WSMsgType.CLOSE:
            session.close_code = int(message.data)
            session.close_reason = str(message.extra or "")
            return None
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            return message
        if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return None
    return None


async def _echo(socket: web.WebSocketResponse, session: RealtimeSession) -> None:
    while (message := await _next_frame(socket, session)) is not None:
        if message.type is WSMsgType.TEXT:
            session.messages.append(("text", message.data))
            await socket.send_str(message.data)
        else:
            session.messages.append(("binary", message.data))
            await socket.send_bytes(message.data)


def _event_id() -> str:
    return _new_id("event_")


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(21))


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _chunks(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is `text` exactly."""
    return re.findall(r"\s*\S+\s*|\s+", text) or [text]


def _user_text(item: Mapping[str, Any]) -> str | None:
    if item.get("type", "message") != "message" or item.get("role") != "user":
        return None
    content = item.get("content")
    parts = content if isinstance(content, list) else []
    texts = [
        p.get("text")
        for p in parts
        if isinstance(p, dict) and p.get("type") in ("input_text", "text")
    ]
    return " ".join(t for t in texts if isinstance(t, str))


class _Conversation:
    """One Realtime session speaking the GA or beta protocol."""

    def __init__(
        self,
        socket: web.WebSocketResponse,
        session: RealtimeSession,
        protocol: Literal["ga", "beta"],
        delay: float,
    ) -> None:
        self._socket = socket
        self._record = session
        self._beta = protocol == "beta"
        self._delay = delay
        self._config = _session_config(session.model, beta=self._beta)
        self._last_item_id: str | None = None
        self._user_text = ""
        self._audio_buffer = 0  # bytes appended since the last commit or clear

    async def run(self) -> None:
        await self._send({"type": "session.created", "session": self._config})
        while (message := await _next_frame(self._socket, self._record)) is not None:
            if message.type is WSMsgType.BINARY:
                self._record.messages.append(("binary", message.data))
                await self._error("invalid_request_error", "Binary frames are not supported.")
                continue
            try:
                event = json.loads(message.data)
            except ValueError as exc:
                self._record.messages.append(("text", message.data))
                await self._error("invalid_request_error", f"Invalid JSON: {exc}", "invalid_json")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                self._record.messages.append(("text", message.data))
                await self._error(
                    "invalid_request_error",
                    "Missing required parameter: 'type'.",
                    "missing_required_parameter",
                    param="type",
                )
                continue
            self._record.messages.append((event["type"], event))
            if not await self._handle(event):
                return

    async def _handle(self, event: dict[str, Any]) -> bool:
        """Answer one client event; False once the session is over."""
        kind = event["type"]
        client_event_id = event.get("event_id")
        client_event_id = client_event_id if isinstance(client_event_id, str) else None
        if kind == TEST_CLOSE_EVENT:
            return await self._test_close(event, client_event_id)
        if kind == TEST_DROP_EVENT:
            self._record.drop()
            return False
        if kind == "session.update":
            await self._session_update(event, client_event_id)
        elif kind == "conversation.item.create":
            await self._item_create(event, client_event_id)
        elif kind == "input_audio_buffer.append":
            await self._audio_append(event, client_event_id)
        elif kind == "input_audio_buffer.commit":
            await self._audio_commit(client_event_id)
        elif kind == "input_audio_buffer.clear":
            self._audio_buffer = 0
            await self._send({"type": "input_audio_buffer.cleared"})
        elif kind == "response.create":
            await self._respond(event)
        elif kind == "response.cancel":
            # Responses are written in one go, so there is never one to cancel.
            await self._error(
                "invalid_request_error",
                "Cancellation failed: no active response found",
                "response_cancel_not_active",
                client_event_id=client_event_id,
            )
        else:
            supported = ", ".join(f"'{name}'" for name in _CLIENT_EVENTS)
            await self._error(
                "invalid_request_error",
                f"Invalid value: '{kind}'. Supported values are: {supported}.",
                "invalid_value",
                param="type",
                client_event_id=client_event_id,
            )
        return True

    # -- events ----------------------------------------------------------------------------

    async def _test_close(self, event: dict[str, Any], client_event_id: str | None) -> bool:
        code, reason = event.get("code", 1000), event.get("reason", "")
        # RFC 6455 section 7.4: 1005, 1006 and 1015 never go on the wire; reasons fit 123 bytes.
        valid_code = isinstance(code, int) and (
            code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
            or 3000 <= code <= 4999
        )
        if not valid_code or not isinstance(reason, str) or len(reason.encode()) > 123:
            await self._error(
                "invalid_request_error",
                "test.close needs a valid close `code` and a `reason` of at most 123 bytes.",
                "invalid_value",
                param="code",
                client_event_id=client_event_id,
            )
            return True
        await self._record._close_here(code, reason)
        return False

    async def _session_update(self, event: dict[str, Any], client_event_id: str | None) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            await self._missing("session", client_event_id)
            return
        if not self._beta and update.get("type") != "realtime":
            # GA sessions must say which kind they are; beta clients on GA trip over this.
            await self._missing("session.type", client_event_id)
            return
        fixed = {"id", "object", "expires_at", "model", "type"}
        _merge(self._config, {k: v for k, v in update.items() if k not in fixed})
        await self._send({"type": "session.updated", "session": self._config})

    async def _item_create(self, event: dict[str, Any], client_event_id: str | None) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self._missing("item", client_event_id)
            return
        item = {"object": "realtime.item", "status": "completed", **item}
        item.setdefault("id", _new_id("item_"))
        text = _user_text(item)
        if text is not None:
            self._user_text = text
        await self._add_item(item)

    async def _audio_append(self, event: dict[str, Any], client_event_id: str | None) -> None:
        audio = event.get("audio")
        try:
            size = len(base64.b64decode(audio, validate=True)) if isinstance(audio, str) else -1
        except binascii.Error:
            size = -1
        if size < 0:
            await self._error(
                "invalid_request_error",
                "Invalid 'audio'. Expected base64-encoded audio bytes.",
                "invalid_value",
                param="audio",
                client_event_id=client_event_id,
            )
            return
        self._audio_buffer += size  # the real service answers an append with nothing

    async def _audio_commit(self, client_event_id: str | None) -> None:
        milliseconds = self._audio_buffer / (2 * SAMPLE_RATE) * 1000
        if milliseconds < 100:
            await self._error(
                "invalid_request_error",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {milliseconds:.2f}ms of audio.",
                "input_audio_buffer_commit_empty",
                client_event_id=client_event_id,
            )
            return
        self._audio_buffer = 0
        item_id = _new_id("item_")
        await self._send(
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": self._last_item_id,
                "item_id": item_id,
            }
        )
        part = {"type": "input_audio", "transcript": None}
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [part],
        }
        await self._add_item(item)

    async def _add_item(self, item: dict[str, Any]) -> None:
        previous, self._last_item_id = self._last_item_id, item["id"]
        if self._beta:
            await self._send(
                {"type": "conversation.item.created", "previous_item_id": previous, "item": item}
            )
        else:
            for kind in ("conversation.item.added", "conversation.item.done"):
                await self._send({"type": kind, "previous_item_id": previous, "item": item})

    # -- responses -------------------------------------------------------------------------

    async def _respond(self, event: dict[str, Any]) -> None:
        options = event.get("response")
        options = options if isinstance(options, dict) else {}
        modalities_key = "modalities" if self._beta else "output_modalities"
        modalities = options.get(modalities_key, self._config.get(modalities_key))
        audio = isinstance(modalities, list) and "audio" in modalities
        text = response_text(self._user_text)
        response_id, item_id = _new_id("resp_"), _new_id("item_")
        response: dict[str, Any] = {
            "object": "realtime.response",
            "id": response_id,
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": _new_id("conv_"),
            "max_output_tokens": "inf",
            "metadata": options.get("metadata"),
            "usage": None,
        }
        if self._beta:
            response.update(
                modalities=["text", "audio"] if audio else ["text"],
                voice=self._config.get("voice"),
                output_audio_format=self._config.get("output_audio_format"),
                temperature=self._config.get("temperature"),
            )
        else:
            response.update(
                output_modalities=["audio"] if audio else ["text"],
                audio={"output": _audio_output(self._config)},
            )
        await self._send({"type": "response.created", "response": response})
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0}
        await self._send(
            {"type": "response.output_item.added", **_without(where, "item_id"), "item": item}
        )
        if not self._beta:
            await self._send(
                {
                    "type": "conversation.item.added",
                    "previous_item_id": self._last_item_id,
                    "item": item,
                }
            )
        part_type = "audio" if audio else "text"
        empty_part = {"type": part_type, "transcript" if audio else "text": ""}
        part_where = {**where, "content_index": 0}
        await self._send({"type": "response.content_part.added", **part_where, "part": empty_part})
        for delta in self._deltas(text, audio):
            await self._pause()
            await self._send({**delta, **part_where})
        for done in self._content_done(text, audio):
            await self._send({**done, **part_where})
        part = {"type": part_type, "transcript" if audio else "text": text}
        await self._send({"type": "response.content_part.done", **part_where, "part": part})
        content_type = part_type if self._beta else f"output_{part_type}"
        item = {**item, "status": "completed", "content": [{**part, "type": content_type}]}
        await self._send(
            {"type": "response.output_item.done", **_without(where, "item_id"), "item": item}
        )
        previous, self._last_item_id = self._last_item_id, item_id
        if not self._beta:
            await self._send(
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item}
            )
        words_in = len(self._user_text.split())
        words_out = len(text.split())
        audio_tokens = AUDIO_DELTAS if audio else 0
        usage = {
            "total_tokens": words_in + words_out + audio_tokens,
            "input_tokens": words_in,
            "output_tokens": words_out + audio_tokens,
            "input_token_details": {"text_tokens": words_in, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": words_out, "audio_tokens": audio_tokens},
        }
        response = {
            **response,
            "status": "completed",
            "output": [item],
            "usage": usage,
        }
        await self._send({"type": "response.done", "response": response})

    def _deltas(self, text: str, audio: bool) -> Iterator[dict[str, Any]]:
        """Text pieces, or transcript pieces interleaved with audio, as the service sends them."""
        pieces = _chunks(text)
        if not audio:
            kind = "response.text.delta" if self._beta else "response.output_text.delta"
            for piece in pieces:
                yield {"type": kind, "delta": piece}
            return
        transcript = (
            "response.audio_transcript.delta"
            if self._beta
            else "response.output_audio_transcript.delta"
        )
        sound = "response.audio.delta" if self._beta else "response.output_audio.delta"
        step = 2 * AUDIO_DELTA_SAMPLES
        for index in range(max(len(pieces), AUDIO_DELTAS)):
            if index < len(pieces):
                yield {"type": transcript, "delta": pieces[index]}
            if index < AUDIO_DELTAS:
                chunk = RESPONSE_AUDIO[index * step : (index + 1) * step]
                yield {"type": sound, "delta": base64.b64encode(chunk).decode("ascii")}

    def _content_done(self, text: str, audio: bool) -> Iterator[dict[str, Any]]:
        prefix = "response." if self._beta else "response.output_"
        if audio:
            yield {"type": prefix + "audio.done"}
            yield {"type": prefix + "audio_transcript.done", "transcript": text}
        else:
            yield {"type": prefix + "text.done", "text": text}

    # -- plumbing --------------------------------------------------------------------------

    async def _pause(self) -> None:
        if self._delay > 0:
            await asyncio.sleep(self._delay)

    async def _send(self, event: dict[str, Any]) -> None:
        requested = self._record._close_request
        if requested is not None and requested.done():
            await self._record._close_here(*requested.result())
            raise _Closed
        # `type` first, then a fresh `event_id`: the order the service writes them in.
        kind = event.pop("type")
        await self._socket.send_str(json.dumps({"type": kind, "event_id": _event_id(), **event}))

    async def _missing(self, param: str, client_event_id: str | None) -> None:
        await self._error(
            "invalid_request_error",
            f"Missing required parameter: '{param}'.",
            "missing_required_parameter",
            param=param,
            client_event_id=client_event_id,
        )

    async def _error(
        self,
        error_type: str,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        client_event_id: str | None = None,
    ) -> None:
        error = {
            "type": error_type,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        }
        await self._send({"type": "error", "error": error})


def _audio_output(config: Mapping[str, Any]) -> Any:
    audio = config.get("audio")
    return audio.get("output") if isinstance(audio, dict) else None


def _without(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _session_config(model: str, *, beta: bool) -> dict[str, Any]:
    """The session the service starts with; `session.update` merges into it."""
    common = {
        "id": _new_id("sess_"),
        "object": "realtime.session",
        "model": model,
        "expires_at": int(time.time()) + 30 * 60,
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "tracing": None,
    }
    if beta:
        return {
            **common,
            "modalities": ["text", "audio"],
            "voice": "alloy",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "input_audio_noise_reduction": None,
            # Only manual turns: the stand-in detects no speech.
            "turn_detection": None,
            "temperature": 0.8,
            "max_response_output_tokens": "inf",
            "speed": 1.0,
        }
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    return {
        "type": "realtime",
        **common,
        "output_modalities": ["audio"],
        "max_output_tokens": "inf",
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "audio": {
            "input": {
                "format": pcm,
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": None,
            },
            "output": {"format": pcm, "voice": "alloy", "speed": 1.0},
        },
    }
