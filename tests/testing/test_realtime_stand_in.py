"""The Azure OpenAI stand-in's Realtime API, driven by `websockets` and the openai SDK itself."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any, cast

import aiohttp
import openai
import pytest
from openai.types.beta.realtime.realtime_server_event import (
    RealtimeServerEvent as BetaRealtimeServerEvent,
)
from openai.types.realtime import RealtimeServerEvent
from openai.types.websocket_connection_options import WebSocketConnectionOptions
from pydantic import TypeAdapter
from tests.conftest import CLIENT_ID, TENANT_ID, hear_audio_response
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from aoai_auth_proxy.testing import (
    RESPONSE_AUDIO,
    AzureOpenAIStandIn,
    CertificateAuthority,
    EntraStandIn,
    RealtimeSession,
)

AZURE_PATH = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-realtime"
V1_PATH = "/openai/v1/realtime?model=gpt-realtime"
GA_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
BETA_EVENT: TypeAdapter[Any] = TypeAdapter(BetaRealtimeServerEvent)
USER_ITEM = {
    "type": "message",
    "role": "user",
    "content": [{"type": "input_text", "text": "hello  there"}],
}
# What every response the stand-in makes after USER_ITEM says.
REPLY = "Echo: hello  there"


@pytest.fixture
def token(entra: EntraStandIn) -> str:
    return entra.mint_access_token(TENANT_ID, CLIENT_ID)


def sdk_options(ca: CertificateAuthority) -> WebSocketConnectionOptions:
    # The SDK hands these to `websockets.connect`; its TypedDict does not declare `ssl`.
    return cast("WebSocketConnectionOptions", {"ssl": ca.client_ssl_context()})


def wss(aoai: AzureOpenAIStandIn, path: str) -> str:
    return "wss" + aoai.base_url.removeprefix("https") + path


def open_session(
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    token: str | None,
    path: str = AZURE_PATH,
    *,
    subprotocols: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
) -> connect:
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return connect(
        wss(aoai, path),
        additional_headers={**auth, **(headers or {})},
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        ssl=ca.client_ssl_context(),
        max_size=None,  # websockets refuses messages over 1 MiB by default
    )


async def receive(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def events_until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] == last:
            return events


async def read_all(ws: ClientConnection, types: list[str]) -> None:
    """Note each event's type until the connection closes (and raises)."""
    while True:
        types.append((await receive(ws))["type"])


def valid(events: list[dict[str, Any]], adapter: TypeAdapter[Any] = GA_EVENT) -> None:
    """Each event validates strictly against the SDK's own models (parsing alone does not)."""
    for event in events:
        adapter.validate_python(event)


async def ended(aoai: AzureOpenAIStandIn) -> RealtimeSession:
    session = aoai.realtime_sessions[-1]
    await asyncio.wait_for(session.wait_ended(), 5)
    return session


# -- handshake and session ---------------------------------------------------------------


async def test_a_session_opens_with_session_created_for_the_deployment(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token) as ws:
        created = await receive(ws)
        assert ws.subprotocol is None
    valid([created])
    assert created["type"] == "session.created"
    assert created["event_id"].startswith("event_")
    session = created["session"]
    assert session["id"].startswith("sess_")
    assert session["model"] == "gpt-realtime"
    assert session["type"] == "realtime"
    assert session["output_modalities"] == ["audio"]
    assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    record = await ended(aoai)
    assert record.path == AZURE_PATH
    assert record.model == "gpt-realtime"
    assert record.protocol == "ga"
    assert record.client_id == CLIENT_ID
    assert record.header("authorization") == f"Bearer {token}"
    assert record.close_code == 1000
    assert record.close_reason == ""
    # The upgrade is recorded with the other requests, at once.
    assert aoai.requests[-1].raw_path == AZURE_PATH
    assert aoai.requests[-1].client_id == CLIENT_ID


async def test_session_update_is_answered_with_the_merged_session(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    update = {"type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"]}
    async with open_session(aoai, ca, token, V1_PATH) as ws:
        created = await receive(ws)
        await send(ws, {"type": "session.update", "event_id": "evt_1", "session": update})
        updated = await receive(ws)
    valid([updated])
    assert updated["type"] == "session.updated"
    assert updated["session"]["id"] == created["session"]["id"]
    assert updated["session"]["instructions"] == "Be brief."
    assert updated["session"]["output_modalities"] == ["text"]
    record = await ended(aoai)
    assert record.path == V1_PATH
    assert record.messages == [
        ("session.update", {"type": "session.update", "event_id": "evt_1", "session": update})
    ]


