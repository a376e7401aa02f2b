"""A `qc run` killed mid-run: its runs are found by their worker's lock, marked failed, and their GPU slots freed;
a live worker's runs are left alone. The instance's `gpu` pool takes QC_GPU_SLOTS."""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from pathlib import Path

import dagster as dg

from qc_assets.deploy import GPU_POOL
from qc_assets.recovery import LAUNCHED_BY_TAG, WORKER_TAG, recover_abandoned_runs, worker_token
from qc_assets.runner import prepare_dagster_home
from qc_assets.settings import load_settings


def _worker(home: str, tokens) -> None:
    tokens.put((os.getpid(), worker_token(Path(home))))
    signal.pause()


def _started_run(instance: dg.DagsterInstance, token: str) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=dg.DagsterRunStatus.STARTED,
                                   tags={LAUNCHED_BY_TAG: "qc run", WORKER_TAG: token}))
    assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run_id, "generated_queries").is_claimed
    return run_id


def test_runs_of_a_killed_worker_fail_and_free_their_gpu_slot_and_a_live_workers_runs_do_not(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = load_settings({"QC_DATA_DIR": str(tmp_path / "data"), "QC_GPU_SLOTS": "2"})
    home = Path(prepare_dagster_home(settings))
    context = multiprocessing.get_context("spawn")
    tokens = context.Queue()
    workers = [context.Process(target=_worker, args=(str(home), tokens)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        (_, live), (killed_pid, killed) = tokens.get(timeout=60), tokens.get(timeout=60)
        with dg.DagsterInstance.get() as instance:
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 2
            live_run, killed_run = _started_run(instance, live), _started_run(instance, killed)
            assert recover_abandoned_runs(instance, home) == []
            os.kill(killed_pid, signal.SIGKILL)
            next(worker for worker in workers if worker.pid == killed_pid).join(timeout=30)
            assert recover_abandoned_runs(instance, home) == [killed_run]
            assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
            assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids == {live_run}
            assert recover_abandoned_runs(instance, home) == []
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
