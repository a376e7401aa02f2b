"""Query generation with a trained student: one small interface, three backends.

    generator = open_generator("transformers", checkpoint_dir)          # CPU default; CUDA when there is one
    generator = open_generator("vllm", checkpoint_dir)                  # offline vLLM engine (the `gpu` extra)
    generator = open_generator("openai", checkpoint_dir, base_url="http://host:8000/v1")   # e.g. `vllm serve`
    try:
        results = generator.generate([GenerationRequest(key, category, text), ...], log=context.log.info)
    finally:
        generator.close()

The prompt is the SFT format exactly: a system turn holding the category name and a user turn holding the
document, rendered with the checkpoint's own chat template, `add_generation_prompt=True` and the training script's
generation template kwargs (`enable_thinking=False`: Qwen3's template then puts the same empty think block before
the answer that training put; templates without the variable ignore it). A document too long for
`max_input_tokens` is cut by tokens before templating, keeping its start, so the chat scaffolding and the
generation prompt always survive (the transformers and vllm backends, and the openai backend when `model_path` is a
local checkpoint with a tokenizer; otherwise the server sees the whole document).

Every backend post-processes the answer the same way (`postprocess`): special tokens removed, stripped, a leading
`<think>...</think>` block dropped, first non-empty line kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import os
import re
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypedDict, runtime_checkable

from qc_assets.chat_format import GENERATION_TEMPLATE_KWARGS, encode_rendered, messages_for, render_prompt

if TYPE_CHECKING:
    from vllm.inputs import TokensPrompt

BACKENDS: tuple[str, ...] = ("transformers", "vllm", "openai")
PROGRESS_INTERVAL_S = 5.0
IM_END = "<|im_end|>"

Log = Callable[[str], Any]


def _no_log(message: str) -> None:
    return None


class GeneratorUnavailable(RuntimeError):
    """The backend cannot run here (its library is not installed); the message says how to get it."""


class GenerationFailed(RuntimeError):
    """A request failed for good (the openai backend, after the SDK's retries)."""


@dataclass(frozen=True)
class GenerationRequest:
    key: Hashable  # opaque, returned with the result
    category: str  # one of qc_assets.categories.CATEGORY_NAMES: the system turn, as in SFT
    text: str  # the document: the user turn


@dataclass(frozen=True)
class GeneratedQuery:
    key: Hashable
    query: str  # the decoded answer: special tokens removed, stripped, first line only
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class TokenCaps:
    """Most new tokens per answer, by category name; `default` for any category not named."""

    default: int
    by_category: Mapping[str, int] = field(default_factory=dict)

    def __call__(self, category: str) -> int:
        return self.by_category.get(category, self.default)

    @property
    def longest(self) -> int:
        return max([self.default, *self.by_category.values()])

    @classmethod
    def of(cls, caps: int | TokenCaps) -> TokenCaps:
        caps = caps if isinstance(caps, TokenCaps) else cls(caps)
        if min([caps.default, *caps.by_category.values()]) < 1:
            raise ValueError(f"every max_new_tokens must be at least 1, got {caps}")
        return caps


@runtime_checkable
class QueryGenerator(Protocol):
    name: str

    def generate(self, requests: Sequence[GenerationRequest], log: Log = _no_log) -> list[GeneratedQuery]:
        """One result per request, in request order."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Prompt and answer, shared by all backends


_LEADING_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


def postprocess(text: str | None) -> str:
    """Stripped, without a leading think block, first non-empty line only ("" when there is none). An answer cut at
    its token cap can end inside a character's bytes, which decode as U+FFFD: not text, so they go."""
    text = (text or "").strip().rstrip("\ufffd")
    text = _LEADING_THINK.sub("", text, count=1)
    if text.lstrip().startswith("<think>"):  # an unclosed think block (cut off at max tokens)
        text = text.lstrip()[len("<think>") :]
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def decode_answer(tokenizer, token_ids: Sequence[int]) -> str:
    """The query in generated tokens, decoded by the checkpoint's tokenizer, whichever engine generated them: the
    same tokens give the same query."""
    return postprocess(tokenizer.decode(list(token_ids), skip_special_tokens=True))


class PromptBuilder:
    """Templated prompt token ids no longer than max_input_tokens, the document cut by tokens if need be."""

    def __init__(self, tokenizer, max_input_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens

    def encode(self, prompt: str) -> list[int]:
        return encode_rendered(self.tokenizer, prompt)

    def build(self, category: str, text: str) -> tuple[str, list[int], str]:
        """(prompt, prompt token ids, the document as it went into the prompt)."""
        prompt = render_prompt(self.tokenizer, category, text)
        ids = self.encode(prompt)
        if len(ids) <= self.max_input_tokens:
            return prompt, ids, text
        cut = self._prefixes(text)
        document_tokens = cut.count
        keep = max(0, document_tokens - (len(ids) - self.max_input_tokens))
        while True:
            kept = cut.prefix(keep)
            prompt = render_prompt(self.tokenizer, category, kept)
            ids = self.encode(prompt)
            if len(ids) <= self.max_input_tokens:
                return prompt, ids, kept
            if keep == 0:
                raise ValueError(
                    f"max_input_tokens={self.max_input_tokens} is too small: the chat template alone takes "
                    f"{len(ids)} tokens for category {category!r}"
                )
            # Token boundaries can shift where the cut meets the template; shave off the excess and try again.
            keep = max(0, keep - max(1, len(ids) - self.max_input_tokens))

    def _prefixes(self, text: str) -> _Prefixes:
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return _Prefixes(text, len(encoded["input_ids"]), offsets=list(encoded["offset_mapping"]))
        except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer: no offsets
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return _Prefixes(text, len(ids), ids=list(ids), tokenizer=self.tokenizer)


class _Prefixes:
    def __init__(self, text: str, count: int, offsets=None, ids=None, tokenizer=None) -> None:
        self.text, self.count, self.offsets, self.ids, self.tokenizer = text, count, offsets, ids, tokenizer

    def prefix(self, tokens: int) -> str:
        """The document's first `tokens` tokens, as the original characters where offsets are known."""
        if tokens <= 0:
            return ""
        if tokens >= self.count:
            return self.text
        if self.offsets is not None:
            return self.text[: self.offsets[tokens - 1][1]]
        return self.tokenizer.decode(self.ids[:tokens]).rstrip("\ufffd")


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's eos, the checkpoint's generation eos ids, and `<|im_end|>` when the vocabulary has it."""
    ids: list[int] = []

    def add(value) -> None:
        if value is None:
            return
        for item in value if isinstance(value, (list, tuple, set)) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)

    add(tokenizer.eos_token_id)
    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    if IM_END in tokenizer.get_vocab():
        add(tokenizer.convert_tokens_to_ids(IM_END))
    if not ids:
        raise ValueError("the tokenizer has no eos token and the checkpoint names none: generation could not stop")
    return ids


class _Progress:
    """Counts requests and tokens; logs a line every PROGRESS_INTERVAL_S seconds and at the end."""

    def __init__(self, backend: str, total: int, log: Log, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.backend, self.total, self.log, self.interval_s = backend, total, log, interval_s
        self.done = self.input_tokens = self.output_tokens = 0
        self.started = self.last = time.monotonic()

    def add(self, requests: int, input_tokens: int, output_tokens: int) -> None:
        self.done += requests
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        now = time.monotonic()
        if now - self.last >= self.interval_s and self.done < self.total:
            self.last = now
            self.log(self.line())

    def line(self, prefix: str = "") -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.backend}: {prefix}{self.done}/{self.total} requests in {elapsed:.1f}s "
            f"({self.done / elapsed:.1f} req/s, {self.input_tokens / elapsed:.0f} input tok/s, "
            f"{self.output_tokens / elapsed:.0f} output tok/s)"
        )

    def finish(self) -> None:
        self.log(self.line("done: "))


# ---------------------------------------------------------------------------------------------------------------
# transformers


class TransformersGenerator:
    """Batched `model.generate` with left padding; bf16 on CUDA, fp32 on CPU."""

    name = "transformers"

    def __init__(
        self, model_path: str, *, batch_size: int, max_new_tokens: TokenCaps, temperature: float, max_input_tokens: int
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self._torch = torch
        self.model_path = str(model_path)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # Decoder-only generation continues from the last position, so every prompt has to end there.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{self.model_path}: the tokenizer has neither a pad nor an eos token")
        self.pad_id = int(self.tokenizer.pad_token_id)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.stop_ids = stop_token_ids(self.tokenizer, model.generation_config)
        self._stop = set(self.stop_ids)
        # Our own generation config, not merged with the checkpoint's (Qwen3 ships do_sample/top_k/top_p defaults):
        # greedy at temperature 0, else plain sampling at that temperature, as the vllm backend does.
        sampling = temperature > 0
        model.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens.default,
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_k=0 if sampling else None,
            top_p=1.0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # functools.wraps stub loses `self`
        self.builder = PromptBuilder(self.tokenizer, max_input_tokens)

    def generate(self, requests: Sequence[GenerationRequest], log: Log = _no_log) -> list[GeneratedQuery]:
        if self.model is None:
            raise RuntimeError("this generator is closed")
        torch = self._torch
        requests = list(requests)
        prompts = [self.builder.build(request.category, request.text)[1] for request in requests]
        results: list[GeneratedQuery | None] = [None] * len(requests)
        progress = _Progress(self.name, len(requests), log)
        log(f"{self.name}: {len(requests)} requests on {self.device.type}, batches of {self.batch_size}")
        for cap, batch in self._batches(requests, prompts):
            padded = self.tokenizer.pad(
                {"input_ids": [prompts[index] for index in batch]}, padding=True, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                output = self.model.generate(**padded, max_new_tokens=cap)
            generated = output[:, padded["input_ids"].shape[1] :].tolist()
            batch_input = batch_output = 0
            for row, index in enumerate(batch):
                tokens = generated[row]
                # Up to and including the first stop token; after it a finished row holds only padding.
                end = next((position + 1 for position, token in enumerate(tokens) if token in self._stop), len(tokens))
                results[index] = GeneratedQuery(
                    key=requests[index].key,
                    query=decode_answer(self.tokenizer, tokens[:end]),
                    input_tokens=len(prompts[index]),
                    output_tokens=end,
                )
                batch_input += len(prompts[index])
                batch_output += end
            progress.add(len(batch), batch_input, batch_output)
        progress.finish()
        return results  # type: ignore[return-value]

    def _batches(self, requests: list[GenerationRequest], prompts: list[list[int]]):
        """(cap, request indices) per batch: one cap per batch, as `generate` takes one; within a cap longest
        first, so similar lengths share a batch (little padding) and the biggest batch runs first."""
        by_cap: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_cap.setdefault(self.max_new_tokens(request.category), []).append(index)
        for cap, indices in sorted(by_cap.items()):
            indices.sort(key=lambda index: -len(prompts[index]))
            for start in range(0, len(indices), self.batch_size):
                yield cap, indices[start : start + self.batch_size]

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        del self.model
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# vLLM (offline engine)


class VLLMGenerator:
    """vLLM's offline engine, fed the same token ids the transformers backend builds (same template, same cut).

    Prompts go in as `{"prompt_token_ids": ...}` (vLLM's TokensPrompt) rather than through `LLM.chat`, so the
    rendering and the truncation are this module's, identical across backends; vLLM does the batching itself
    (continuous batching), and is called in chunks only so progress can be logged.
    """

    name = "vllm"

    def __init__(
        self, model_path: str, *, batch_size: int, max_new_tokens: TokenCaps, temperature: float, max_input_tokens: int
    ) -> None:
        try:
            import vllm
        except ImportError as error:
            raise GeneratorUnavailable(
                "the vllm backend needs the `gpu` extra: pip install -e '.[gpu]' on a CUDA machine "
                f"(import vllm failed: {error})"
            ) from None
        from transformers import AutoTokenizer

        self.model_path = str(model_path)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        # Chunks of at least 1024 prompts keep vLLM's scheduler full; the chunking only paces the progress log.
        self.chunk_size = max(batch_size, 1024)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.builder = PromptBuilder(self.tokenizer, max_input_tokens)
        import torch

        on_gpu = torch.cuda.is_available()
        # The longest sequence this generator can make: prompts are cut to max_input_tokens. Bounding it keeps vLLM
        # from reserving for the checkpoint's full context (40k for Qwen3). On a CPU (vLLM's CPU build) the engine
        # runs fp32, as the transformers backend does there, and eagerly: compiling costs more than it saves.
        self.llm: vllm.LLM | None = vllm.LLM(
            model=self.model_path,
            dtype="bfloat16" if on_gpu else "float32",
            enforce_eager=not on_gpu,
            max_model_len=max_input_tokens + max_new_tokens.longest,
        )
        self._vllm = vllm
        # vLLM stops on the checkpoint's eos ids by itself; <|im_end|> is named too in case the config lacks it.
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._sampling_by_cap: dict[int, Any] = {}

    def generate(self, requests: Sequence[GenerationRequest], log: Log = _no_log) -> list[GeneratedQuery]:
        if self.llm is None:
            raise RuntimeError("this generator is closed")
        requests = list(requests)
        progress = _Progress(self.name, len(requests), log)
        log(f"{self.name}: {len(requests)} requests, chunks of {self.chunk_size}")
        results: list[GeneratedQuery] = []
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start : start + self.chunk_size]
            prompts: list[TokensPrompt] = [
                {"prompt_token_ids": self.builder.build(request.category, request.text)[1]} for request in chunk
            ]
            sampling = [self.sampling_params(request.category) for request in chunk]
            # sampling_params by keyword: positional in recent vLLM, keyword-only in some older releases.
            outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
            chunk_input = chunk_output = 0
            for request, prompt, output in zip(chunk, prompts, outputs, strict=True):
                completion = output.outputs[0]
                input_tokens = len(output.prompt_token_ids or prompt["prompt_token_ids"])
                output_tokens = len(completion.token_ids)
                results.append(
                    GeneratedQuery(
                        key=request.key,
                        query=decode_answer(self.tokenizer, completion.token_ids),
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                    )
                )
                chunk_input += input_tokens
                chunk_output += output_tokens
            progress.add(len(chunk), chunk_input, chunk_output)
        progress.finish()
        return results

    def sampling_params(self, category: str):
        cap = self.max_new_tokens(category)
        if cap not in self._sampling_by_cap:
            self._sampling_by_cap[cap] = self._vllm.SamplingParams(
                temperature=self.temperature, max_tokens=cap, stop_token_ids=self.stop_ids, detokenize=False
            )
        return self._sampling_by_cap[cap]

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        del self.llm
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible server


def _count(mapping: object, name: str) -> int:
    value = mapping.get(name) if isinstance(mapping, dict) else None
    return int(value) if isinstance(value, (int, float)) else 0


class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions server (`vllm serve <checkpoint>`), through the official async SDK.

    The SDK's aiohttp transport and its raw `post` (as the teacher backend uses them), the SDK's own retries (3) for
    rate limits, 5xx, timeouts and connection errors; a request that still fails fails the whole call
    (`GenerationFailed`). At most `concurrency` requests are in flight (an asyncio.Semaphore).
    """

    name = "openai"

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: TokenCaps | int,
        temperature: float,
        max_input_tokens: int,
        base_url: str | None,
        api_key: str | None,
        concurrency: int,
        model_name: str | None,
        timeout_s: float = 600.0,
        max_retries: int = 3,
    ) -> None:
        self.model_path = str(model_path)
        self.model = model_name or self.model_path
        self.base_url = base_url
        self.max_new_tokens = TokenCaps.of(max_new_tokens)
        self.temperature = temperature
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.builder: PromptBuilder | None = None
        if (Path(self.model_path) / "tokenizer_config.json").is_file():
            # The checkpoint is here too: cut long documents exactly as the other backends do.
            from transformers import AutoTokenizer

            self.builder = PromptBuilder(AutoTokenizer.from_pretrained(self.model_path), max_input_tokens)
        self.closed = False

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        text = request.text
        if self.builder is not None:
            text = self.builder.build(request.category, text)[2]
        return {
            "model": self.model,
            "messages": messages_for(request.category, text),
            "max_tokens": self.max_new_tokens(request.category),
            "temperature": self.temperature,
            # vLLM passes these to the chat template (Qwen3: the empty think block, as in training).
            "chat_template_kwargs": dict(GENERATION_TEMPLATE_KWARGS),
        }

    def generate(self, requests: Sequence[GenerationRequest], log: Log = _no_log) -> list[GeneratedQuery]:
        if self.closed:
            raise RuntimeError("this generator is closed")
        requests = list(requests)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._generate(requests, log))
        # Called from inside an event loop (a notebook, an async caller): run on a loop of our own in a thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._generate(requests, log)).result()

    def _client(self):
        from qc_assets.openai_api import async_client

        # A client per call: the aiohttp session belongs to the event loop it was made on.
        return async_client(self.base_url, self._api_key, self.concurrency, self.timeout_s, self.max_retries)

    async def _generate(self, requests: list[GenerationRequest], log: Log) -> list[GeneratedQuery]:
        results: list[GeneratedQuery | None] = [None] * len(requests)
        progress = _Progress(self.name, len(requests), log)
        log(
            f"{self.name}: {len(requests)} requests to {self.base_url} (model {self.model!r}), "
            f"{self.concurrency} at a time"
        )
        semaphore = asyncio.Semaphore(self.concurrency)
        failures: list[BaseException] = []
        pending: set[asyncio.Task] = set()
        client = self._client()

        async def one(index: int, request: GenerationRequest) -> None:
            try:
                result = await self._request(client, request)
                results[index] = result
                progress.add(1, result.input_tokens, result.output_tokens)
            except Exception as error:
                failure = GenerationFailed(f"request {request.key!r} failed: {type(error).__name__}: {error}")
                failure.__cause__ = error
                failures.append(failure)
            finally:
                semaphore.release()

        try:
            for index, request in enumerate(requests):
                await semaphore.acquire()
                if failures:
                    semaphore.release()
                    break
                task = asyncio.create_task(one(index, request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await client.close()
        if failures:
            raise failures[0]
        progress.finish()
        return results  # type: ignore[return-value]

    async def _request(self, client, request: GenerationRequest) -> GeneratedQuery:
        from qc_assets.openai_api import post_chat_completion

        completion = await post_chat_completion(client, self.body(request))
        choices = completion.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise ValueError(f"the response has no choices: {json.dumps(completion, ensure_ascii=False)[:200]}")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        usage = completion.get("usage")
        return GeneratedQuery(
            key=request.key,
            query=postprocess(content if isinstance(content, str) else None),
            input_tokens=_count(usage, "prompt_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
        )

    def close(self) -> None:
        self.closed = True  # each call closes its own client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------


class _CommonOptions(TypedDict):
    max_new_tokens: TokenCaps
    temperature: float
    max_input_tokens: int


def open_generator(
    backend: str,
    model_path: str,
    *,
    batch_size: int = 64,
    max_new_tokens: int | TokenCaps = 64,
    temperature: float = 0.0,
    max_input_tokens: int = 2048,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int = 64,
    model_name: str | None = None,
) -> QueryGenerator:
    """A generator for `model_path` (a checkpoint directory or hub id) on `backend` ("transformers", "vllm",
    "openai"). `max_new_tokens` caps every answer alike, or each category its own (TokenCaps); `max_input_tokens`
    bounds the whole templated prompt; `base_url`, `api_key`, `concurrency` and `model_name` (default: model_path)
    are the openai backend's; `batch_size` is the transformers batch."""
    caps = TokenCaps.of(max_new_tokens)
    if batch_size < 1 or max_input_tokens < 1 or concurrency < 1:
        raise ValueError("batch_size, max_input_tokens and concurrency must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model_path = str(model_path)
    common: _CommonOptions = {
        "max_new_tokens": caps,
        "temperature": temperature,
        "max_input_tokens": max_input_tokens,
    }
    if backend == "transformers":
        return TransformersGenerator(model_path, batch_size=batch_size, **common)
    if backend == "vllm":
        return VLLMGenerator(model_path, batch_size=batch_size, **common)
    if backend == "openai":
        return OpenAIGenerator(
            model_path, base_url=base_url, api_key=api_key, concurrency=concurrency, model_name=model_name, **common
        )
    raise ValueError(f"unknown generation backend {backend!r}: expected one of {', '.join(BACKENDS)}")
