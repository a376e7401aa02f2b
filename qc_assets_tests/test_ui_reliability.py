"""Runs launched from the UI while the UI's own processes are SIGKILLed.

The corpus is a backfill of every shard, whose runs the daemon runs side by side. Then a labelling run is launched
and the webserver killed under it, then the same with the daemon: either one takes `dagster dev` down, and the run
finishes anyway. Then every process of `qc ui` at once, the run's worker included, as a crash would: the run is
marked failed at the next start-up (it would otherwise stay STARTED for ever) and re-executed from the UI. Each key
is paid for once, but for those in flight at the crash, and every label is in the lake once."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from qc_assets.categories import CATEGORIES
from qc_assets.settings import load_settings
from qc_assets_tests.conftest import lake_rows
from qc_assets_tests.crash_resume import write_multi_shard_corpus
from qc_assets_tests.dagster_ui import DagsterUI
from qc_assets_tests.teacher_server import run_teacher_server
from qc_assets_tests.test_teacher import chat_requests

SHARDS = ["shard-0", "shard-1", "shard-2"]
DOCUMENTS = 4
CONCURRENCY = 2
KILL_AFTER_REQUESTS = 6
UI_PROCESS = {"webserver": (b"dagster-webserver", b"dagster_webserver"), "daemon": (b"dagster._daemon", b"dagster-daemon")}


def stored_run(data_dir: Path, run_id: str) -> dg.DagsterRun:
    with dg.DagsterInstance.from_config(str(data_dir / "dagster")) as instance:
        return instance.get_run_by_id(run_id)


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def the_process(ui: DagsterUI, kind: str) -> int:
    found = [pid for pid in ui.processes() if any(name in command_line(pid) for name in UI_PROCESS[kind])]
    assert len(found) == 1, (kind, found)
    return found[0]


def corpus_backfill_runs_at_once(ui: DagsterUI, data_dir: Path) -> None:
    """Every shard's corpus as one backfill from the UI: the daemon runs its runs side by side."""
    backfill = ui.backfill("corpus", SHARDS)
    assert ui.wait_for_backfill(backfill) == "COMPLETED_SUCCESS", ui.log_tail()
    with dg.DagsterInstance.from_config(str(data_dir / "dagster")) as instance:
        records = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill}))
    assert [record.dagster_run.status for record in records] == [dg.DagsterRunStatus.SUCCESS] * len(SHARDS)
    spans = sorted((record.start_time, record.end_time) for record in records)
    assert any(later_start < earlier_end for (_, earlier_end), (later_start, _) in zip(spans, spans[1:])), spans


def launch_and_wait_for_requests(ui: DagsterUI, server, shard: str) -> str:
    asked_before = len(chat_requests(server))
    run_id = ui.launch("teacher_labels", shard)
    wait_for(lambda: len(chat_requests(server)) - asked_before >= KILL_AFTER_REQUESTS, f"labelling of {shard}")
    return run_id


@pytest.mark.timeout(600)
def test_a_ui_run_outlives_its_webserver_and_daemon_and_a_crashed_one_is_failed_and_reexecuted(tmp_path):
    corpus = write_multi_shard_corpus(tmp_path / "corpus", shards=len(SHARDS), documents=DOCUMENTS)
    data_dir = tmp_path / "data"
    with run_teacher_server(tmp_path, {"latency_ms": 300, "rules": []}) as server:
        env = {
            "QC_DATA_DIR": str(data_dir), "QC_CORPUS_SOURCE": str(corpus), "QC_TEACHER_BACKEND": "openai",
            "QC_TEACHER_BASE_URL": server.base_url, "QC_TEACHER_MODEL": "ui-teacher", "QC_TEACHER_PRICE": "free",
            "QC_TEACHER_CONCURRENCY": str(CONCURRENCY), "QC_TEACHER_BATCH_SIZE": "2",
        }
        for shard, victim in (("shard-0", "webserver"), ("shard-1", "daemon")):
            ui = DagsterUI(env, tmp_path / f"ui-{victim}.log").start()
            try:
                ui.wait_until_loaded()
                if victim == "webserver":
                    corpus_backfill_runs_at_once(ui, data_dir)
                run_id = launch_and_wait_for_requests(ui, server, shard)
                os.kill(the_process(ui, victim), signal.SIGKILL)
                ui.process.wait(timeout=60)
                assert "shut down unexpectedly" in ui.log_path.read_text(), ui.log_tail()
                wait_for(lambda: stored_run(data_dir, run_id).is_finished, f"the run after the {victim} was killed")
                assert stored_run(data_dir, run_id).status == dg.DagsterRunStatus.SUCCESS, ui.log_tail()
            finally:
                ui.stop()

        ui = DagsterUI(env, tmp_path / "ui-crash.log").start()
        try:
            ui.wait_until_loaded()
            crashed = launch_and_wait_for_requests(ui, server, "shard-2")
            for pid in ui.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            ui.process.wait(timeout=30)
        finally:
            ui.stop()
        assert stored_run(data_dir, crashed).status == dg.DagsterRunStatus.STARTED

        with DagsterUI(env, tmp_path / "ui-after.log") as ui:
            ui.wait_until_loaded()
            assert stored_run(data_dir, crashed).status == dg.DagsterRunStatus.FAILURE
            assert f"marked failed, their GPU slots freed: {crashed}" in ui.log_path.read_text()
            reexecuted = ui.wait_for_run(ui.reexecute_from_failure(crashed))
            assert reexecuted["status"] == "SUCCESS", ui.run_errors(reexecuted["runId"])

        delivered = Counter((entry["category"], entry["text_key"]) for entry in chat_requests(server) if entry["delivered"])
    settings = load_settings(env)
    labels = lake_rows(settings, "SELECT doc_id, category FROM teacher_labels")
    assert len(labels) == len(set(labels)) == len(SHARDS) * DOCUMENTS * len(CATEGORIES)
    # Only answers in flight when the crash came can have been paid for and asked again.
    assert sum(count - 1 for count in delivered.values()) <= CONCURRENCY
    assert not list((settings.teacher_dir / "journal").rglob("segment-*.jsonl"))
