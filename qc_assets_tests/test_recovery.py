"""A run whose process was killed: found by the pid in its RUN_START event, marked failed, and its GPU slot freed;
a live process's run is left alone, and so is a run whose pid a later process has taken. The instance's `gpu`
pool takes QC_GPU_SLOTS."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
import uuid

import dagster as dg

from qc_assets.execution import GPU_POOL
from qc_assets.orchestration.home import prepare_dagster_home
from qc_assets.orchestration.recovery import abandoned_runs_sensor, recover_abandoned_runs
from qc_assets.settings import load_settings


def _started_run(instance: dg.DagsterInstance, pid: int, started_at: float | None = None) -> str:
    """A STARTED run whose worker is `pid`, holding a slot of the gpu pool, as a run worker leaves it."""
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=dg.DagsterRunStatus.STARTED))
    instance.report_dagster_event(
        dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value, job_name="__ASSET_JOB", pid=pid),
        run_id=run_id,
        timestamp=started_at,
    )
    assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run_id, "generated_queries").is_claimed
    return run_id


def _sleeper(ready) -> None:
    ready.put(os.getpid())
    signal.pause()


def test_the_run_of_a_killed_process_fails_and_frees_its_gpu_slot_and_a_live_ones_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = load_settings({"QC_DATA_DIR": str(tmp_path / "data"), "QC_GPU_SLOTS": "3"})
    prepare_dagster_home(settings)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    workers = [context.Process(target=_sleeper, args=(ready,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        live_pid, killed_pid = ready.get(timeout=60), ready.get(timeout=60)
        with dg.DagsterInstance.get() as instance:
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 3
            live_run, killed_run = _started_run(instance, live_pid), _started_run(instance, killed_pid)
            # A live process that started after the run did holds a pid the run's worker had: that worker is gone.
            reused_run = _started_run(instance, live_pid, started_at=time.time() - 3600)
            assert recover_abandoned_runs(instance) == [reused_run]
            os.kill(killed_pid, signal.SIGKILL)
            next(worker for worker in workers if worker.pid == killed_pid).join(timeout=30)
            assert recover_abandoned_runs(instance) == [killed_run]
            assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
            assert instance.get_run_by_id(live_run).status == dg.DagsterRunStatus.STARTED
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids == {live_run}
            assert recover_abandoned_runs(instance) == []
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()


def test_the_sensor_recovers_a_run_whose_process_is_gone(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    prepare_dagster_home(load_settings({"QC_DATA_DIR": str(tmp_path / "data")}))
    gone = subprocess.Popen(["sleep", "0"])
    gone.wait()
    with dg.DagsterInstance.get() as instance:
        run_id = _started_run(instance, gone.pid)
        result = abandoned_runs_sensor(dg.build_sensor_context(instance=instance))
        assert run_id in result.skip_message
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert "no abandoned run" in abandoned_runs_sensor(dg.build_sensor_context(instance=instance)).skip_message
