"""The whole graph run from the UI, as a user runs it there, while its daemon and webserver are SIGKILLed.

One asset backfill materializes the upstream stages (every shard's corpus and labels, the SFT dataset, the
student); the checkpoint sensor then generates and scores for each new checkpoint, and the report's automation
condition refreshes the report. A checkpoint dropped into the store by hand once the corpus is in makes the sensor
fire during the labelling runs: the first shard's labels are in quickly, and the teacher answers the other shards
slowly until a run of the sensor's has started beside their runs and their kill points have been reached. An
analyst queries the lake throughout.

At each kill point (a run of that stage has started) the daemon or the webserver is SIGKILLed, which takes `qc ui`
down, and `qc ui` is started again, as a user would: runs already started finish on their own, and the backfill,
the sensor and the automation go on from where they were.

Used by `test_ui_whole_graph.py` (one kill per stage) and `bench/reliability.py` (both victims in every stage).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from qc_assets.categories import CATEGORIES
from qc_assets.defs.student.store import MANIFEST, list_checkpoints
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import TEACHER_SOURCE_PREFIX
from qc_assets.models.tiny import STUDENT_DIR, ensure_tiny_models, sample_texts
from qc_assets.orchestration.session import IN_PROGRESS
from qc_assets.settings import load_settings
from qc_assets.testing.analyst import analyst_session, inconsistencies
from qc_assets.testing.crash_resume import graph_environment, shard_document_head, write_multi_shard_corpus
from qc_assets.testing.dagster_ui import DagsterUI
from qc_assets.testing.teacher_server import chat_requests, run_teacher_server

SHARDS = 3
DOCUMENTS = 4
TEACHER_CONCURRENCY = 2
# Every shard but the first labels slowly until the sensor's first run (on the first shard, whose labels are in
# quickly) has started beside the other shards' labelling runs and their kill points have been reached; fast from
# then on.
SLOW_TEACHER_S = 8
UPSTREAM = ["corpus", "teacher_labels", "sft_dataset", "student_checkpoints"]
LABELLING_RUN = {"corpus", "teacher_labels"}
# Between the analyst's queries: the session runs for minutes, and back-to-back `qc sql` processes would take a core.
ANALYST_PAUSE_S = 2.0
# The graph's stages in order; the sensor's runs materialize generated_queries and reranker_scores together.
STAGES = (*UPSTREAM, "generated_queries", "eval_summary")
SENSOR_TAG = "dagster/sensor_name"
BACKFILL_TAG = "dagster/backfill"


@dataclass(frozen=True)
class UIKill:
    stage: str  # once a run materializing this asset has started
    victim: str  # "webserver" or "daemon" is SIGKILLed
    after_requests: int = 0  # and the teacher has answered this many requests


# Corpus and labels of a shard go in one run of the backfill: its corpus is killed at the run's start, its labels
# once labelling is under way.
LABELLING_UNDER_WAY = 10
# One kill per stage, the victims alternating.
UI_KILL_POINTS = tuple(
    UIKill(stage, ("webserver", "daemon")[index % 2], LABELLING_UNDER_WAY if stage == "teacher_labels" else 0)
    for index, stage in enumerate(STAGES)
)
# Both victims in every stage.
EVERY_UI_KILL = tuple(
    UIKill(stage, victim, LABELLING_UNDER_WAY if stage == "teacher_labels" else 0)
    for stage in STAGES
    for victim in ("webserver", "daemon")
)


@dataclass
class UIKillOutcome:
    point: UIKill
    killed: bool  # killed while a run of the stage was going, and `qc ui` shut down
    at_seconds: float


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str
    assets: tuple[str, ...]
    partition: str | None  # or the partition range
    sensor: str | None
    backfill: str | None
    start: float | None
    end: float | None


@dataclass
class UISessionReport:
    kills: list[UIKillOutcome] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    backfill_status: str | None = None
    sensor_fired_during_labelling: bool = False
    keys_paid_twice: int = 0
    analyst_queries: int = 0
    analyst_failures: list[str] = field(default_factory=list)
    analyst_inconsistencies: list[str] = field(default_factory=list)
    lake_problems: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ui_logs: list[Path] = field(default_factory=list)


def slow_labelling_plan() -> dict:
    """The teacher server's plan: each document of every shard but the first answered after SLOW_TEACHER_S."""
    return {
        "latency_ms": 0,
        "rules": [
            {"behavior": "slow", "delay_s": SLOW_TEACHER_S, "text_contains": shard_document_head(shard, index)}
            for shard in range(1, SHARDS)
            for index in range(DOCUMENTS)
        ],
    }


