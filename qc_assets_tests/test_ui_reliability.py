"""A run launched from the UI when every process of `qc ui` is SIGKILLed at once, its worker included, as a crash of
the machine would: the run is marked failed at the next start-up (it would otherwise stay STARTED for ever) and
re-executed from the UI. Each key is paid for once, but for those in flight at the crash, and every label is in the
lake once. (Kills of the daemon or the webserver alone: `test_ui_whole_graph.py`.)"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter

import dagster as dg
import pytest

from qc_assets.categories import CATEGORIES
from qc_assets.settings import load_settings
from qc_assets.testing.crash_resume import write_multi_shard_corpus
from qc_assets.testing.dagster_ui import DagsterUI
from qc_assets.testing.teacher_server import chat_requests, run_teacher_server
from qc_assets_tests.conftest import lake_rows

SHARD = "shard-0"
DOCUMENTS = 4
CONCURRENCY = 2
KILL_AFTER_REQUESTS = 6


def stored_status(data_dir, run_id: str) -> dg.DagsterRunStatus:
    with dg.DagsterInstance.from_config(str(data_dir / "dagster")) as instance:
        return instance.get_run_by_id(run_id).status


@pytest.mark.long(50)
@pytest.mark.timeout(600)
def test_a_ui_run_whose_processes_all_crashed_is_marked_failed_at_the_next_start_and_reexecuted(tmp_path):
    corpus = write_multi_shard_corpus(tmp_path / "corpus", shards=1, documents=DOCUMENTS)
    data_dir = tmp_path / "data"
    with run_teacher_server(tmp_path, {"latency_ms": 300, "rules": []}) as server:
        env = {
            "QC_DATA_DIR": str(data_dir),
            "QC_CORPUS_SOURCE": str(corpus),
            "QC_TEACHER_BACKEND": "openai",
            "QC_TEACHER_BASE_URL": server.base_url,
            "QC_TEACHER_MODEL": "ui-teacher",
            "QC_TEACHER_PRICE": "free",
            "QC_TEACHER_CONCURRENCY": str(CONCURRENCY),
            "QC_TEACHER_BATCH_SIZE": "2",
        }
        ui = DagsterUI(env, tmp_path / "ui-crash.log").start()
        try:
            ui.wait_until_loaded()
            crashed = ui.launch(["corpus", "teacher_labels"], SHARD)
            deadline = time.monotonic() + 180
            while len(chat_requests(server)) < KILL_AFTER_REQUESTS:
                assert time.monotonic() < deadline, f"labelling never started:\n{ui.log_tail()}"
                time.sleep(0.1)
            for pid in ui.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            ui.process.wait(timeout=30)
        finally:
            ui.stop()
        assert stored_status(data_dir, crashed) == dg.DagsterRunStatus.STARTED

        with DagsterUI(env, tmp_path / "ui-after.log") as ui:
            ui.wait_until_loaded()
            assert stored_status(data_dir, crashed) == dg.DagsterRunStatus.FAILURE
            assert (
                f"run {crashed}: its process was killed; marked failed and its GPU slots freed"
                in ui.log_path.read_text()
            )
            reexecuted = ui.wait_for_run(ui.reexecute_from_failure(crashed))
            assert reexecuted["status"] == "SUCCESS", ui.run_errors(reexecuted["runId"])

        delivered = Counter(
            (entry["category"], entry["text_key"]) for entry in chat_requests(server) if entry["delivered"]
        )
    settings = load_settings(env)
    labels = lake_rows(settings, "SELECT doc_id, category FROM teacher_labels")
    assert len(labels) == len(set(labels)) == DOCUMENTS * len(CATEGORIES)
    # Only answers in flight when the crash came can have been paid for and asked again.
    assert sum(count - 1 for count in delivered.values()) <= CONCURRENCY
    assert not list((settings.teacher_dir / "journal").rglob("segment-*.jsonl"))
