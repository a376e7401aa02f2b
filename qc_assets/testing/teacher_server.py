"""A fault-injecting OpenAI chat-completions server for offline tests and benchmarks of the teacher client.

It runs as its own process (so a test can SIGKILL the client and keep the server), speaks HTTP/1.1 on 127.0.0.1
through aiohttp's low-level server on uvloop (no router, no access log: a request costs little enough that a
benchmark measures the client), and answers like an R1-style teacher: `reasoning_content` plus a `{"query": ...}`
JSON whose label passes `Category.validate`.

A request is identified by its key (category, text_key): the category is the one whose instruction the last user
message starts with, the text is what `Category.prompt` put between "<文章>" and "</文章>". The server counts the
requests per key (attempt 1, 2, ...) and picks a behaviour from a plan:

    {"latency_ms": 0,
     "rules": [{"behavior": "rate_limit", "categories": ["title"], "fraction": 0.5, "attempts": [1],
                "retry_after": 1}, ...]}

The first matching rule wins, no match is "ok". See `BEHAVIORS` and `validate_plan` for the rule fields.
With `"models": [...]` the server serves only those models: a request for another one is answered as DeepSeek
answers a retired or mistyped name (400 "Model Not Exist"), or as vLLM does with `"unknown_model_status": 404`.
That check comes before the rules, and a refused request is not an attempt.

Command line:
    python -m qc_assets.testing.teacher_server --host 127.0.0.1 --port 0 --plan PLAN.json --log LOG.jsonl \
        [--api-key K] --ready-file PATH [--parent-pid PID]
From Python: `with run_teacher_server(tmp_path, plan) as server: ... server.base_url ... server.requests()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from qc_assets.categories import CATEGORIES, Category, LabelError
from qc_assets.settings import DEFAULT_OPENAI_TEACHER_MODEL

BEHAVIORS: frozenset[str] = frozenset(
    {
        "ok",
        "rate_limit",
        "server_error",
        "unavailable",
        "slow",
        "drop",
        "malformed_body",
        "fenced",
        "think_inline",
        "chatter",
        "empty_content",
        "truncated",
        "invalid_label",
        "over_cap",
        "raw",
    }
)
# The 200 answers whose content carries a valid label: only these count as "delivered" in the log.
OK_FAMILY: frozenset[str] = frozenset({"ok", "fenced", "think_inline", "chatter", "slow", "over_cap"})
DEFAULT_MODEL = DEFAULT_OPENAI_TEACHER_MODEL
# Request fields beyond the prompt that the client may send; logged as "options" so tests see what went out.
REQUEST_OPTIONS = ("thinking", "chat_template_kwargs", "reasoning_effort", "response_format")
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODEL_PATHS = frozenset({"/v1/models", "/models"})
RELOAD_PATH = "/_teacher/reload"  # harness-only: forces a plan re-read; never logged, never needs the key
PLAN_CHECK_INTERVAL_S = 0.2
SHUTDOWN_TIMEOUT_S = 0.5  # in-flight requests (a "slow" one waits 30 s) get this long, then are cancelled

_DOC_OPEN = "<文章>\n"
_DOC_CLOSE = "\n</文章>"
# Fragment boundaries for the synthetic labels: whitespace, punctuation, brackets, and characters that would
# confuse `Category.parse` (braces, backticks, angle brackets).
_SPLIT = re.compile(r"[\s\u3000。、，,．.！!？?「」『』（）()\[\]【】〈〉《》:：;；\"'“”‘’・…/\\|<>{}`]+")
_QUESTION_SUFFIX = {"query": "とは?", "alt_query": "について知りたい", "faq": "とは何ですか?"}


def text_key(text: str) -> str:
    """The server's key for a document text, exactly as it appears between the tags of the prompt.

    `Category.prompt` strips "<文章>"-like tags from the document, so for a document that contains them, hash the
    stripped text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _fragments(text: str) -> list[str]:
    return [fragment for fragment in _SPLIT.split(text) if fragment]


