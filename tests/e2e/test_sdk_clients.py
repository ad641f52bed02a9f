"""Real clients through the proxy: the openai SDK (sync and async) and LiteLLM."""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
from pathlib import Path

import httpx
import litellm
import openai
from openai.types.chat import ChatCompletionMessageParam

from aoai_auth_proxy.testing import AzureOpenAIStandIn
from tests.conftest import CLIENT_ID, RunningProxy

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a story"}]


def assert_upstream_saw_only_the_proxy_token(aoai: AzureOpenAIStandIn) -> None:
    assert aoai.requests, "nothing reached the upstream"
    for seen in aoai.requests:
        assert seen.client_id == CLIENT_ID
        assert seen.header_values("api-key") == []
        assert all("dummy-key" not in value for _, value in seen.headers)


async def test_async_azure_openai_chat_streamed_and_not(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=proxy.url, api_key="dummy-key", api_version=API_VERSION, max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert completion.choices[0].message.content == "Echo: tell me a story"
        stream = await sdk.chat.completions.create(
            model=DEPLOYMENT,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [
            chunk.choices[0].delta.content or ""
            async for chunk in stream
            if chunk.choices and chunk.choices[0].delta
        ]
        assert "".join(pieces) == "Echo: tell me a story"
    assert aoai.requests[0].raw_path == (
        f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    )
    assert_upstream_saw_only_the_proxy_token(aoai)


async def test_sync_azure_openai_chat_and_embeddings(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    # The sync client blocks: it runs on a worker thread while the proxy serves on this loop.
    await asyncio.to_thread(sync_calls, proxy.url, aoai.embedding_dimensions)
    assert_upstream_saw_only_the_proxy_token(aoai)


def sync_calls(url: str, dimensions: int) -> None:
    sdk = openai.AzureOpenAI(
        azure_endpoint=url, api_key="dummy-key", api_version=API_VERSION, max_retries=0
    )
    with sdk:
        completion = sdk.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert completion.choices[0].message.content == "Echo: tell me a story"
        with sdk.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True) as s:
            text = "".join(
                c.choices[0].delta.content or "" for c in s if c.choices and c.choices[0].delta
            )
        assert text == "Echo: tell me a story"
        embedding = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert len(embedding.data) == 2
        assert len(embedding.data[0].embedding) == dimensions


async def test_openai_v1_base_url_with_bearer_key(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{proxy.url}/openai/v1", api_key="dummy-key", max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert completion.choices[0].message.content == "Echo: tell me a story"
        # the SDK asks for base64 by default and decodes it itself
        embedding = await sdk.embeddings.create(model="text-embedding-3-small", input="x")
        assert len(embedding.data[0].embedding) == aoai.embedding_dimensions
    assert aoai.requests[0].raw_path == "/openai/v1/chat/completions"
    assert_upstream_saw_only_the_proxy_token(aoai)


async def test_raw_bytes_are_identical_to_a_direct_call(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn, ca_file: Path
) -> None:
    """The embedding answer is deterministic: through the proxy it is byte for byte the one the
    upstream gives a direct caller holding a valid token."""
    assert aoai.requests == []
    body = {"input": "bytes", "model": "e", "encoding_format": "base64"}
    path = f"/openai/deployments/e/embeddings?api-version={API_VERSION}"
    async with httpx.AsyncClient() as plain:
        via_proxy = await plain.post(proxy.url + path, json=body, headers={"api-key": "x"})
    assert via_proxy.status_code == 200
    token = aoai.requests[-1].header("authorization")
    assert token is not None
    context = ssl.create_default_context(cafile=str(ca_file))
    async with httpx.AsyncClient(verify=context) as direct_client:
        direct = await direct_client.post(
            aoai.base_url + path, json=body, headers={"Authorization": token}
        )
    assert direct.status_code == 200
    assert via_proxy.content == direct.content
    vector = base64.b64decode(via_proxy.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(vector) // 4}f", vector)) == aoai.embedding_dimensions


async def test_litellm_azure_deployment_with_dummy_key(
    proxy: RunningProxy, aoai: AzureOpenAIStandIn
) -> None:
    response = await litellm.acompletion(
        model=f"azure/{DEPLOYMENT}",
        messages=MESSAGES,
        api_base=proxy.url,
        api_key="dummy-key",
        api_version=API_VERSION,
        num_retries=0,
    )
    assert response.choices[0].message.content == "Echo: tell me a story"
    stream = await litellm.acompletion(
        model=f"azure/{DEPLOYMENT}",
        messages=MESSAGES,
        api_base=proxy.url,
        api_key="dummy-key",
        api_version=API_VERSION,
        stream=True,
    )
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    assert text == "Echo: tell me a story"
    assert aoai.requests[0].raw_path.startswith(
        f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    )
    assert_upstream_saw_only_the_proxy_token(aoai)
