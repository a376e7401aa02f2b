"""The OpenAI-compatible endpoints' client, shared by the teacher and the `openai` generation backend."""

from __future__ import annotations

import json

import httpx2
import openai


def async_client(
    base_url: str | None, api_key: str | None, concurrency: int, timeout_s: float, max_retries: int
) -> openai.AsyncOpenAI:
    """The SDK's async client for an OpenAI-compatible endpoint, sized for `concurrency` requests in flight.

    It uses the SDK's aiohttp transport: httpx's pool scans every connection on each request (and polls each idle
    socket), which at 100 connections costs more CPU than the request itself. The aiohttp session belongs to the
    event loop it is first used on.
    """
    connections = concurrency + 16
    return openai.AsyncOpenAI(
        base_url=base_url,
        # Local servers (vLLM, Ollama) take any key; the SDK insists on one.
        api_key=api_key or "no-key",
        max_retries=max_retries,
        timeout=timeout_s,
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=timeout_s,
        ),
    )


async def post_chat_completion(client: openai.AsyncOpenAI, body: dict) -> dict:
    """POST `body` to the endpoint's /chat/completions and return the JSON object it answers.

    The SDK's documented raw `post`: `chat.completions.create` walks the request through a TypedDict transform and
    the answer through pydantic models, which together cost more CPU than the HTTP exchange. Status errors,
    timeouts and connection errors are the SDK's as usual; a body that is not a JSON object raises ValueError.
    """
    response = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
    completion = json.loads(response.content)
    if not isinstance(completion, dict):
        raise ValueError(f"the response body is JSON but not an object: {response.text[:200]}")
    return completion
