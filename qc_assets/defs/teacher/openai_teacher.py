"""The `openai` teacher: any OpenAI-compatible chat-completions endpoint, through the official async client.

DeepSeek's API (https://api.deepseek.com) and a vLLM, SGLang or Ollama server work the same way; only how a
request asks for thinking and effort differs (`request_body`). The SDK's own retries are off: this module retries
itself so it can count retries, honour Retry-After across all requests, shrink concurrency on repeated 429s and
treat a thinking model's empty or truncated answers as retryable.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import json
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import openai

from qc_assets.categories import Category, LabelError
from qc_assets.defs.teacher.backends import Budget, LabelOutcome, LabelRequest, TeacherConfigError, Usage
from qc_assets.defs.teacher.key_budget import KeyBudget
from qc_assets.defs.teacher.prices import Price
from qc_assets.openai_api import async_client, post_chat_completion

MAX_RETRY_AFTER_S = 120.0
MAX_BACKOFF_S = 60.0
_REDACTED = "***"
DEEPSEEK_HOST = "api.deepseek.com"
# How endpoints say the model is unknown: DeepSeek's 400 "Model Not Exist", vLLM's 404 "The model `x` does not
# exist.", OpenAI's "model_not_found", Ollama's "model 'x' not found", and "Unknown model".
_UNKNOWN_MODEL = re.compile(r"model\b.*\bnot (exist|found)|model_not_found|unknown model", re.IGNORECASE | re.DOTALL)
# The failures `_after_error` judges; anything else (a cancellation, say) propagates.
_REQUEST_ERRORS = (openai.APIStatusError, openai.APIConnectionError, openai.APIResponseValidationError, ValueError)


@dataclass(frozen=True)
class RequestOptions:
    """What every request asks for beyond the prompt, in the endpoint's dialect. None: not sent, the endpoint
    decides."""

    dialect: Literal["deepseek", "openai-compatible"]
    thinking: Literal["enabled", "disabled"] | None = None
    reasoning_effort: str | None = None
    response_format: Literal["json_schema", "json_object", "none"] = "none"

    @classmethod
    def for_endpoint(
        cls, base_url: str, thinking: str | None, reasoning_effort: str | None, response_format: str | None
    ) -> RequestOptions:
        """DeepSeek's API takes `json_object` (its documented JSON mode); other servers get what they are told."""
        dialect: Literal["deepseek", "openai-compatible"] = (
            "deepseek" if urlsplit(base_url).hostname == DEEPSEEK_HOST else "openai-compatible"
        )
        # Settings validate these, but a resource's config in the launchpad takes any string.
        match thinking:
            case "enabled" | "disabled" | None:
                pass
            case _:
                raise ValueError(f"QC_TEACHER_THINKING={thinking!r}: expected `enabled` or `disabled`")
        match response_format:
            case "json_schema" | "json_object" | "none":
                chosen_format = response_format
            case None | "":
                chosen_format = "json_object" if dialect == "deepseek" else "none"
            case _:
                raise ValueError(
                    f"QC_TEACHER_RESPONSE_FORMAT={response_format!r}: expected `json_schema`, `json_object` or `none`"
                )
        return cls(dialect, thinking, reasoning_effort, chosen_format)


def request_body(model: str, category: Category, text: str, max_tokens: int, options: RequestOptions) -> dict:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": category.prompt(text)}],
        "max_tokens": max_tokens,
    }
    if options.thinking is not None:
        if options.dialect == "deepseek":
            body["thinking"] = {"type": options.thinking}
        else:
            # vLLM and SGLang hand these to the model's chat template; Qwen3's, for one, reads enable_thinking.
            body["chat_template_kwargs"] = {"enable_thinking": options.thinking == "enabled"}
    if options.reasoning_effort is not None:
        body["reasoning_effort"] = options.reasoning_effort
    if options.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif options.response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": category.name, "schema": category.json_schema, "strict": True},
        }
    return body


