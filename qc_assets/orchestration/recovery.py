"""Runs whose process was killed: found, marked failed, and their GPU pool slots given back.

A run whose process is killed with SIGKILL (its `qc run`, its `qc ui`, or the machine going down) stays STARTED in
Dagster's run storage for ever, and a step that held a slot of the `gpu` pool keeps it: the next GPU step would wait
for a slot that is never freed, and a backfill would never end. Dagster's run monitoring would notice, but only with
a run launcher that can check its workers; the DefaultRunLauncher that `qc run` and `qc ui` use cannot.

A run's worker is the process that logged the run's RUN_START event, whose pid the event carries. On this machine a
run is abandoned when that pid is gone, or now belongs to a process started after the run was (the kernel reuses
pids). `qc run` and `qc ui` look at start-up, and the `abandoned_runs` sensor every minute while the daemon runs.
"""

from __future__ import annotations

import dagster as dg
import psutil

SENSOR_INTERVAL_S = 60
# psutil derives a process's start time from the boot time, which the kernel gives in whole seconds.
_START_TIME_SLACK_S = 1.0


def _worker_is_gone(pid: int, run_started_at: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or process.create_time() > run_started_at + _START_TIME_SLACK_S
    except psutil.NoSuchProcess:
        return True


def recover_abandoned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the STARTED runs whose worker process is gone and free their pool slots; returns their run ids."""
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        # Another launcher's workers run elsewhere (a cluster's pods), where a pid means nothing; its own
        # run monitoring watches them.
        return []
    recovered = []
    for run in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
        if not starts or starts[-1].dagster_event is None or starts[-1].dagster_event.pid is None:
            continue
        pid = starts[-1].dagster_event.pid
        if not _worker_is_gone(pid, starts[-1].timestamp):
            continue
        instance.report_run_failed(
            run,
            f"the process running it (pid {pid}) is gone: it was killed or its machine went down. "
            "Re-execute the run, or run its partitions again (`qc run` does).",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


@dg.sensor(
    name="abandoned_runs",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks failed the runs whose process was killed (they would stay STARTED for ever) and frees "
    "their GPU pool slots, so a backfill ends and the next GPU step runs.",
)
def abandoned_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    recovered = recover_abandoned_runs(context.instance)
    if recovered:
        context.log.warning(f"marked failed {len(recovered)} runs whose process is gone: {', '.join(recovered)}")
        return dg.SkipReason(f"marked failed {len(recovered)} abandoned runs: {', '.join(recovered)}")
    return dg.SkipReason("no abandoned run")