def label_for(category: str, text: str) -> str:
    """The label the "ok" family answers with for this category and document text (already validated)."""
    cat = CATEGORIES[category]
    fragments = _fragments(text) or [f"文書{text_key(text)[:6]}"]
    first = fragments[0]
    if cat.max_terms is not None:  # keyword categories: two or three fragments joined by a space
        if len(fragments) >= 2:
            terms = [fragment[:12] for fragment in fragments[:3]]
        elif len(first) >= 2:
            half = len(first) // 2
            terms = [first[:half][:12], first[half:][:12]]
        else:
            terms = [first, "文書"]
        label = " ".join(terms)
    elif category in _QUESTION_SUFFIX:
        label = first[:30] + _QUESTION_SUFFIX[category]
    elif category == "summary":
        label = "".join(fragments[:4])[: cat.max_chars - 8] + "についての文章。"
    else:  # title and any other category: the first fragment, capped
        label = first
    label = label[: cat.max_chars]
    try:
        return cat.validate(label)
    except LabelError:
        return cat.validate("文書 " + text_key(text)[:6])


def _over_cap_label(category: str, text: str, length: int) -> str:
    """The label the "over_cap" behaviour answers with: one term of `length` characters from the document, a valid
    label over its category's cap when `length` is."""
    filler = "".join(_fragments(text)) or "文書"
    return CATEGORIES[category].validate((filler * (length // len(filler) + 1))[:length])


def _reasoning_for(cat: Category, text: str) -> str:
    topic = (_fragments(text) or ["文書"])[0][:20]
    return f"文章を読んだ。主な話題は「{topic}」である。{cat.name} の条件({cat.max_chars}文字以内)に合わせて、JSON で出力する。"


def validate_plan(plan: dict | None) -> dict:
    """Check a plan and return it normalised ({"latency_ms": float, "rules": [...]}); raises ValueError."""
    plan = dict(plan or {})
    latency = plan.get("latency_ms", 0)
    if not isinstance(latency, (int, float)) or latency < 0:
        raise ValueError(f"latency_ms must be a non-negative number, got {latency!r}")
    rules = plan.get("rules", [])
    if not isinstance(rules, list):
        raise ValueError("rules must be a list")
    for index, rule in enumerate(rules):
        where = f"rule {index}"
        if not isinstance(rule, dict):
            raise ValueError(f"{where}: must be an object")
        behavior = rule.get("behavior")
        if behavior not in BEHAVIORS:
            raise ValueError(f"{where}: unknown behavior {behavior!r}; known: {sorted(BEHAVIORS)}")
        categories = rule.get("categories")
        if categories is not None and (
            not isinstance(categories, list) or any(name not in CATEGORIES for name in categories)
        ):
            raise ValueError(f"{where}: categories must be a list of {sorted(CATEGORIES)}")
        fraction = rule.get("fraction")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(f"{where}: fraction must be in [0, 1]")
        attempts = rule.get("attempts")
        if attempts is not None and (
            not isinstance(attempts, list) or not all(isinstance(a, int) and a >= 1 for a in attempts)
        ):
            raise ValueError(f"{where}: attempts must be a list of integers >= 1")
        for name in ("text_contains", "content"):
            if name in rule and not isinstance(rule[name], str):
                raise ValueError(f"{where}: {name} must be a string")
        keys = rule.get("text_keys")
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise ValueError(f"{where}: text_keys must be a list of strings")
        if behavior == "raw" and "content" not in rule:
            raise ValueError(f"{where}: raw needs a content string")
        if "length" in rule and not (isinstance(rule["length"], int) and rule["length"] >= 1):
            raise ValueError(f"{where}: length must be an integer >= 1")
    models = plan.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ValueError("models must be a list of model names")
    if plan.get("unknown_model_status", 400) not in (400, 404):
        raise ValueError("unknown_model_status must be 400 (DeepSeek) or 404 (vLLM)")
    plan["latency_ms"] = float(latency)
    plan["rules"] = rules
    return plan


def _unknown_model_body(model: str, status: int) -> bytes:
    if status == 404:  # vLLM's OpenAI server
        return _error_body(f"The model `{model}` does not exist.", "NotFoundError", None)
    return _error_body("Model Not Exist", "invalid_request_error", "invalid_request_error")  # DeepSeek's, verbatim


def _fraction_selects(index: int, category: str, key: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{index}|{category}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    t: float


@dataclass(slots=True)
class _Outcome:
    status: int | None  # None, with no body: drop the connection
    body: bytes | None
    due: float  # loop time at which to answer
    deliverable: bool
    log: dict | None  # None: not logged (harness requests)
    headers: tuple[tuple[str, str], ...] = ()


class _Plan:
    """The plan file, re-read when its (mtime, inode, size) changes; checked at most every 0.2 s."""

    def __init__(self, path: Path | None, plan: dict | None = None):
        self.path = path
        self.signature: tuple | None = None
        self.checked = 0.0
        self.version = 0
        self.plan = validate_plan(plan)
        if path is not None:
            self.reload(force=True)

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self.checked < PLAN_CHECK_INTERVAL_S):
            return
        self.checked = now
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        signature = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        if signature == self.signature:
            return
        try:
            plan = validate_plan(json.loads(Path(self.path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:  # a half-written or bad plan: keep the old one, try again later
            print(f"teacher_server: plan not loaded: {error}", file=sys.stderr, flush=True)
            return
        self.signature = signature
        self.plan = plan
        self.version += 1


class TeacherHandler:
    """Turns a parsed request into an `_Outcome`; all state (attempt counts, plan, log file) lives here."""

    def __init__(self, plan: _Plan, log_path: Path | None, api_key: str | None):
        self.plan = plan
        self.api_key = api_key
        self.expected_auth = f"Bearer {api_key}" if api_key else None
        self.attempts: dict[tuple[str, str], int] = {}
        self.sequence = itertools.count(1)
        self.log_file = open(log_path, "a", encoding="utf-8") if log_path is not None else None  # noqa: SIM115
        # longest instruction first, so that no category shadows another whose instruction extends it
        self.instructions = sorted(
            ((cat.instruction, cat) for cat in CATEGORIES.values()), key=lambda pair: -len(pair[0])
        )

    def write_log(self, entry: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.log_file.flush()

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    # -- request handling --------------------------------------------------------------------------------------

    def prepare(self, request: _Request, now: float) -> _Outcome:
        if request.path == RELOAD_PATH:
            self.plan.reload(force=True)
            return _Outcome(200, json.dumps({"plan_version": self.plan.version}).encode(), now, False, None)
        self.plan.reload()
        plan = self.plan.plan
        due = now + plan["latency_ms"] / 1000.0
        auth_ok = self.expected_auth is None or request.headers.get("authorization") == self.expected_auth
        log: dict[str, Any] = {
            "t": request.t,
            "t_end": None,
            "method": request.method,
            "path": request.path,
            "category": None,
            "text_key": None,
            "attempt": None,
            "behavior": None,
            "rule": None,
            "status": None,
            "delivered": False,
            "auth_ok": auth_ok,
        }

        def error(status: int, behavior: str, body: bytes, headers=(), delay: float = 0.0) -> _Outcome:
            log["behavior"] = behavior
            return _Outcome(status, body, due + delay, False, log, headers)

        if request.path in MODEL_PATHS:
            if request.method != "GET":
                return error(405, "method_not_allowed", _error_body("use GET", "invalid_request_error", None))
            if not auth_ok:
                return error(
                    401, "auth", _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
                )
            log["behavior"] = "models"
            served = plan.get("models") or [DEFAULT_MODEL]
            body = json.dumps(
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "teacher-server"} for m in served],
                }
            ).encode()
            return _Outcome(200, body, due, False, log)
        if request.path not in CHAT_PATHS:
            return error(
                404, "not_found", _error_body(f"no route {request.path}", "invalid_request_error", "not_found")
            )
        if request.method != "POST":
            return error(405, "method_not_allowed", _error_body("use POST", "invalid_request_error", None))

        try:
            payload = json.loads(request.body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            messages = payload.get("messages")
            if not isinstance(messages, list):
                raise ValueError("messages must be a list")
        except ValueError as exc:
            if not auth_ok:
                return error(
                    401, "auth", _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
                )
            return error(400, "bad_request", _error_body(f"invalid body: {exc}", "invalid_request_error", None))
        requested_model = payload.get("model")
        model = requested_model if isinstance(requested_model, str) else DEFAULT_MODEL
        log["model"] = model
        log["options"] = {name: payload[name] for name in REQUEST_OPTIONS if name in payload}
        user = next(
            (
                _content_text(m.get("content"))
                for m in reversed(messages)
                if isinstance(m, dict) and m.get("role") == "user"
            ),
            None,
        )
        found = self._identify(user)
        if found is not None:
            cat, text = found
            key = text_key(text)
            log["category"], log["text_key"] = cat.name, key
        if not auth_ok:  # checked before the rules; a refused request is not an attempt
            return error(
                401, "auth", _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            )
        if found is None:
            return error(
                400,
                "bad_request",
                _error_body(
                    "unrecognised prompt: no category instruction or <文章> block",
                    "invalid_request_error",
                    None,
                    "messages",
                ),
            )
        if payload.get("stream"):
            return error(
                400,
                "bad_request",
                _error_body("stream is not supported by this server", "invalid_request_error", None, "stream"),
            )
        if plan.get("models") is not None and model not in plan["models"]:
            status = plan.get("unknown_model_status", 400)
            return error(status, "unknown_model", _unknown_model_body(model, status))
        attempt = self.attempts.get((cat.name, key), 0) + 1
        self.attempts[(cat.name, key)] = attempt
        log["attempt"] = attempt
        rule_index, rule = self._match(plan["rules"], cat.name, key, text, attempt)
        behavior = rule.get("behavior", "ok")
        log["behavior"], log["rule"] = behavior, rule_index

        if behavior == "rate_limit":
            retry_after = rule.get("retry_after", 1)
            return error(
                429,
                behavior,
                _error_body("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
                (("retry-after", str(retry_after)),),
            )
        if behavior == "server_error":
            return error(
                rule.get("status", 500),
                behavior,
                _error_body("The server had an error while processing your request.", "server_error", None),
            )
        if behavior == "unavailable":
            headers = (("retry-after", str(rule["retry_after"])),) if "retry_after" in rule else ()
            return error(
                rule.get("status", 503),
                behavior,
                _error_body(
                    "The engine is currently overloaded, please try again later.", "server_error", "service_unavailable"
                ),
                headers,
            )
        if behavior == "drop":
            return _Outcome(None, None, due, False, log)
        if behavior == "malformed_body":
            body = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assist'
            return _Outcome(200, body, due, False, log)

        prompt_chars = sum(len(_content_text(m.get("content")) or "") for m in messages if isinstance(m, dict))
        if behavior == "over_cap":
            label = _over_cap_label(cat.name, text, rule.get("length", cat.max_chars + 1))
        else:
            label = label_for(cat.name, text)
        answer = json.dumps({"query": label}, ensure_ascii=False)
        reasoning: str | None = _reasoning_for(cat, text)
        finish = "stop"
        if behavior in ("ok", "slow", "over_cap"):
            content = answer
        elif behavior == "fenced":
            content = f"```json\n{answer}\n```"
        elif behavior == "think_inline":
            content, reasoning = f"<think>\n{reasoning}\n</think>\n{answer}", None
        elif behavior == "chatter":
            content = f"はい。以下が出力です。\n{answer}\n以上です。"
        elif behavior == "empty_content":
            content = ""
        elif behavior == "truncated":
            content, finish = answer[: max(1, len(answer) // 2)], "length"
        elif behavior == "invalid_label":  # the label on two lines: no validator takes it
            content = json.dumps({"query": f"{label}\n{label}"}, ensure_ascii=False)
        else:  # raw
            content = rule["content"]
            reasoning = rule.get("reasoning_content", reasoning)
        if behavior in OK_FAMILY:
            log["label"] = label
        prompt_tokens = max(1, prompt_chars // 2)
        cached = 0 if attempt == 1 else prompt_tokens // 2
        reasoning_tokens = len(reasoning) // 2 if reasoning else 0
        completion_tokens = reasoning_tokens + len(content) // 2 + 1
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        completion = {
            "id": f"chatcmpl-{key}-{next(self.sequence)}",
            "object": "chat.completion",
            "created": int(request.t),
            "model": model,
            "system_fingerprint": "fp_teacher_server",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "prompt_cache_hit_tokens": cached,
                "prompt_cache_miss_tokens": prompt_tokens - cached,
            },
        }
        body = json.dumps(completion, ensure_ascii=False).encode("utf-8")
        delay = float(rule.get("delay_s", 30.0)) if behavior == "slow" else 0.0
        return _Outcome(200, body, due + delay, behavior in OK_FAMILY, log)

    def _identify(self, user: str | None) -> tuple[Category, str] | None:
        if not user:
            return None
        cat = next((cat for instruction, cat in self.instructions if user.startswith(instruction)), None)
        if cat is None:
            return None
        end = user.rfind(_DOC_CLOSE)
        if end < 0:
            return None
        start = user.rfind(_DOC_OPEN, 0, end + 1)
        if start < 0:
            return None
        return cat, user[start + len(_DOC_OPEN) : end]

    @staticmethod
    def _match(rules: list[dict], category: str, key: str, text: str, attempt: int) -> tuple[int | None, dict]:
        for index, rule in enumerate(rules):
            if "categories" in rule and category not in rule["categories"]:
                continue
            if "attempts" in rule and attempt not in rule["attempts"]:
                continue
            if "text_keys" in rule and key not in rule["text_keys"]:
                continue
            if "text_contains" in rule and rule["text_contains"] not in text:
                continue
            if "fraction" in rule and not _fraction_selects(index, category, key, rule["fraction"]):
                continue
            return index, rule
        return None, {"behavior": "ok"}


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return None


class _Responder:
    """Reads a request, lets the handler decide, answers when the answer is due, and logs how it went."""

    def __init__(self, handler: TeacherHandler):
        self.handler = handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        body = await request.content.read()  # unlike request.read(), no size cap
        outcome = self.handler.prepare(
            _Request(request.method, request.path, request.headers, body, time.time()), loop.time()
        )
        if outcome.log is not None:
            # Which connection asked: tells apart two clients that ask for the same key.
            transport = request.transport
            # Not None: a lost connection cancels this handler (handler_cancellation) at its last await.
            assert transport is not None, "the connection of a request being handled is open"
            outcome.log["client_port"] = transport.get_extra_info("peername")[1]
        wait = outcome.due - loop.time()
        try:
            response = await self._answer(request, outcome, wait)
        except asyncio.CancelledError:  # the client hung up while the answer waited (handler_cancellation)
            self._log(outcome, None, False, client_closed=True)
            raise
        except ConnectionError:
            # aiohttp calls a handler a loop turn or two after its request arrived, so a client that hangs up right
            # after sending (as one does when a sibling request is refused) leaves no connection to answer on. An
            # answer due at once counts as given, as by a server that answers on arrival; a later one as not given.
            self._log(outcome, outcome.status if wait <= 0 else None, False, client_closed=True)
            return web.Response()  # aiohttp finds the connection closed and sends nothing
        self._log(outcome, outcome.status, outcome.deliverable)
        return response

    @staticmethod
    async def _answer(request: web.BaseRequest, outcome: _Outcome, wait: float) -> web.StreamResponse:
        if wait > 0:
            await asyncio.sleep(wait)
        if outcome.body is None:  # drop
            transport = request.transport
            # Not None: a lost connection cancels this handler (handler_cancellation) during the wait.
            assert transport is not None, "the connection of a request being handled is open"
            transport.close()
            return web.Response()  # as above: nothing goes out
        assert outcome.status is not None, "an outcome with a body has a status"
        response = web.Response(
            status=outcome.status, body=outcome.body, content_type="application/json", headers=outcome.headers
        )
        # Sent here rather than by aiohttp after the return, so that the log line follows the answer.
        await response.prepare(request)
        await response.write_eof()
        return response

    def _log(self, outcome: _Outcome, status: int | None, delivered: bool, client_closed: bool = False) -> None:
        entry = outcome.log
        if entry is None:
            return
        entry["t_end"] = time.time()
        entry["status"] = status
        entry["delivered"] = delivered
        if client_closed:
            entry["client_closed"] = True
        self.handler.write_log(entry)


# -- the process ----------------------------------------------------------------------------------------------------


async def serve(
    host: str,
    port: int,
    plan_path: Path | None,
    log_path: Path | None,
    api_key: str | None,
    ready_file: Path | None,
    parent_pid: int | None = None,
    plan: dict | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or until `parent_pid` is gone)."""
    loop = asyncio.get_running_loop()
    handler = TeacherHandler(_Plan(plan_path, plan), log_path, api_key)
    # handler_cancellation: a client that hangs up during a wait is logged at once, as client_closed.
    server = web.Server(_Responder(handler), handler_cancellation=True, access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    bound = runner.addresses[0][1]
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(f"{bound}\n", encoding="utf-8")
        os.replace(tmp, ready_file)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def watch_parent() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent_pid:
                stop.set()
                return

    watcher = loop.create_task(watch_parent()) if parent_pid else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        handler.close()  # first, so that requests cut short by the shutdown are not logged as client_closed
        await runner.cleanup()


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed in this project's venv
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--plan", type=Path, help="plan JSON file; re-read when it changes")
    parser.add_argument("--log", type=Path, help="JSON-lines request log, appended")
    parser.add_argument("--api-key", default=os.environ.get("TEACHER_SERVER_API_KEY"))
    parser.add_argument("--ready-file", type=Path, help="the bound port is written here once serving")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    args = parser.parse_args(argv)
    import gc

    gc.freeze()
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
        runner.run(serve(args.host, args.port, args.plan, args.log, args.api_key, args.ready_file, args.parent_pid))


# -- the Python helper ----------------------------------------------------------------------------------------------


@dataclass
class TeacherServer:
    process: subprocess.Popen
    port: int
    host: str
    directory: Path
    plan_path: Path
    log_path: Path
    stderr_path: Path

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def requests(self, min_count: int = 0, timeout: float = 5.0) -> list[dict]:
        """The log's lines, parsed. A line is written just after its response went out, so a caller that has
        just received a response may ask for `min_count` lines: this waits (up to `timeout`) until there are."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = self.log_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raw = ""
            lines = raw.split("\n")[:-1]  # a last line without its newline is still being written
            entries = [json.loads(line) for line in lines if line]
            if len(entries) >= min_count or time.monotonic() >= deadline:
                return entries
            time.sleep(0.01)

    def set_plan(self, plan: dict | None) -> None:
        """Replace the plan; returns once the server has loaded it (the file is also polled by the server)."""
        _write_atomic(self.plan_path, json.dumps(validate_plan(plan), ensure_ascii=False))
        with urllib.request.urlopen(self.root_url + RELOAD_PATH, timeout=10) as response:
            response.read()

    def cpu_seconds(self) -> float:
        """User+system CPU time the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def run_teacher_server(
    tmp_dir: Path,
    plan: dict | None = None,
    api_key: str | None = None,
    *,
    host: str = "127.0.0.1",
    startup_timeout: float = 30.0,
) -> Iterator[TeacherServer]:
    """Start the server as a subprocess (this interpreter), wait until it serves, yield it, terminate it."""
    directory = Path(tempfile.mkdtemp(prefix="teacher-server-", dir=tmp_dir))
    plan_path, log_path = directory / "plan.json", directory / "requests.jsonl"
    ready_path, stderr_path = directory / "ready", directory / "stderr.txt"
    _write_atomic(plan_path, json.dumps(validate_plan(plan), ensure_ascii=False))
    command = [
        sys.executable, "-m", "qc_assets.testing.teacher_server",
        "--host", host, "--port", "0",
        "--plan", str(plan_path), "--log", str(log_path),
        "--ready-file", str(ready_path), "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop("TEACHER_SERVER_API_KEY", None)
    if api_key is not None:
        env["TEACHER_SERVER_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=root
        )
    server: TeacherServer | None = None
    try:
        deadline = time.monotonic() + startup_timeout
        while not ready_path.exists():
            if process.poll() is not None:
                raise RuntimeError(
                    f"teacher server exited with {process.returncode}: {stderr_path.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"teacher server not ready after {startup_timeout} s: {stderr_path.read_text(errors='replace')}"
                )
            time.sleep(0.01)
        port = int(ready_path.read_text().strip())
        server = TeacherServer(process, port, host, directory, plan_path, log_path, stderr_path)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()


def raw_http_load(port: int, requests: list[bytes], concurrency: int, seconds: float) -> tuple[int, int, float]:
    """Drive the server for `seconds` from `concurrency` keep-alive connections; returns (ok, errors, elapsed)."""
    import httptools
    import uvloop

    async def run() -> tuple[int, int, float]:
        loop = asyncio.get_running_loop()
        counts = {"ok": 0, "errors": 0}
        state = {"stop_at": float("inf")}
        finished: list[asyncio.Future] = []

        class Client(asyncio.Protocol):
            def __init__(self, offset: int):
                self.index = offset
                self.parser = httptools.HttpResponseParser(self)
                self.done = loop.create_future()
                finished.append(self.done)

            def connection_made(self, transport):
                self.transport = transport

            def send(self):
                self.transport.write(requests[self.index % len(requests)])
                self.index += concurrency

            def data_received(self, data):
                self.parser.feed_data(data)

            def on_message_complete(self):
                counts["ok" if self.parser.get_status_code() == 200 else "errors"] += 1
                if loop.time() < state["stop_at"]:
                    self.send()
                else:
                    self.transport.close()

            def connection_lost(self, exc):
                if not self.done.done():
                    self.done.set_result(None)

        clients = []
        for offset in range(concurrency):
            _, protocol = await loop.create_connection(functools.partial(Client, offset), "127.0.0.1", port)
            clients.append(protocol)
        started = loop.time()
        state["stop_at"] = started + seconds
        for protocol in clients:
            protocol.send()
        await asyncio.gather(*finished)
        return counts["ok"], counts["errors"], loop.time() - started

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


def chat_requests(server, since: int = 0) -> list[dict]:
    """The labelling requests the server logged (those naming a category), from the `since`-th entry on."""
    return [entry for entry in server.requests()[since:] if entry.get("category")]
