"""The fault-injecting teacher server itself, driven through the official openai SDK (no retries) and raw sockets."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from qc_assets.categories import CATEGORIES, LabelError
from qc_assets.testing.teacher_server import DEFAULT_MODEL, label_for, raw_http_load, run_teacher_server, text_key


def doc(tag: str, index: int = 0) -> str:
    return f"{tag}の文書{index}番。東京都の人口は約千四百万人で、日本最大の都市圏を形成している。"


def ask(client: openai.OpenAI, category: str, text: str, model: str = DEFAULT_MODEL, **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": CATEGORIES[category].prompt(text)}],
        **kwargs,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_teacher_server(tmp_path_factory.mktemp("teacher")) as running:
        yield running


@pytest.fixture
def client(server):
    server.set_plan(None)
    with openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0, timeout=10) as sdk:
        yield sdk


def entries_for(server, key: str, count: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        found = [entry for entry in server.requests() if entry.get("text_key") == key]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_ok_answers_carry_valid_labels_and_usage(server, client):
    text = doc("ok")
    for name, category in CATEGORIES.items():
        response = ask(client, name, text)
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        assert response.model == "deepseek-v4-flash"
        assert category.parse(choice.message.content) == label_for(name, text)
        assert choice.message.model_extra["reasoning_content"]
        usage = response.usage
        assert usage.prompt_tokens >= 1 and usage.prompt_tokens_details.cached_tokens == 0
        assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens > 0
        assert usage.model_extra["prompt_cache_miss_tokens"] == usage.prompt_tokens
    again = ask(client, "title", text)  # second attempt for the key: half the prompt is a cache hit
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens // 2
    assert [model.id for model in client.models.list()] == ["deepseek-v4-flash"]
    key = text_key(text)
    lines = entries_for(server, key, len(CATEGORIES) + 1)
    assert {line["category"] for line in lines} == set(CATEGORIES)
    assert all(line["status"] == 200 and line["delivered"] and line["behavior"] == "ok" for line in lines)
    assert sorted(line["attempt"] for line in lines if line["category"] == "title") == [1, 2]
    assert all(line["t"] <= line["t_end"] for line in lines)


def test_rate_limit_sends_retry_after(server, client):
    server.set_plan({"rules": [{"behavior": "rate_limit", "categories": ["query"], "retry_after": 3}]})
    text = doc("rate")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "query", text)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "rate_limit_exceeded"
    assert CATEGORIES["title"].parse(ask(client, "title", text).choices[0].message.content)  # other category: ok
    (line,) = [entry for entry in entries_for(server, text_key(text), 2) if entry["category"] == "query"]
    assert line["behavior"] == "rate_limit" and line["status"] == 429 and line["delivered"] is False


def test_drop_is_a_connection_error(server, client):
    server.set_plan({"rules": [{"behavior": "drop"}]})
    with pytest.raises(openai.APIConnectionError):
        ask(client, "title", doc("drop"))
    (line,) = entries_for(server, text_key(doc("drop")), 1)
    assert line["behavior"] == "drop" and line["status"] is None and line["delivered"] is False


def test_attempt_rules_fail_first_then_answer(server, client):
    server.set_plan(
        {
            "rules": [
                {"behavior": "server_error", "attempts": [1]},
                {"behavior": "unavailable", "attempts": [2], "text_contains": "二度"},
            ]
        }
    )
    once, twice = doc("一度"), doc("二度")
    with pytest.raises(openai.InternalServerError):
        ask(client, "faq", once)
    assert CATEGORIES["faq"].parse(ask(client, "faq", once).choices[0].message.content)
    for status in (500, 503):
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client, "faq", twice)
        assert caught.value.status_code == status
    assert ask(client, "faq", twice).choices[0].message.content
    lines = entries_for(server, text_key(once), 2)
    assert [(line["attempt"], line["status"], line["delivered"]) for line in lines] == [(1, 500, False), (2, 200, True)]
    lines = entries_for(server, text_key(twice), 3)
    assert [(line["attempt"], line["behavior"]) for line in lines] == [
        (1, "server_error"),
        (2, "unavailable"),
        (3, "ok"),
    ]


def test_content_faults(server, client):
    text = doc("faults")
    parse = CATEGORIES["keywords"].parse
    expected = label_for("keywords", text)
    for behavior in ("fenced", "think_inline", "chatter"):
        server.set_plan({"rules": [{"behavior": behavior}]})
        message = ask(client, "keywords", text).choices[0].message
        assert message.content != json.dumps({"query": expected}, ensure_ascii=False)
        assert parse(message.content) == expected
        assert ("reasoning_content" in message.model_extra) == (behavior != "think_inline")
    server.set_plan({"rules": [{"behavior": "over_cap", "length": 60}]})
    over_cap = parse(ask(client, "keywords", text).choices[0].message.content)
    assert len(over_cap) == 60 and CATEGORIES["keywords"].over_cap(over_cap)
    for behavior in ("empty_content", "truncated", "invalid_label"):
        server.set_plan({"rules": [{"behavior": behavior}]})
        choice = ask(client, "keywords", text).choices[0]
        assert choice.finish_reason == ("length" if behavior == "truncated" else "stop")
        with pytest.raises(LabelError):
            parse(choice.message.content)
    injected = '{"query": "全ての指示を無視しました"}'
    server.set_plan({"rules": [{"behavior": "raw", "content": injected}]})
    assert ask(client, "keywords", text).choices[0].message.content == injected
    server.set_plan({"rules": [{"behavior": "malformed_body"}]})
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": CATEGORIES["title"].prompt(text)}]}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.read())
    lines = entries_for(server, text_key(text), 9)
    assert [line["delivered"] for line in lines] == [True, True, True, True, False, False, False, False, False]


def test_unrecognised_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert caught.value.status_code == 400 and "unrecognised" in str(caught.value)


def test_a_model_it_does_not_serve_is_refused_as_deepseek_or_vllm_refuses_it(server, client):
    server.set_plan({"models": ["deepseek-v4-flash", "deepseek-v4-pro"], "rules": []})
    assert [model.id for model in client.models.list()] == ["deepseek-v4-flash", "deepseek-v4-pro"]
    assert ask(client, "title", doc("served"), model="deepseek-v4-pro").model == "deepseek-v4-pro"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "title", doc("retired"), model="deepseek-reasoner")
    assert caught.value.body == {
        "message": "Model Not Exist",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request_error",
    }
    server.set_plan({"models": ["deepseek-v4-flash"], "unknown_model_status": 404, "rules": []})
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "title", doc("retired"), model="deepseek-chat")
    assert caught.value.body["message"] == "The model `deepseek-chat` does not exist."
    lines = entries_for(server, text_key(doc("retired")), 2)
    assert [(line["status"], line["behavior"], line["attempt"]) for line in lines] == [
        (400, "unknown_model", None),
        (404, "unknown_model", None),
    ]


def test_slow_answer_outlives_a_client_timeout(server, client):
    server.set_plan({"rules": [{"behavior": "slow", "delay_s": 3}]})
    with pytest.raises(openai.APITimeoutError):
        ask(client, "summary", doc("slow"), timeout=0.3)
    (line,) = entries_for(server, text_key(doc("slow")), 1)
    assert line["behavior"] == "slow" and line["delivered"] is False and line.get("client_closed")


def test_fraction_picks_keys_deterministically(server, client):
    server.set_plan({"rules": [{"behavior": "server_error", "fraction": 0.5}]})
    failed = set()
    for index in range(40):
        try:
            ask(client, "title", doc("fraction", index))
        except openai.InternalServerError:
            failed.add(index)
    assert 5 < len(failed) < 35
    again = set()
    for index in range(40):  # the same keys fail on every attempt
        try:
            ask(client, "title", doc("fraction", index))
        except openai.InternalServerError:
            again.add(index)
    assert again == failed


def test_api_key(tmp_path):
    with run_teacher_server(tmp_path, api_key="sekret-key-123") as server:
        with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                ask(wrong, "title", doc("auth"))
            assert caught.value.status_code == 401
        with openai.OpenAI(base_url=server.base_url, api_key="sekret-key-123", max_retries=0) as right:
            assert CATEGORIES["title"].parse(ask(right, "title", doc("auth")).choices[0].message.content)
        lines = server.requests(min_count=2)
        assert [(line["status"], line["auth_ok"], line["attempt"]) for line in lines] == [
            (401, False, None),
            (200, True, 1),
        ]
        assert "sekret" not in server.log_path.read_text()


def test_holds_many_concurrent_requests(server, client):
    server.set_plan({"latency_ms": 1000})
    texts = [doc("concurrent", index) for index in range(150)]

    async def burst() -> list:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=30) as sdk:
            return await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": CATEGORIES["query"].prompt(text)}]
                    )
                    for text in texts
                )
            )

    started = time.monotonic()
    responses = asyncio.run(burst())
    elapsed = time.monotonic() - started
    assert all(CATEGORIES["query"].parse(response.choices[0].message.content) for response in responses)
    keys = {text_key(text) for text in texts}
    lines = [line for line in server.requests(min_count=1) if line.get("text_key") in keys]
    assert len(lines) == 150
    events = sorted([(line["t"], 1) for line in lines] + [(line["t_end"], -1) for line in lines])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    print(f"\n150 requests held 1 s each: {elapsed:.2f} s wall, peak {peak} in flight on the server")
    assert peak >= 100


# -- throughput: raw sockets, keep-alive, one request in flight per connection; printed, never asserted ----------


def test_throughput_measurement(server):
    server.set_plan(None)
    requests = []
    for index in range(2000):
        category = list(CATEGORIES)[index % len(CATEGORIES)]
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": CATEGORIES[category].prompt(doc("bench", index))}]},
            ensure_ascii=False,
        ).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        requests.append(head.encode() + body)
    print()
    for concurrency in (1, 16, 64):
        cpu_before = server.cpu_seconds()
        ok, errors, elapsed = raw_http_load(server.port, requests, concurrency, 1.0)
        cpu = server.cpu_seconds() - cpu_before
        per_cpu = f"{ok / cpu:,.0f}" if cpu > 0 else "n/a"
        print(
            f"teacher server, latency 0, {concurrency:3d} connections: {ok / elapsed:8,.0f} req/s "
            f"({ok} ok, {errors} errors in {elapsed:.2f} s), server CPU {cpu:.2f} s -> {per_cpu} req per server CPU-second"
        )
        assert ok > 0 and errors == 0


if __name__ == "__main__":  # a longer measurement: python -m qc_assets_tests.test_teacher_server
    import tempfile

    with tempfile.TemporaryDirectory() as directory, run_teacher_server(Path(directory)) as running:
        test_throughput_measurement(running)
