"""Query-generation backends, offline on CPU: the transformers backend on the tiny student, the openai backend
against a local stub server, and the vllm backend's refusal where vllm is not installed.

The student is the tiny one with its weights redrawn larger (`build_talkative_student`), so that its greedy answers
differ from prompt to prompt.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from aiohttp import web

from qc_assets.categories import CATEGORY_NAMES
from qc_assets.defs.generation.backends import (
    GeneratedQuery,
    GenerationFailed,
    GenerationRequest,
    GeneratorUnavailable,
    OpenAIGenerator,
    PromptBuilder,
    QueryGenerator,
    open_generator,
    postprocess,
    render_prompt,
)
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets_tests.conftest import build_talkative_student

GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
MAX_NEW_TOKENS = 12


def corpus_texts() -> list[str]:
    return [
        json.loads(line)["text"]
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return build_talkative_student(tmp_path_factory.mktemp("generation") / "student")


@pytest.fixture(scope="module")
def generator(student) -> Iterator[QueryGenerator]:
    generator = open_generator("transformers", str(student), batch_size=32, max_new_tokens=MAX_NEW_TOKENS)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def requests(texts) -> list[GenerationRequest]:
    # Mixed lengths (40 to ~900 characters) and every category, in no particular order of length.
    return [
        GenerationRequest(
            key=(f"doc-{index}", CATEGORY_NAMES[index % len(CATEGORY_NAMES)]),
            category=CATEGORY_NAMES[index % len(CATEGORY_NAMES)],
            text=texts[index % len(texts)][: 40 + (index * 379) % 860],
        )
        for index in range(20)
    ]


def token_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_prompt_is_the_sft_rendering_with_the_generation_prompt(student, texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    for category, text in zip(CATEGORY_NAMES, texts):
        messages = [{"role": "system", "content": category}, {"role": "user", "content": text}]
        expected = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        prompt = render_prompt(tokenizer, category, text)
        assert prompt == expected
        assert (
            prompt
            == f"<|im_start|>system\n{category}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n{GENERATION_PROMPT}"
        )
        built_prompt, ids, document = PromptBuilder(tokenizer, 2048).build(category, text)
        assert (built_prompt, document) == (expected, text)
        assert ids == token_ids(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=False)
        )


def test_transformers_answers_every_request_in_order_deterministically(generator, requests, student):
    from transformers import AutoTokenizer

    assert isinstance(generator, QueryGenerator) and generator.name == "transformers"
    lines: list[str] = []
    first = generator.generate(requests, log=lines.append)
    assert [result.key for result in first] == [request.key for request in requests]
    assert all(isinstance(result, GeneratedQuery) for result in first)
    assert lines and lines[-1].startswith("transformers: done: 20/20 requests")

    tokenizer = AutoTokenizer.from_pretrained(student)
    for request, result in zip(requests, first):
        messages = [{"role": "system", "content": request.category}, {"role": "user", "content": request.text}]
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, enable_thinking=False
        )
        assert result.input_tokens == len(token_ids(prompt))
        assert 1 <= result.output_tokens <= MAX_NEW_TOKENS
        assert "\n" not in result.query and result.query == result.query.strip()
    # The weights are random, but the answers depend on the prompt: an order mix-up would show.
    assert len({result.query for result in first}) > len(requests) // 2

    assert generator.generate(requests) == first
    # Each request alone (no padding at all) answers as it does in the batch: left padding is masked right.
    alone = [generator.generate([request])[0] for request in requests[:3]]
    assert alone == first[:3]


def test_small_batches_give_what_one_big_batch_gives(student, generator, requests):
    big = generator.generate(requests)
    small = open_generator("transformers", str(student), batch_size=3, max_new_tokens=MAX_NEW_TOKENS)
    try:
        assert small.generate(requests) == big
    finally:
        small.close()


def test_a_long_document_is_cut_so_the_generation_prompt_survives(student, generator, texts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    document = ("".join(texts) * 3)[:20_000]
    assert len(document) == 20_000
    prompt, ids, kept = PromptBuilder(tokenizer, 2048).build("title", document)
    assert prompt.endswith(GENERATION_PROMPT) and prompt.startswith("<|im_start|>system\ntitle<|im_end|>\n")
    assert 2000 < len(ids) <= 2048 and ids == token_ids(tokenizer(prompt, add_special_tokens=False))
    assert document.startswith(kept) and 0 < len(kept) < len(document)
    assert prompt == render_prompt(tokenizer, "title", kept)

    short = open_generator("transformers", str(student), max_input_tokens=200, max_new_tokens=4)
    try:
        (result,) = short.generate([GenerationRequest("long", "summary", document)])
    finally:
        short.close()
    assert result.key == "long" and 150 < result.input_tokens <= 200 and result.output_tokens <= 4

    with pytest.raises(ValueError, match="too small"):
        PromptBuilder(tokenizer, 5).build("title", document)


def test_postprocess_keeps_the_first_line_of_the_answer():
    assert postprocess("  日本の四季とは?\n二行目") == "日本の四季とは?"
    assert postprocess("<think>\n\n</think>\n\n日本の四季") == "日本の四季"
    assert postprocess("<think>考え中</think>\n\n\n  質問  \n") == "質問"
    assert postprocess("切れた答え\ufffd\ufffd") == "切れた答え"
    assert postprocess("<think>\n切れた") == "切れた"
    assert postprocess("\n\n") == postprocess(None) == ""


def test_vllm_is_unavailable_without_the_gpu_extra(student, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an install without vLLM gives: import vllm fails
    with pytest.raises(GeneratorUnavailable, match=r"pip install -e '\.\[gpu\]' on a CUDA machine"):
        open_generator("vllm", str(student))
    with pytest.raises(ValueError, match="unknown generation backend"):
        open_generator("onnx", str(student))


# ---------------------------------------------------------------------------------------------------------------
# openai backend against a stub chat-completions server


class StubServer:
    """Answers /v1/chat/completions with a think block and two lines built from the system message."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.ServerRunner | None = None

    async def answer(self, request: web.BaseRequest) -> web.Response:
        body = await request.json()
        self.bodies.append({"path": request.path, "authorization": request.headers.get("Authorization"), **body})
        messages = body["messages"]
        user = messages[1]["content"]
        if request.path != "/v1/chat/completions":
            return web.json_response({"error": {"message": "not found"}}, status=404)
        if user == "BAD":
            return web.json_response(
                {"error": {"message": "this request is bad", "type": "BadRequestError"}}, status=400
            )
        content = f"<think>\n\n</think>\n\nquery for {messages[0]['content']}\nmore text"
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": len(user), "completion_tokens": 7, "total_tokens": len(user) + 7},
            }
        )

    async def start(self) -> int:
        self.runner = web.ServerRunner(web.Server(self.answer, access_log=None))  # needs the running loop
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return self.runner.addresses[0][1]

    def __enter__(self) -> Self:
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self.start(), self.loop).result()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def test_openai_sends_the_sft_messages_and_reads_answers_and_usage(stub, requests):
    generator = open_generator(
        "openai",
        "my-student",
        base_url=stub.base_url,
        api_key="k-123",
        concurrency=4,
        max_new_tokens=32,
        temperature=0.0,
    )
    assert isinstance(generator, QueryGenerator) and generator.name == "openai"
    lines: list[str] = []
    try:
        results = generator.generate(requests, log=lines.append)
    finally:
        generator.close()
    assert [result.key for result in results] == [request.key for request in requests]
    for request, result in zip(requests, results):
        assert result == GeneratedQuery(request.key, f"query for {request.category}", len(request.text), 7)
    assert lines[-1].startswith("openai: done: 20/20 requests")

    assert len(stub.bodies) == len(requests)
    by_text = {(body["messages"][0]["content"], body["messages"][1]["content"]): body for body in stub.bodies}
    for request in requests:
        body = by_text[(request.category, request.text)]
        assert body["messages"] == [
            {"role": "system", "content": request.category},
            {"role": "user", "content": request.text},
        ]
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("my-student", 0.0, 32)
        assert body["path"] == "/v1/chat/completions" and body["authorization"] == "Bearer k-123"


