"""A labelling run SIGKILLed in the middle, twice, then resumed: the server is asked only for missing keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from qc_assets.categories import CATEGORIES
from qc_assets.settings import load_settings
from qc_assets.testing.teacher_server import run_teacher_server, text_key
from qc_assets_tests.conftest import BIN, document, lake_rows, run_qc
from qc_assets_tests.test_teacher import SHARD, chat_requests, openai_environment, write_corpus


def journal_keys(data_dir) -> set[tuple[str, str]]:
    keys = set()
    for segment in (data_dir / "teacher" / "journal").rglob("segment-*.jsonl"):
        for line in segment.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["kind"] == "label":
                keys.add((row["doc_id"], row["category"]))
    return keys


@pytest.mark.long(155)
def test_killed_labelling_runs_resume_asking_only_for_keys_still_missing(environment, tmp_path):
    texts = [document(i, "再開") for i in range(12)]
    source = write_corpus(tmp_path / "corpus", texts)
    doc_of = {text_key(text): f"{SHARD}-{i:03d}" for i, text in enumerate(texts)}
    every_key = {(doc, category) for doc in doc_of.values() for category in CATEGORIES}
    with run_teacher_server(tmp_path, {"latency_ms": 150, "rules": []}) as server:
        env = openai_environment(environment, source, server, QC_TEACHER_CONCURRENCY="4", QC_TEACHER_BATCH_SIZE="4")
        settings = load_settings(env)
        assert run_qc(["run", "--select", "corpus"], env).returncode == 0
        clean = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
        held_at_kill: list[set[tuple[str, str]]] = []
        calls_at_kill: list[int] = []
        for kill_after in (10, 45):
            process = subprocess.Popen(
                [str(BIN / "qc"), "run", "--select", "teacher_labels"],
                env={**clean, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 120
            while len(chat_requests(server)) < kill_after:
                assert process.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            in_lake = set(lake_rows(settings, "SELECT doc_id, category FROM teacher_labels"))
            held_at_kill.append(in_lake | journal_keys(settings.data_root))
            calls_at_kill.append(len(chat_requests(server)))
            assert len(held_at_kill[-1]) < len(every_key)

        finished = run_qc(["run", "--select", "teacher_labels"], env)
        assert finished.returncode == 0, finished.stdout + finished.stderr
        calls = chat_requests(server)
        runs = [calls[: calls_at_kill[0]], calls[calls_at_kill[0] : calls_at_kill[1]], calls[calls_at_kill[1] :]]
        for held, next_run in zip(held_at_kill, runs[1:]):
            asked = {(doc_of[entry["text_key"]], entry["category"]) for entry in next_run}
            assert not asked & held, "a resumed run asked again for a key whose answer it already had"
        # Only requests in flight at a kill (at most the concurrency of 4) can have been answered and asked again.
        delivered = [(entry["category"], entry["text_key"]) for entry in calls if entry["delivered"]]
        assert len(delivered) - len(set(delivered)) <= 2 * 4

        labels = lake_rows(settings, "SELECT doc_id, category FROM teacher_labels")
        assert len(labels) == len(set(labels)) and set(labels) == every_key
        assert not list((settings.data_root / "teacher" / "journal").rglob("segment-*.jsonl"))


@pytest.mark.long(125)
def test_estimate_labels_a_pilot_projects_the_corpus_and_the_full_run_does_not_pay_for_the_pilot_again(
    environment, tmp_path
):
    texts = [document(i, "見積") for i in range(6)]
    source = write_corpus(tmp_path / "corpus", texts)
    with run_teacher_server(tmp_path, {"latency_ms": 20, "rules": []}) as server:
        env = openai_environment(environment, source, server, QC_TEACHER_PRICE="deepseek-v4-flash")
        assert run_qc(["estimate"], env).returncode != 0  # nothing to sample from yet
        assert run_qc(["run", "--select", "corpus"], env).returncode == 0
        estimate = run_qc(["estimate", "--documents", "2"], env)
        assert estimate.returncode == 0, estimate.stderr
        assert len(chat_requests(server)) == 2 * len(CATEGORIES)
        assert "this corpus (6 documents" in estimate.stdout and "42 labels" in estimate.stdout
        assert "seed 000's case (100,000,000 documents" in estimate.stdout
        again = run_qc(["estimate", "--documents", "2"], env)
        assert again.returncode == 0 and len(chat_requests(server)) == 2 * len(CATEGORIES)
        assert again.stdout.splitlines()[-4:] == estimate.stdout.splitlines()[-4:]
        full = run_qc(["run", "--select", "teacher_labels"], env)
        assert full.returncode == 0, full.stdout + full.stderr
        keys = [(entry["category"], entry["text_key"]) for entry in chat_requests(server)]
        assert len(keys) == len(set(keys)) == 6 * len(CATEGORIES)


def test_a_slow_consumer_never_leaves_more_answers_unrecorded_than_requests_in_flight(tmp_path):
    """A SIGKILL loses the answers paid for but not yet journaled. The backend hands each answer to `record` (the
    journal) before its request slot is reused, so however slowly the labeller takes outcomes (a lake write, a
    busy machine), those answers are never more than the requests in flight."""
    import asyncio

    from qc_assets.defs.teacher.backends import Budget, LabelRequest
    from qc_assets.defs.teacher.openai_teacher import OpenAITeacher
    from qc_assets.defs.teacher.prices import PRICES

    concurrency = 3
    requests = [LabelRequest(f"d{index}", SHARD, CATEGORIES["title"], document(index)) for index in range(24)]
    recorded: list = []
    worst = 0
    with run_teacher_server(tmp_path, {"latency_ms": 0, "rules": []}) as server:
        teacher = OpenAITeacher(server.base_url, "slow-consumer", "k", PRICES["free"], concurrency=concurrency)

        async def label() -> None:
            nonlocal worst
            try:
                async for _ in teacher.label_all(requests, Budget(), recorded.append):
                    await asyncio.sleep(0.05)  # a consumer much slower than the teacher
                    worst = max(worst, len(chat_requests(server)) - len(recorded))
            finally:
                await teacher.aclose()

        asyncio.run(label())
    assert len(recorded) == len(requests)
    assert worst <= concurrency