def says_unknown_model(error: openai.APIStatusError) -> bool:
    return error.status_code in (400, 404) and _UNKNOWN_MODEL.search(str(error)) is not None


class AdaptiveLimit:
    """Concurrency that halves on rate limiting and grows back one slot per window of successes (AIMD).

    A Retry-After pauses every new request, not only the one that got it: the limit is the provider's, per key.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.active = 0
        self.lowest = maximum
        self._condition = asyncio.Condition()
        self._paused_until = 0.0
        self._successes = 0
        self._last_cut = float("-inf")

    async def acquire(self) -> None:
        async with self._condition:
            while True:
                wait = self._paused_until - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._condition.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
                if self.active < self.limit:
                    self.active += 1
                    return
                await self._condition.wait()

    async def release(self) -> None:
        async with self._condition:
            self.active -= 1
            self._condition.notify()

    def rate_limited(self, retry_after_s: float | None) -> None:
        now = time.monotonic()
        # One cut per second at most: a burst of 429s from requests already in flight is one signal, not many.
        if now - self._last_cut >= 1.0:
            self.limit = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            self._last_cut = now
            self._successes = 0
        if retry_after_s:
            self._paused_until = max(self._paused_until, now + retry_after_s)

    async def succeeded(self) -> None:
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            async with self._condition:
                self.limit += 1
                self._condition.notify()


def retry_after_seconds(headers) -> float | None:
    """Retry-After as seconds (`retry-after-ms`, delta-seconds or an HTTP date), capped."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(milliseconds) / 1000))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))


def _count(mapping: object, *path: str) -> int:
    for name in path:
        if not isinstance(mapping, dict):
            return 0
        mapping = mapping.get(name)
    return int(mapping) if isinstance(mapping, (int, float)) else 0


def _usage_of(completion: dict, price: Price, asked_at: datetime) -> Usage:
    """Token counts of one completion; DeepSeek reports cache hits as `prompt_cache_hit_tokens`."""
    usage = completion.get("usage")
    input_tokens = _count(usage, "prompt_tokens")
    cached = _count(usage, "prompt_tokens_details", "cached_tokens") or _count(usage, "prompt_cache_hit_tokens")
    output_tokens = _count(usage, "completion_tokens")
    return Usage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output_tokens,
        reasoning_tokens=_count(usage, "completion_tokens_details", "reasoning_tokens"),
        cost_usd=price.cost_usd(input_tokens, cached, output_tokens, asked_at),
    )


def _inline_reasoning(content: str | None) -> str | None:
    if content and "<think>" in content and "</think>" in content:
        return content.split("<think>", 1)[1].split("</think>", 1)[0].strip() or None
    return None


class _Next(enum.Enum):
    """What follows one attempt."""

    DONE = "done"  # the key has its outcome, labelled or not
    RETRY = "retry"  # rate limited: ask again as soon as a slot frees (a 429's Retry-After pauses the slots)
    BACK_OFF = "back_off"  # a server error, timeout or unusable answer: ask again after a jittered wait


def _mark_stopped(outcome: LabelOutcome, budget: Budget) -> None:
    """The budget ran out before this attempt: a key never asked is `stopped`, one that failed stays quarantined."""
    outcome.status = "stopped" if outcome.attempts == 0 else "quarantined"
    outcome.error = f"{budget.stopped_because} after {outcome.attempts} attempts" + (
        f"; last error: {outcome.error}" if outcome.error else ""
    )