def test_openai_with_a_local_checkpoint_cuts_long_documents_and_names_the_served_model(stub, student, texts):
    document = ("".join(texts) * 3)[:20_000]
    generator = open_generator(
        "openai", str(student), base_url=stub.base_url, model_name="served-name", max_input_tokens=300
    )

    async def inside_a_running_loop():
        return generator.generate([GenerationRequest(1, "keywords", document), GenerationRequest(2, "title", "短い")])

    results = asyncio.run(inside_a_running_loop())
    assert [result.query for result in results] == ["query for keywords", "query for title"]
    sent = {body["messages"][1]["content"] for body in stub.bodies}
    assert "短い" in sent
    (cut,) = sent - {"短い"}
    assert document.startswith(cut) and 0 < len(cut) < 2000
    assert {body["model"] for body in stub.bodies} == {"served-name"}


def test_openai_fails_with_the_request_key_when_the_server_refuses(stub):
    generator = OpenAIGenerator(
        "m",
        base_url=stub.base_url,
        api_key=None,
        concurrency=2,
        model_name=None,
        max_new_tokens=8,
        temperature=0.0,
        max_input_tokens=2048,
        max_retries=0,
    )
    with pytest.raises(GenerationFailed, match=r"'bad-key'.*BadRequestError"):
        generator.generate([GenerationRequest("ok", "title", "良い"), GenerationRequest("bad-key", "title", "BAD")])