def ui_environment(data_dir: Path, corpus: Path, server) -> dict[str, str]:
    """The `qc run` kill test's environment, with a free teacher at two requests in flight."""
    return {
        **graph_environment(data_dir, corpus, server),
        "QC_TEACHER_MODEL": "ui-teacher",
        "QC_TEACHER_PRICE": "free",
        "QC_TEACHER_CONCURRENCY": str(TEACHER_CONCURRENCY),
        "QC_TEACHER_BATCH_SIZE": "2",
    }


def drop_in_checkpoint(data_dir: Path) -> str:
    """A checkpoint trained elsewhere, dropped into the store by hand: the tiny base model with a manifest."""
    models = ensure_tiny_models(data_dir / "models", sample_texts())
    name = "tiny--handmade--20260101T000000Z"
    target = data_dir / "checkpoints" / "tiny" / name
    staging = target.parent / f".{name}.partial"
    shutil.copytree(models[STUDENT_DIR], staging)
    (staging / MANIFEST).write_text(
        json.dumps(
            {
                "checkpoint": name,
                "base_model": "tiny",
                "dataset_version": "handmade",
                "hyperparameters": {},
                "metrics": {},
                "created_at": "2026-01-01T00:00:00+00:00",
                "tiny_model": True,
            }
        )
    )
    staging.rename(target)
    return name


def summarize(record: dg.RunRecord) -> RunSummary:
    run = record.dagster_run
    return RunSummary(
        run.run_id,
        run.status.value,
        tuple(sorted(key.to_user_string() for key in run.asset_selection or ())),
        run.tags.get(PARTITION_NAME_TAG)
        or (
            f"{run.tags[ASSET_PARTITION_RANGE_START_TAG]}…{run.tags[ASSET_PARTITION_RANGE_END_TAG]}"
            if ASSET_PARTITION_RANGE_START_TAG in run.tags
            else None
        ),
        run.tags.get(SENSOR_TAG),
        run.tags.get(BACKFILL_TAG),
        record.start_time,
        record.end_time,
    )


def overlapping(first: RunSummary, second: RunSummary) -> bool:
    return bool(
        first.start
        and second.start
        and first.start < (second.end or time.time())
        and second.start < (first.end or time.time())
    )


