"""One concurrency budget per teacher endpoint and API key across runs: what two labelling processes put in flight
together, a killed process's slots, and a Retry-After pause seen by another process."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.backends import Budget, LabelRequest
from qc_assets.defs.teacher.key_budget import KeyBudget, budget_name
from qc_assets.defs.teacher.openai_teacher import OpenAITeacher
from qc_assets.defs.teacher.prices import PRICES
from qc_assets.testing.teacher_server import run_teacher_server

SLOTS = 4
LATENCY_MS = 150


def _label_in_a_process(base_url: str, keys_dir: str | None, start_at: float, prefix: str, results) -> None:
    """A run's labelling: 24 requests at concurrency SLOTS, sharing the key's budget when `keys_dir` is given."""
    budget = KeyBudget(Path(keys_dir), budget_name(base_url, "k"), SLOTS) if keys_dir else None
    teacher = OpenAITeacher(
        base_url, "budget-teacher", "k", PRICES["free"], concurrency=SLOTS, key_budget=budget, backoff_s=0.05
    )
    requests = [
        LabelRequest(f"{prefix}-{index}", "s", CATEGORIES["title"], f"{prefix} 文書 {index} の本文です。" * 3)
        for index in range(24)
    ]

    async def label() -> list[str]:
        try:
            return [outcome.status async for outcome in teacher.label_all(requests, Budget())]
        finally:
            await teacher.aclose()

    while time.time() < start_at:
        time.sleep(0.001)
    results.put(asyncio.run(label()))


def _most_in_flight(entries: list[dict]) -> int:
    events = sorted([(entry["t"], 1) for entry in entries] + [(entry["t_end"], -1) for entry in entries])
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


def _two_runs_at_once(server, keys_dir: Path | None) -> int:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3
    processes = [
        context.Process(
            target=_label_in_a_process,
            args=(server.base_url, str(keys_dir) if keys_dir else None, start_at, prefix, results),
        )
        for prefix in ("a", "b")
    ]
    for process in processes:
        process.start()
    statuses = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert statuses == [["labeled"] * 24] * 2
    entries = [entry for entry in server.requests(min_count=48) if entry.get("category")]
    assert len(entries) == 48
    return _most_in_flight(entries)


def test_two_runs_on_one_key_never_have_more_requests_in_flight_than_the_keys_budget(tmp_path):
    for name in ("separate", "shared"):
        (tmp_path / name).mkdir()
    with run_teacher_server(tmp_path / "separate", {"latency_ms": LATENCY_MS, "rules": []}) as server:
        # Without a shared budget each run fills its own concurrency: the measure sees both.
        assert _two_runs_at_once(server, None) > SLOTS
    with run_teacher_server(tmp_path / "shared", {"latency_ms": LATENCY_MS, "rules": []}) as server:
        assert _two_runs_at_once(server, tmp_path / "keys") <= SLOTS


def _hold_every_slot(keys_dir: str, ready) -> None:
    budget = KeyBudget(Path(keys_dir), "name", SLOTS)
    held = [budget.try_acquire() for _ in range(SLOTS)]
    ready.put(held)
    time.sleep(600)


def test_a_killed_runs_slots_are_free_at_once_and_nothing_needs_cleaning_up(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    holder = context.Process(target=_hold_every_slot, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert sorted(ready.get(timeout=60)) == list(range(SLOTS))
        budget = KeyBudget(tmp_path, "name", SLOTS)
        assert budget.try_acquire() is None
        assert budget.held_elsewhere() == SLOTS
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
        assert sorted(budget.try_acquire() for _ in range(SLOTS)) == list(range(SLOTS))
        # Within one process a held slot is never handed out twice.
        assert budget.try_acquire() is None
        budget.release(2)
        assert budget.try_acquire() == 2
    finally:
        if holder.is_alive():
            holder.kill()


def _pause(keys_dir: str) -> None:
    KeyBudget(Path(keys_dir), "name", SLOTS).pause(2.0)


def test_a_retry_after_seen_by_one_run_pauses_the_others(tmp_path):
    budget = KeyBudget(tmp_path, "name", SLOTS)
    assert budget.paused_for() == 0
    process = multiprocessing.get_context("spawn").Process(target=_pause, args=(str(tmp_path),))
    process.start()
    process.join(timeout=60)
    assert 1.0 < budget.paused_for() <= 2.0
    started = time.monotonic()
    slot = asyncio.run(budget.acquire())
    assert time.monotonic() - started > 1.0 and slot in range(SLOTS)


def test_the_budget_file_is_named_by_a_hash_never_by_the_key(tmp_path):
    name = budget_name("https://api.deepseek.com", "sk-secret-key")
    assert "sk-secret" not in name and name != budget_name("https://api.deepseek.com", "sk-other-key")
    budget = KeyBudget(tmp_path, name, SLOTS)
    assert "sk-secret" not in str(budget.path)
