"""`qc run`: one asset backfill on the persistent instance, run by Dagster's own daemon, watched to the end.

`qc run` starts `dagster dev` on a free loopback port (or uses the one `qc ui` has open on the same instance), sends
it the backfill the UI's "Materialize" dialog would, and reports each run as it ends, the backfill's and then those
the checkpoint sensor and the report's automation launch after it. Everything shows in the UI as if launched there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg

from qc_assets.defs.report.assets import REPORT_AUTOMATION
from qc_assets.defs.student.sensors import CHECKPOINT_SENSOR
from qc_assets.orchestration.backfill import LAUNCHED_BY, LAUNCHED_BY_TAG, BackfillPlan, matching_shards, plan_backfill
from qc_assets.orchestration.graphql import DagsterGraphQL
from qc_assets.orchestration.home import prepare_dagster_home
from qc_assets.orchestration.recovery import recover_abandoned_runs
from qc_assets.orchestration.service import DagsterService, InstanceServiceLock, child_environment
from qc_assets.orchestration.session import RunWatch, backfill_failed, backfill_lines
from qc_assets.settings import Settings

FOLLOW_UP_SENSORS = (CHECKPOINT_SENSOR, REPORT_AUTOMATION)
Echo = Callable[[str], None]


class RunRequestError(ValueError):
    """The selection or the shard patterns name nothing."""


@dataclass(frozen=True)
class RunRequest:
    selection: str | None
    shard_patterns: tuple[str, ...]

    @property
    def description(self) -> str:
        shards = " ".join(f"--shard {pattern}" for pattern in self.shard_patterns)
        return " ".join(
            part for part in ("qc run", f"--select {self.selection}" if self.selection else "", shards) if part
        )


@dataclass
class RunOutcome:
    runs: int
    failed_runs: int
    backfill_status: str | None
    backfill_failed: bool

    @property
    def success(self) -> bool:
        return not self.failed_runs and not self.backfill_failed


def plan(request: RunRequest, definitions: dg.Definitions, instance: dg.DagsterInstance) -> BackfillPlan:
    corpus = definitions.resolve_assets_def("corpus").partitions_def
    if corpus is None:
        raise RunRequestError("the corpus asset has no shard partitions")
    shards = corpus.get_partition_keys()
    for pattern in request.shard_patterns:
        if not matching_shards(shards, (pattern,)):
            raise RunRequestError(f"--shard {pattern!r} matches none of the {len(shards)} shards, e.g. {shards[0]!r}")
    backfill = plan_backfill(definitions, request.selection, shards, request.shard_patterns, instance)
    if not backfill.targets and not backfill.deferred:
        raise RunRequestError(f"--select {request.selection!r} matches no asset")
    return backfill


@contextmanager
def instance_service(settings: Settings, echo: Echo) -> Iterator[DagsterGraphQL]:
    """The instance's `dagster dev`: the UI's when `qc ui` is open, else one started here (after any other `qc run`
    on this instance has ended); a DagsterService when it is this process's own."""
    lock = InstanceServiceLock(settings.dagster_home)
    if not lock.try_acquire():
        holder = lock.holder()
        if holder.get("kind") == "ui":
            echo(f"`qc ui` is open on this instance: launching through its Dagster at {holder['url']}")
            service = DagsterGraphQL(holder["url"])
            service.wait_until_loaded()
            yield service
            return
        echo("another `qc run` is using this instance; waiting for it to end")
        lock.acquire()
    try:
        logs = settings.dagster_home / "qc-run-logs"
        with DagsterService(child_environment(settings.data_root), logs) as service:
            lock.publish("run", service.url)
            echo(f"Dagster's webserver at {service.url}; its processes' logs in {logs}")
            service.wait_until_loaded()
            yield service
    finally:
        lock.release()


def run_graph(settings: Settings, request: RunRequest, definitions: dg.Definitions, echo: Echo) -> RunOutcome:
    """Launch the backfill for `request` and watch it and what follows from it to the end."""
    prepare_dagster_home(settings)
    with dg.DagsterInstance.get() as instance:
        for run_id in recover_abandoned_runs(instance):
            echo(f"run {run_id}: its process was killed; marked failed and its GPU slots freed")
        backfill_plan = plan(request, definitions, instance)
        for key in backfill_plan.deferred:
            echo(f"{key.to_user_string()}: no partition yet; the sensor and automation materialize it when one exists")
        with instance_service(settings, echo) as service:
            if isinstance(service, DagsterService):
                for stale in service.unfinished_backfills((LAUNCHED_BY_TAG, LAUNCHED_BY)):
                    echo(f"backfill {stale} of a `qc run` that was killed: canceled")
                    service.cancel_backfill(stale)
            watch = RunWatch(service, instance, echo)
            backfill = None
            backfill_id = (
                service.launch_backfill(backfill_plan.params(request.description)) if backfill_plan.targets else None
            )
            if isinstance(service, DagsterService):
                service.start_daemon()
            if backfill_id is not None:
                echo(f"backfill {backfill_id}: {', '.join(t.key.to_user_string() for t in backfill_plan.targets)}")
                backfill = watch.wait_for_backfill(backfill_id)
                echo(f"backfill {backfill_id} {backfill['status']}:")
                for line in backfill_lines(backfill):
                    echo(line)
            watch.wait_until_quiet(FOLLOW_UP_SENSORS)
    return RunOutcome(
        len(watch.finished),
        len(watch.failed),
        backfill["status"] if backfill else None,
        backfill_failed(backfill) if backfill else False,
    )
