"""`qc run`'s watch over what it asked Dagster for: the backfill, then the runs that the checkpoint sensor and the
report's automation condition launch after it, each reported as it ends, until nothing is left to do."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg

from qc_assets.orchestration.graphql import UNFINISHED_BACKFILL_STATUSES, DagsterGraphQL
from qc_assets.partitions import RANGE_END_TAG, RANGE_START_TAG

PARTITION_TAG = "dagster/partition"
IN_PROGRESS = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}
FINISHED_TICK_STATUSES = {"SUCCESS", "SKIPPED", "FAILURE"}
POLL_S = 1.0


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    status: str
    assets: str
    partition: str | None
    launched_by: str
    errors: tuple[str, ...]

    def lines(self) -> list[str]:
        where = f" [{self.partition}]" if self.partition else ""
        head = f"  {self.status.lower():<8} {self.assets}{where}  run {self.run_id} ({self.launched_by})"
        return [head, *(f"           {error}" for error in self.errors)]


def _partition_label(tags: dict[str, str]) -> str | None:
    if PARTITION_TAG in tags:
        return tags[PARTITION_TAG]
    if RANGE_START_TAG in tags:
        start, end = tags[RANGE_START_TAG], tags.get(RANGE_END_TAG, "")
        return start if start == end else f"{start} … {end}"
    return None


def _launcher(tags: dict[str, str]) -> str:
    for tag, label in (
        ("dagster/backfill", "backfill"),
        ("dagster/sensor_name", "sensor"),
        ("dagster/schedule_name", "schedule"),
    ):
        if tag in tags:
            return f"{label} {tags[tag]}"
    return "launched by hand"


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> tuple[str, ...]:
    """The user's own words for a dg.Failure, else the innermost error of each failed step; else the run's failure."""
    messages = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        failure = record.dagster_event.step_failure_data if record.dagster_event else None
        if failure is None:
            continue
        if failure.user_failure_data and failure.user_failure_data.description:
            messages.append(failure.user_failure_data.description)
            continue
        error = failure.error
        while error is not None and error.cause is not None:
            error = error.cause
        messages.append(error.message.strip() if error is not None else "the step failed and recorded no error")
    if not messages:
        messages = [record.message for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)]
    return tuple(messages)


@dataclass
class RunWatch:
    """The runs created since `since` (this `qc run`'s start), reported through `echo` as each ends."""

    service: DagsterGraphQL
    instance: dg.DagsterInstance
    echo: Callable[[str], None]
    since: float = field(default_factory=time.time)
    finished: dict[str, FinishedRun] = field(default_factory=dict)
    last_activity: float = 0.0

    def poll(self) -> bool:
        """Report the runs that ended since the last poll; True while any is still going."""
        records = self.instance.get_run_records(dg.RunsFilter(created_after=datetime.fromtimestamp(self.since, UTC)))
        going = False
        for record in sorted(records, key=lambda record: record.create_timestamp.timestamp()):
            run = record.dagster_run
            if run.status in IN_PROGRESS:
                going = True
                continue
            if run.run_id in self.finished:
                continue
            finished = FinishedRun(
                run.run_id,
                run.status.value,
                ", ".join(key.to_user_string() for key in sorted(run.asset_selection or ())),
                _partition_label(dict(run.tags)),
                _launcher(dict(run.tags)),
                failure_messages(self.instance, run.run_id) if run.status == dg.DagsterRunStatus.FAILURE else (),
            )
            self.finished[run.run_id] = finished
            self.last_activity = max(self.last_activity, record.end_time or time.time())
            for line in finished.lines():
                self.echo(line)
        return going

    def wait_for_backfill(self, backfill_id: str) -> dict:
        while True:
            self.service.check_alive(f"backfill {backfill_id}")
            self.poll()
            backfill = self.service.backfill(backfill_id)
            if backfill["status"] not in UNFINISHED_BACKFILL_STATUSES:
                self.last_activity = max(self.last_activity, time.time())
                return backfill
            time.sleep(POLL_S)

    def wait_until_quiet(self, sensors: tuple[str, ...]) -> None:
        """Until no run is going and each running sensor has finished a tick begun after the last run ended: what
        new checkpoints and new scores lead to has then been launched and done."""
        while True:
            self.service.check_alive("the sensors")
            if not self.poll() and all(self._ticked_since_last_activity(sensor) for sensor in sensors):
                return
            time.sleep(POLL_S)

    def _ticked_since_last_activity(self, sensor: str) -> bool:
        tick = self.service.last_sensor_tick(sensor)
        if tick is None:
            return False
        return tick["status"] in FINISHED_TICK_STATUSES and tick["timestamp"] > self.last_activity

    @property
    def failed(self) -> list[FinishedRun]:
        return [run for run in self.finished.values() if run.status != "SUCCESS"]


def backfill_lines(backfill: dict) -> list[str]:
    """Per asset of the backfill: partitions targeted, materialized, and failed or left out because upstream
    failed."""
    lines = []
    for entry in (backfill.get("assetBackfillData") or {}).get("assetBackfillStatuses", []):
        name = "/".join(entry["assetKey"]["path"])
        if entry["__typename"] == "AssetPartitionsStatusCounts":
            targeted, done, failed = (
                entry["numPartitionsTargeted"],
                entry["numPartitionsMaterialized"],
                entry["numPartitionsFailed"],
            )
        else:
            targeted, done, failed = 1, int(entry["materialized"]), int(entry["failed"])
        note = f", {failed} failed or not run because upstream failed" if failed else ""
        lines.append(f"  {name}: {done} of {targeted} partitions materialized{note}")
    return lines


def backfill_failed(backfill: dict) -> bool:
    return backfill["status"] != "COMPLETED_SUCCESS" or any(
        entry.get("numPartitionsFailed") or entry.get("failed")
        for entry in (backfill.get("assetBackfillData") or {}).get("assetBackfillStatuses", [])
    )