async def test_an_audio_response_streams_pcm16_and_its_transcript(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "conversation.item.create", "item": USER_ITEM})
        added = await events_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        events = await events_until(ws, "response.done")
    valid(added + events)
    assert [e["type"] for e in added] == ["conversation.item.added", "conversation.item.done"]
    types = [e["type"] for e in events]
    assert types[:4] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert types[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    transcript = [e["delta"] for e in events if e["type"].endswith("audio_transcript.delta")]
    audio = [e["delta"] for e in events if e["type"] == "response.output_audio.delta"]
    assert len(transcript) > 1
    assert len(audio) > 1
    assert "".join(transcript) == REPLY
    assert b"".join(base64.b64decode(chunk) for chunk in audio) == RESPONSE_AUDIO
    response_id = events[0]["response"]["id"]
    assert all(e.get("response_id", response_id) == response_id for e in events)
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": REPLY}]


async def test_a_text_response_streams_text_deltas(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "conversation.item.create", "item": USER_ITEM})
        await events_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create", "response": {"output_modalities": ["text"]}})
        events = await events_until(ws, "response.done")
    valid(events)
    types = {e["type"] for e in events}
    assert not any("audio" in t for t in types)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == REPLY
    assert next(e for e in events if e["type"] == "response.output_text.done")["text"] == REPLY


@pytest.mark.parametrize(
    ("subprotocols", "headers", "selected"),
    [
        ((), {"OpenAI-Beta": "realtime=v1"}, None),
        (("realtime", "openai-beta.realtime-v1"), {}, "realtime"),
    ],
)
async def test_beta_clients_get_the_beta_event_names(
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    token: str,
    subprotocols: tuple[str, ...],
    headers: dict[str, str],
    selected: str | None,
) -> None:
    async with open_session(aoai, ca, token, subprotocols=subprotocols, headers=headers) as ws:
        assert ws.subprotocol == selected
        created = await receive(ws)
        await send(ws, {"type": "conversation.item.create", "item": USER_ITEM})
        item = await receive(ws)
        await send(ws, {"type": "response.create"})
        events = await events_until(ws, "response.done")
    valid([created, item, *events], BETA_EVENT)
    assert created["session"]["modalities"] == ["text", "audio"]
    assert item["type"] == "conversation.item.created"
    transcript = [e["delta"] for e in events if e["type"] == "response.audio_transcript.delta"]
    audio = [e["delta"] for e in events if e["type"] == "response.audio.delta"]
    assert "".join(transcript) == REPLY
    assert b"".join(base64.b64decode(chunk) for chunk in audio) == RESPONSE_AUDIO
    assert (await ended(aoai)).protocol == "beta"


async def test_unknown_and_malformed_events_get_error_events_and_the_session_goes_on(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "response.frobnicate", "event_id": "evt_7"})
        unknown = await receive(ws)
        await ws.send("{not json")
        malformed = await receive(ws)
        await send(ws, {"type": "session.update", "session": {"instructions": "no type"}})
        untyped_session = await receive(ws)
        await send(ws, {"type": "response.cancel"})
        nothing_to_cancel = await receive(ws)
        await send(ws, {"type": "session.update", "session": {"type": "realtime"}})
        still_there = await receive(ws)
    valid([unknown, malformed, untyped_session, nothing_to_cancel, still_there])
    assert unknown["type"] == "error"
    assert unknown["error"]["type"] == "invalid_request_error"
    assert unknown["error"]["code"] == "invalid_value"
    assert unknown["error"]["param"] == "type"
    assert unknown["error"]["event_id"] == "evt_7"
    assert unknown["error"]["message"].startswith("Invalid value: 'response.frobnicate'.")
    assert malformed["error"]["code"] == "invalid_json"
    assert untyped_session["error"]["param"] == "session.type"
    assert nothing_to_cancel["error"]["code"] == "response_cancel_not_active"
    assert still_there["type"] == "session.updated"
    record = await ended(aoai)
    assert record.event_types == [
        "response.frobnicate",
        "text",
        "session.update",
        "response.cancel",
        "session.update",
    ]


async def test_committed_audio_becomes_a_user_item(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    chunk = base64.b64encode(bytes(4800)).decode()  # 100 ms of silence
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "input_audio_buffer.commit"})
        empty = await receive(ws)
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        await send(ws, {"type": "input_audio_buffer.commit"})
        events = await events_until(ws, "conversation.item.done")
    valid([empty, *events])
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    committed, added, _ = events
    assert committed["type"] == "input_audio_buffer.committed"
    assert added["item"]["id"] == committed["item_id"]
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]


