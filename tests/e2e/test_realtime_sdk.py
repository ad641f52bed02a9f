"""The openai SDK's realtime client through the proxy: Azure style and v1 style."""

from __future__ import annotations

import openai

from aoai_auth_proxy.testing import RESPONSE_AUDIO, AzureOpenAIStandIn, response_text
from tests.conftest import CLIENT_ID, RunningProxy, hear_audio_response

USER_TEXT = "say something"
USER_ITEM = {
    "type": "message",
    "role": "user",
    "content": [{"type": "input_text", "text": USER_TEXT}],
}


def ws_base(proxy: RunningProxy, path: str) -> str:
    return "ws" + proxy.url.removeprefix("http") + path


async def test_azure_client_with_a_dummy_key_talks_through_the_proxy(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=proxy.url,
        api_key="dummy-key",  # what LiteLLM and Rasa configs send; the proxy replaces it
        api_version="2025-04-01-preview",
        websocket_base_url=ws_base(proxy, "/openai"),
    )
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        text = ""
        async for event in connection:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.done":
                break
    await client.close()
    assert text == response_text(USER_TEXT)
    session = aoai.realtime_sessions[-1]
    await session.wait_ended()
    assert session.path == "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-realtime"
    assert session.client_id == CLIENT_ID
    assert session.header("api-key") is None


async def test_v1_client_hears_audio_and_its_transcript_through_the_proxy(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key="dummy-key")
    async with client.realtime.connect(model="gpt-realtime") as connection:
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        transcript, audio = await hear_audio_response(connection)
    await client.close()
    assert transcript == response_text(USER_TEXT)
    assert audio == RESPONSE_AUDIO
    session = aoai.realtime_sessions[-1]
    await session.wait_ended()
    assert session.path == "/openai/v1/realtime?model=gpt-realtime"
    assert session.client_id == CLIENT_ID
    assert "dummy-key" not in str(session.headers)