def lake_problems(data_dir: Path, checkpoints: list[str]) -> list[str]:
    """The end state a user expects: every label once, each checkpoint's queries for the same test documents, a
    score for each of those and for the teacher's labels, and a report row per source and category."""
    settings = load_settings({"QC_DATA_DIR": str(data_dir)})
    lake = LakeResource(catalog=settings.catalog, data_path=settings.data_path, read_only=True)
    problems = []
    with lake.get_connection() as connection:

        def one(query: str) -> tuple:
            row = connection.execute(query).fetchone()
            assert row is not None, f"an aggregate query returns one row: {query}"
            return row

        labels, distinct_labels, documents = one(
            "SELECT count(*), count(DISTINCT (doc_id, category)), (SELECT count(*) FROM corpus) FROM teacher_labels"
        )
        if not labels == distinct_labels == documents * len(CATEGORIES) == SHARDS * DOCUMENTS * len(CATEGORIES):
            problems.append(f"labels: {labels} rows, {distinct_labels} distinct, for {documents} documents")
        generated = dict(
            connection.execute(
                "SELECT checkpoint, list(DISTINCT (doc_id, category) ORDER BY (doc_id, category)) FROM generated_queries "
                "GROUP BY checkpoint"
            ).fetchall()
        )
        rows, distinct = one("SELECT count(*), count(DISTINCT (checkpoint, doc_id, category)) FROM generated_queries")
        if (
            sorted(generated) != sorted(checkpoints)
            or rows != distinct
            or len({repr(v) for v in generated.values()}) != 1
        ):
            problems.append(f"generated queries: {rows} rows ({distinct} distinct) for checkpoints {sorted(generated)}")
            return problems
        expected = {tuple(pair) for pair in next(iter(generated.values()))}
        if not expected:
            problems.append("no test documents were generated for")
        scored = dict(
            connection.execute(
                "SELECT source, list((doc_id, category)) FROM reranker_scores GROUP BY source"
            ).fetchall()
        )
        if len(scored) != len(checkpoints) + 1:
            problems.append(f"scores for sources {sorted(scored)}, expected the checkpoints and the teacher")
        # The teacher is scored on every labelled document (its train split makes training pairs), students on the
        # test split; the report compares both on the test split.
        labelled = set(connection.execute("SELECT DISTINCT doc_id, category FROM teacher_labels").fetchall())
        for source, pairs in scored.items():
            pairs = [tuple(pair) for pair in pairs]
            wanted = labelled if source.startswith(TEACHER_SOURCE_PREFIX) else expected
            if len(pairs) != len(set(pairs)) or set(pairs) != wanted:
                problems.append(
                    f"scores of {source}: {len(pairs)} rows, {len(set(pairs))} distinct, {len(wanted)} expected"
                )
        report = connection.execute("SELECT source, category, n FROM eval_summary").fetchall()
        per_category = [(category, len(expected) // len(CATEGORIES)) for category in CATEGORIES]
        if sorted(report) != sorted(
            (source, category, n) for source in scored for category, n in [*per_category, ("all", len(expected))]
        ):
            problems.append(f"eval_summary: {sorted(report)}")
    return problems


def run_whole_graph_from_the_ui(
    work: Path, points: tuple[UIKill, ...] = UI_KILL_POINTS, timeout_s: float = 900
) -> UISessionReport:
    corpus = write_multi_shard_corpus(work / "corpus", shards=SHARDS, documents=DOCUMENTS)
    data_dir = work / "data"
    with run_teacher_server(work, slow_labelling_plan()) as server:
        env = ui_environment(data_dir, corpus, server)
        ensure_tiny_models(data_dir / "models", sample_texts())
        session = _Session(work, env, server, points)
        try:
            session.ui.wait_until_loaded()
            # Opened once `qc ui` has created the instance's storages: two processes creating them collide.
            session.instance = dg.DagsterInstance.from_config(str(data_dir / "dagster"))
            with analyst_session(work, env, pause_s=ANALYST_PAUSE_S) as analyst:
                session.run(timeout_s)
                final = analyst.final_by_shard()
        finally:
            session.ui.stop()
            if session.instance is not None:
                session.instance.dispose()
        report = session.report
        report.keys_paid_twice = sum(
            count - 1
            for count in Counter(
                (entry["category"], entry["text_key"]) for entry in chat_requests(server) if entry["delivered"]
            ).values()
        )
    report.analyst_queries = len(analyst.answers)
    report.analyst_failures = analyst.failures
    report.analyst_inconsistencies = inconsistencies(analyst.answers, final)
    report.checkpoints = [checkpoint.checkpoint for checkpoint in list_checkpoints(data_dir / "checkpoints")]
    report.lake_problems = lake_problems(data_dir, report.checkpoints)
    report.seconds = round(time.monotonic() - session.started, 1)
    return report


class _Session:
    """One `qc ui` at a time over the data directory, and what happened to it."""

    def __init__(self, work: Path, env: dict[str, str], server, points: tuple[UIKill, ...]):
        self.work, self.env, self.server = work, env, server
        self.data_dir = Path(env["QC_DATA_DIR"])
        self.pending = list(points)
        self.report = UISessionReport()
        self.started = time.monotonic()
        self.ui = self._start_ui()
        self.instance: dg.DagsterInstance | None = None
        self.dropped: str | None = None
        self.sped_up = False

    def _start_ui(self) -> DagsterUI:
        ui = DagsterUI(self.env, self.work / f"ui-{len(self.report.ui_logs)}.log").start()
        self.report.ui_logs.append(ui.log_path)
        return ui

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def run(self, timeout_s: float) -> None:
        """Launch the backfill and watch the runs until the graph is done, killing and restarting `qc ui` at each
        kill point."""
        instance = self.instance
        if instance is None:
            raise RuntimeError("open the Dagster instance (session.instance) before run()")
        backfill = self.ui.launch_asset_backfill(UPSTREAM)
        deadline = self.started + timeout_s
        while True:
            runs = [summarize(record) for record in instance.get_run_records()]
            running = [run for run in runs if run.status == "STARTED"]
            self._drop_in_once_the_corpus_is_in(instance)
            self._speed_up_the_teacher_once_labelling_has_seen_the_sensor_and_its_kills(runs, running)
            if self._kill_at_a_ready_point(running):
                continue
            in_progress = [run for run in runs if dg.DagsterRunStatus(run.status) in IN_PROGRESS]
            if not in_progress and _graph_done(instance, backfill, self.data_dir):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the graph was not done after {timeout_s:.0f}s; runs in progress: {in_progress}; "
                    f"UI output:\n{self.ui.log_tail()}"
                )
            time.sleep(0.2)
        self.report.kills += [UIKillOutcome(point, False, self._elapsed()) for point in self.pending]
        self.report.backfill_status = _backfill(instance, backfill).status.value
        self.report.runs = [summarize(record) for record in instance.get_run_records()]

    def _drop_in_once_the_corpus_is_in(self, instance: dg.DagsterInstance) -> None:
        shards = {f"shard-{index}" for index in range(SHARDS)}
        if self.dropped is None and set(instance.get_materialized_partitions(dg.AssetKey("corpus"))) == shards:
            self.dropped = drop_in_checkpoint(self.data_dir)

    def _speed_up_the_teacher_once_labelling_has_seen_the_sensor_and_its_kills(self, runs, running) -> None:
        if not self.report.sensor_fired_during_labelling and any(
            run.sensor == "new_checkpoints" and "teacher_labels" in other.assets and overlapping(run, other)
            for run in running
            for other in runs
        ):
            self.report.sensor_fired_during_labelling = True
        if (
            self.report.sensor_fired_during_labelling
            and not self.sped_up
            and not any(point.stage in LABELLING_RUN for point in self.pending)
        ):
            self.server.set_plan({"latency_ms": 0, "rules": []})
            self.sped_up = True

    def _kill_at_a_ready_point(self, running: list[RunSummary]) -> bool:
        stages_running = {asset for run in running for asset in run.assets}
        ready = [point for point in self.pending if point.stage in stages_running]
        if any(point.after_requests for point in ready):
            answered = len(chat_requests(self.server))
            ready = [point for point in ready if answered >= point.after_requests]
        if not ready:
            return False
        point = ready[0]
        self.report.kills.append(UIKillOutcome(point, self.ui.kill(point.victim), self._elapsed()))
        self.pending.remove(point)
        # Not waited for: runs of the next stage may start and end while the webserver loads, and the next kill
        # needs only its victim's process.
        self.ui = self._start_ui()
        return True


def _backfill(instance: dg.DagsterInstance, backfill_id: str) -> PartitionBackfill:
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        raise RuntimeError(f"backfill {backfill_id} not found in the Dagster instance")
    return backfill


def _graph_done(instance: dg.DagsterInstance, backfill: str, data_dir: Path) -> bool:
    """The backfill finished, every checkpoint scored for every shard, and the report newer than the last score."""
    if _backfill(instance, backfill).status == BulkActionStatus.REQUESTED:
        return False
    checkpoints = list_checkpoints(data_dir / "checkpoints")
    scored = instance.get_materialized_partitions(dg.AssetKey("reranker_scores"))
    if len(checkpoints) < 2 or len(scored) < len(checkpoints) * SHARDS:
        return False
    latest_scores = instance.get_latest_materialization_event(dg.AssetKey("reranker_scores"))
    latest_report = instance.get_latest_materialization_event(dg.AssetKey("eval_summary"))
    assert latest_scores is not None, "reranker_scores has materialized partitions"
    return latest_report is not None and latest_report.timestamp > latest_scores.timestamp