async def test_stream_delay_spaces_the_deltas(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    aoai.stream_delay = 0.05
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        started = time.monotonic()
        await send(ws, {"type": "response.create"})
        events = await events_until(ws, "response.done")
    deltas = [e for e in events if e["type"].endswith(".delta")]
    assert time.monotonic() - started >= 0.05 * len(deltas)


# -- raw frames and closes -----------------------------------------------------------------


async def test_the_echo_subprotocol_echoes_text_binary_and_large_frames(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    big = os.urandom(1_000_000)
    bigger = os.urandom(4 * 1024 * 1024)
    async with open_session(aoai, ca, token, subprotocols=("realtime", "echo")) as ws:
        assert ws.subprotocol == "echo"  # echo wins whenever it is offered
        await ws.send("one")
        await ws.send(b"\x00\x01two")
        await ws.send(big)
        await ws.send(bigger)
        await ws.send('{"type": "test.close"}')  # no protocol here: echoed like any text
        assert await ws.recv() == "one"
        assert await ws.recv() == b"\x00\x01two"
        assert await ws.recv() == big
        assert await ws.recv() == bigger
        assert await ws.recv() == '{"type": "test.close"}'
        await ws.close(4002, "client done")
    record = await ended(aoai)
    assert record.protocol == "echo"
    assert record.subprotocol == "echo"
    assert record.header("Sec-WebSocket-Protocol") == "realtime, echo"
    assert record.messages == [
        ("text", "one"),
        ("binary", b"\x00\x01two"),
        ("binary", big),
        ("binary", bigger),
        ("text", '{"type": "test.close"}'),
    ]
    assert (record.close_code, record.close_reason) == (4002, "client done")


async def test_test_close_makes_the_server_close_with_that_code_and_reason(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "test.close", "code": 1000.5})
        refused = await receive(ws)
        await send(ws, {"type": "test.close", "code": 4001, "reason": "bye"})
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert refused["error"]["param"] == "code"
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
    record = await ended(aoai)
    assert record.close_code == 4001  # the client's answer echoes the code


async def test_the_server_can_close_or_drop_a_session_from_the_test(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    async with open_session(aoai, ca, token, subprotocols=("echo",)) as ws:
        await ws.send("hi")
        await ws.recv()
        await aoai.realtime_sessions[-1].close(4003, "restarting")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4003, "restarting")
    assert (await ended(aoai)).close_code == 4003

    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "test.drop"})
        with pytest.raises(ConnectionClosed) as dropped:
            await ws.recv()
    assert dropped.value.rcvd is None  # no close frame: the connection just went away
    assert (await ended(aoai)).close_code is None


async def test_a_server_close_cuts_a_slow_response_short(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    aoai.stream_delay = 0.05
    async with open_session(aoai, ca, token) as ws:
        await receive(ws)
        await send(ws, {"type": "response.create"})
        while not (await receive(ws))["type"].endswith(".delta"):
            pass
        closing = asyncio.create_task(aoai.realtime_sessions[-1].close(4004, "cut"))
        seen: list[str] = []
        with pytest.raises(ConnectionClosed) as closed:
            await read_all(ws, seen)
        await closing
    assert "response.done" not in seen  # the response had started, and never finished
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4004, "cut")
    assert (await ended(aoai)).close_code == 4004


async def test_closing_the_stand_in_closes_open_sessions_with_1001(
    entra: EntraStandIn, ca: CertificateAuthority, token: str
) -> None:
    aoai = AzureOpenAIStandIn(entra, ca)
    await aoai.start()
    try:
        async with open_session(aoai, ca, token) as ws:
            await receive(ws)
            await aoai.close()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    finally:
        await aoai.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert aoai.realtime_sessions[-1].ended
    assert aoai.realtime_sessions[-1].close_code == 1001  # the client's answer was read


# -- refused upgrades ------------------------------------------------------------------------


async def refused(
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    token: str | None,
    path: str = AZURE_PATH,
    **options: Any,
) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as refusal:
        async with open_session(aoai, ca, token, path, **options):
            pass
    response = refusal.value.response
    body: dict[str, Any] = json.loads(response.body)
    return response.status_code, body