class OpenAITeacher:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        price: Price,
        concurrency: int = 100,
        max_attempts: int = 6,
        timeout_s: float = 600.0,
        max_tokens: int = 8192,
        backoff_s: float = 1.0,
        key_budget: KeyBudget | None = None,
        options: RequestOptions | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.teacher = model
        self.key_budget = key_budget
        self.base_url = base_url
        self.price = price
        self.options = options or RequestOptions.for_endpoint(base_url, None, None, None)
        self.clock = clock
        # Set by the first answer that would fail every request; requests still waiting for a slot then stop.
        self.refused: TeacherConfigError | None = None
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.max_tokens = max_tokens
        self.backoff_s = backoff_s
        self._secret = api_key or None
        self._client = async_client(base_url, api_key, concurrency, timeout_s, max_retries=0)
        self.limit: AdaptiveLimit | None = None
        self.requests = 0

    def prompt_version(self, category: Category) -> str:
        return category.prompt_version

    def redact(self, text: str | None) -> str | None:
        if text is None or not self._secret:
            return text
        return text.replace(self._secret, _REDACTED)

    async def aclose(self) -> None:
        await self._client.close()
        if self.key_budget is not None:
            self.key_budget.close()

    async def label_all(
        self, requests: Iterable[LabelRequest], budget: Budget, record: Callable[[LabelOutcome], None] | None = None
    ) -> AsyncIterator[LabelOutcome]:
        self.limit = AdaptiveLimit(self.concurrency)
        pending: set[asyncio.Task] = set()
        finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
        queued = iter(requests)
        exhausted = False
        try:
            while True:
                # Twice the concurrency is queued so a freed slot never waits for this loop to come round.
                while not exhausted and len(pending) < 2 * self.concurrency and budget.may_start():
                    request = next(queued, None)
                    if request is None:
                        exhausted = True
                        break
                    task = asyncio.create_task(self._label(request, budget, record))
                    task.add_done_callback(finished.put_nowait)
                    pending.add(task)
                if not pending:
                    return
                task = await finished.get()
                pending.discard(task)
                yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    @property
    def _limit(self) -> AdaptiveLimit:
        assert self.limit is not None, "label_all sets the limit before any request"
        return self.limit

    async def _label(
        self, request: LabelRequest, budget: Budget, record: Callable[[LabelOutcome], None] | None
    ) -> LabelOutcome:
        body = request_body(self.teacher, request.category, request.text, self.max_tokens, self.options)
        outcome = LabelOutcome(request=request, status="quarantined", retries=Counter())
        while outcome.attempts < self.max_attempts:
            then = await self._attempt(body, outcome, budget, record)
            if then is _Next.DONE:
                break
            if then is _Next.BACK_OFF:
                await asyncio.sleep(self._backoff(outcome.attempts))
        return outcome

    async def _attempt(
        self, body: dict, outcome: LabelOutcome, budget: Budget, record: Callable[[LabelOutcome], None] | None
    ) -> _Next:
        """One request, made and recorded while holding a slot of this run's limit and one of the key's budget."""
        await self._limit.acquire()
        # This run's own limit first, then a slot of the key's budget shared with every other run.
        slot = await self.key_budget.acquire() if self.key_budget is not None else None
        try:
            then = await self._ask(body, outcome, budget)
            # Recorded while this request's slots are held, so that no other request is sent, and paid for,
            # while this answer is still unrecorded: a SIGKILL loses at most the requests in flight.
            if record is not None and (then is _Next.DONE or outcome.attempts >= self.max_attempts):
                record(outcome)
            return then
        finally:
            if slot is not None and self.key_budget is not None:
                self.key_budget.release(slot)
            await self._limit.release()

    async def _ask(self, body: dict, outcome: LabelOutcome, budget: Budget) -> _Next:
        """Send the request, unless the run was refused or the budget is spent, and judge what comes back."""
        if self.refused is not None:
            raise self.refused
        if not budget.may_start():
            _mark_stopped(outcome, budget)
            return _Next.DONE
        outcome.attempts += 1
        self.requests += 1
        asked_at = self.clock()
        started = time.perf_counter()
        try:
            completion = await post_chat_completion(self._client, body)
        except _REQUEST_ERRORS as error:
            return self._after_error(outcome, error)
        usage = _usage_of(completion, self.price, asked_at)
        outcome.usage.add(usage)
        budget.charge(usage.cost_usd)
        if not self._accept(outcome, completion, outcome.request.category):
            return _Next.BACK_OFF
        outcome.latency_s = time.perf_counter() - started
        await self._limit.succeeded()
        return _Next.DONE

    def _after_error(self, outcome: LabelOutcome, error: Exception) -> _Next:
        """Retry, give up on this key, or (raising) stop the run, as the error says."""
        match error:
            case openai.RateLimitError():
                retry_after = retry_after_seconds(error.response.headers)
                self._limit.rate_limited(retry_after)
                if retry_after and self.key_budget is not None:
                    self.key_budget.pause(retry_after)
                self._failed(outcome, "rate_limited", error)
                return _Next.RETRY
            case openai.AuthenticationError() | openai.PermissionDeniedError() | openai.NotFoundError():
                raise self._refuse(error) from None
            case openai.BadRequestError() | openai.UnprocessableEntityError() if says_unknown_model(error):
                raise self._refuse(error) from None
            case openai.BadRequestError() | openai.UnprocessableEntityError():
                # The request itself is wrong for this document (too long, say): retrying cannot help.
                self._failed(outcome, f"http_{error.status_code}", error)
                return _Next.DONE
            case openai.APIStatusError():
                self._failed(outcome, f"http_{error.status_code}", error)
            case openai.APITimeoutError():
                self._failed(outcome, "timeout", error)
            case openai.APIConnectionError():
                self._failed(outcome, "connection", error)
            case _:
                self._failed(outcome, "malformed_response", error)
        # A struggling server answered or did not: asking again at once would add to its load.
        return _Next.BACK_OFF

    def _accept(self, outcome: LabelOutcome, completion: dict, category: Category) -> bool:
        choices = completion.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        message = choice.get("message") if choice else None
        if choice is None or not isinstance(message, dict):
            outcome.retries["malformed_response"] += 1
            outcome.error = "the response has no choices[0].message"
            outcome.raw_output = json.dumps(completion, ensure_ascii=False)[:2000]
            return False
        content = message.get("content")
        content = content if isinstance(content, str) else None
        outcome.raw_output = content
        if choice.get("finish_reason") == "length":
            outcome.retries["truncated"] += 1
            outcome.error = f"{category.name}: output cut off at max_tokens={self.max_tokens} (finish_reason=length)"
            return False
        try:
            outcome.query = category.parse(content)
        except LabelError as error:
            outcome.retries["empty" if not (content or "").strip() else "invalid"] += 1
            outcome.error = str(error)
            return False
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        outcome.reasoning = reasoning if isinstance(reasoning, str) else _inline_reasoning(content)
        outcome.status = "labeled"
        outcome.error = None
        return True

    def _refuse(self, error: openai.APIStatusError) -> TeacherConfigError:
        """The error that stops the run: every other request would get the same answer."""
        said = f"({error.status_code}: {self.redact(str(error))})"
        if says_unknown_model(error):
            self.refused = TeacherConfigError(
                f"QC_TEACHER_MODEL={self.teacher!r}: {self.base_url} has no such model {said}; set QC_TEACHER_MODEL "
                f"to a model it serves (GET {self.base_url.rstrip('/')}/models lists them)"
            )
        else:
            self.refused = TeacherConfigError(
                f"{self.base_url} refused the request {said}; check QC_TEACHER_BASE_URL, QC_TEACHER_MODEL "
                f"({self.teacher!r}) and QC_TEACHER_API_KEY"
            )
        return self.refused

    def _failed(self, outcome: LabelOutcome, reason: str, error: Exception) -> None:
        outcome.retries[reason] += 1
        body = getattr(error, "body", None)
        outcome.error = self.redact(f"{reason}: {error}")
        if body is not None:
            outcome.raw_output = self.redact(str(body))

    def _backoff(self, attempts: int) -> float:
        """Full jitter (AWS's recipe)."""
        return random.uniform(0, min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 1)))