async def test_a_key_is_refused_403_however_it_is_offered(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    key_header = await refused(aoai, ca, token, headers={"api-key": "secret"})
    key_query = await refused(aoai, ca, token, AZURE_PATH + "&api-key=secret")
    key_subprotocol = await refused(
        aoai, ca, token, subprotocols=("realtime", "openai-insecure-api-key.secret")
    )
    for status, body in (key_header, key_query, key_subprotocol):
        assert status == 403
        assert body["error"]["code"] == "AuthenticationTypeDisabled"
    assert aoai.realtime_sessions == []
    assert len(aoai.requests) == 3  # refused upgrades are recorded too


async def test_an_upgrade_without_a_valid_bearer_token_is_refused_401(
    aoai: AzureOpenAIStandIn, entra: EntraStandIn, ca: CertificateAuthority
) -> None:
    expired = entra.mint_access_token(TENANT_ID, CLIENT_ID, lifetime=-60)
    for token in (None, expired):
        status, body = await refused(aoai, ca, token)
        assert status == 401
        assert body["error"]["code"] == "401"
    assert aoai.realtime_sessions == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/openai/realtime?deployment=gpt-realtime", 404, "404"),
        ("/openai/realtime?api-version=2025-04-01-preview", 404, "DeploymentNotFound"),
        ("/openai/v1/realtime", 400, "missing_required_parameter"),
    ],
)
async def test_an_upgrade_without_its_query_parameters_is_refused(
    aoai: AzureOpenAIStandIn,
    ca: CertificateAuthority,
    token: str,
    path: str,
    status: int,
    code: str,
) -> None:
    answer = await refused(aoai, ca, token, path)
    assert answer[0] == status
    assert answer[1]["error"]["code"] == code


async def test_a_plain_get_on_the_realtime_path_is_a_400(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    connector = aiohttp.TCPConnector(ssl=ca.client_ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(
            aoai.base_url + AZURE_PATH, headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        assert response.status == 400
        assert "WebSocket" in (await response.json())["error"]["message"]


# -- the openai SDK ------------------------------------------------------------------------


async def test_the_azure_sdk_client_holds_a_text_conversation(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=aoai.base_url, azure_ad_token=token, api_version="2025-04-01-preview"
    )
    async with client.realtime.connect(
        model="gpt-realtime", websocket_connection_options=sdk_options(ca)
    ) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            }
        )
        await connection.response.create()
        text = ""
        async for event in connection:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.done":
                break
    await client.close()
    assert text == "Echo: hi"
    record = await ended(aoai)
    assert record.path == AZURE_PATH
    assert record.header("Authorization") == f"Bearer {token}"
    assert record.header("api-key") is None
    assert record.subprotocol is None
    assert record.event_types == ["session.update", "conversation.item.create", "response.create"]
    assert record.close_code == 1000


async def test_the_azure_sdk_beta_client_hears_audio_through_a_websocket_base_url(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=aoai.base_url,
        azure_ad_token=token,
        api_version="2025-04-01-preview",
        websocket_base_url=wss(aoai, "/openai"),
    )
    async with client.beta.realtime.connect(
        model="gpt-4o-realtime", websocket_connection_options=sdk_options(ca)
    ) as connection:
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        transcript, audio = await hear_audio_response(connection, beta=True)
    await client.close()
    assert transcript == REPLY
    assert audio == RESPONSE_AUDIO
    record = await ended(aoai)
    assert (
        record.path == "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime"
    )
    assert record.header("OpenAI-Beta") == "realtime=v1"
    assert record.protocol == "beta"


async def test_the_azure_sdk_client_with_a_key_is_refused(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority
) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=aoai.base_url, api_key="secret", api_version="2025-04-01-preview"
    )
    with pytest.raises(InvalidStatus) as refusal:
        async with client.realtime.connect(
            model="gpt-realtime", websocket_connection_options=sdk_options(ca)
        ):
            pass
    await client.close()
    assert refusal.value.response.status_code == 403
    assert aoai.requests[-1].header("api-key") == "secret"


async def test_the_v1_sdk_client_hears_audio_and_its_transcript(
    aoai: AzureOpenAIStandIn, ca: CertificateAuthority, token: str
) -> None:
    # `OpenAI` sends its api_key as `Authorization: Bearer`: an Entra token passes.
    client = openai.AsyncOpenAI(base_url=aoai.base_url + "/openai/v1", api_key=token)
    async with client.realtime.connect(
        model="gpt-realtime", websocket_connection_options=sdk_options(ca)
    ) as connection:
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        transcript, audio = await hear_audio_response(connection)
    await client.close()
    assert transcript == REPLY
    assert audio == RESPONSE_AUDIO
    record = await ended(aoai)
    assert record.path == V1_PATH
    assert record.header("Authorization") == f"Bearer {token}"
    assert record.protocol == "ga"
