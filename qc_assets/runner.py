"""`qc run`: materialize the graph, or a selection of it, for every partition, on the persistent instance.

Assets are grouped into stages of one partitioning, in dependency order; each partition of a stage is one
Dagster run, so the runs appear in the UI like runs launched there. Runs of a stage go in parallel worker
processes. A partition whose same-keyed upstream failed is skipped, not run against missing data.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import dagster as dg
from filelock import FileLock
from dagster._core.definitions.reconstruct import ReconstructableRepository

from qc_assets.defs.generation.assets import SHARD_DIMENSION
from qc_assets.settings import PROJECT_ROOT, Settings

DEFINITIONS_MODULE = "qc_assets.definitions"


def prepare_dagster_home(settings: Settings) -> str:
    """Point DAGSTER_HOME at QC_DATA_DIR/dagster with the project's dagster.yaml, so runs persist for the UI.

    The first process to open a fresh home creates its SQLite storages; two doing so at once collide
    ("table already exists"), so creation happens once, under a file lock.
    """
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with FileLock(home / ".init.lock"):
        project_config = PROJECT_ROOT / "dagster.yaml"
        instance_config = home / "dagster.yaml"
        if project_config.exists() and (
            not instance_config.exists() or instance_config.read_bytes() != project_config.read_bytes()
        ):
            shutil.copyfile(project_config, instance_config)
        with dg.DagsterInstance.get():
            pass
    return str(home)


@dataclass(frozen=True)
class Stage:
    asset_keys: tuple[dg.AssetKey, ...]
    partitions_def: dg.PartitionsDefinition | None

    @property
    def label(self) -> str:
        return ", ".join(key.to_user_string() for key in self.asset_keys)


@dataclass
class RunOutcome:
    stage: str
    partition: str | None
    run_id: str | None
    status: str
    errors: list[str] = field(default_factory=list)


def plan_stages(definitions: dg.Definitions, selection: str | None) -> list[Stage]:
    graph = definitions.resolve_asset_graph()
    chosen = (
        dg.AssetSelection.from_string(selection) if selection else dg.AssetSelection.all()
    ).resolve(graph)
    stages: list[Stage] = []
    for key in graph.toposorted_asset_keys:
        if key not in chosen or not graph.get(key).is_materializable:
            continue
        partitions_def = graph.get(key).partitions_def
        if stages and stages[-1].partitions_def == partitions_def:
            stages[-1] = Stage(stages[-1].asset_keys + (key,), partitions_def)
        else:
            stages.append(Stage((key,), partitions_def))
    return stages


def _execute_partition(
    asset_keys: tuple[dg.AssetKey, ...], partition: str | None, executor: str
) -> tuple[str | None, bool, list[str]]:
    """Runs in a worker process: one Dagster run of one stage and partition."""
    repository = ReconstructableRepository.for_module(DEFINITIONS_MODULE, "defs", str(PROJECT_ROOT))
    job = repository.get_definition().get_implicit_job_def_for_assets(list(asset_keys))
    tags = job.get_tags_for_partition_key(partition, selected_asset_keys=list(asset_keys)) if partition else {}
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(
            repository.get_reconstructable_job(job.name),
            instance=instance,
            asset_selection=list(asset_keys),
            tags={**tags, "qc/launched_by": "qc run"},
            run_config={
                "execution": {"config": {executor: {}}},
                "loggers": {"console": {"config": {"log_level": "INFO"}}},
            },
            raise_on_error=False,
        ) as result:
            errors = [_failure_message(event) for event in result.all_events if event.is_step_failure]
            return result.run_id, result.success, errors


def _failure_message(event: dg.DagsterEvent) -> str:
    """The user's own words for a dg.Failure, else the innermost error, which names the real problem."""
    failure = event.step_failure_data
    if failure.user_failure_data and failure.user_failure_data.description:
        return failure.user_failure_data.description
    error = failure.error
    while error.cause is not None:
        error = error.cause
    return error.to_string().strip().splitlines()[0] if error.message is None else error.message.strip()


def select_shards(
    partitions_def: dg.PartitionsDefinition,
    keys: list[str],
    shard_partitions: dg.PartitionsDefinition,
    shard_patterns: tuple[str, ...],
) -> list[str]:
    """Keep the partitions whose shard matches one of the glob patterns; other partitionings (base models) stay whole."""
    if not shard_patterns:
        return keys

    def shard_of(key: str) -> str | None:
        if isinstance(partitions_def, dg.MultiPartitionsDefinition):
            return key.keys_by_dimension.get(SHARD_DIMENSION)
        return key if partitions_def == shard_partitions else None

    return [
        key for key in keys
        if (shard := shard_of(key)) is None or any(fnmatch.fnmatchcase(shard, pattern) for pattern in shard_patterns)
    ]


def run_stages(
    stages: list[Stage],
    instance: dg.DagsterInstance,
    parallel: int,
    executor: str,
    report: Callable[[RunOutcome], None],
    shard_partitions: dg.PartitionsDefinition | None = None,
    shard_patterns: tuple[str, ...] = (),
) -> list[RunOutcome]:
    outcomes: list[RunOutcome] = []
    failed: dict[dg.AssetKey, set[str | None]] = {}
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
        for stage in stages:
            keys = (
                select_shards(
                    stage.partitions_def,
                    stage.partitions_def.get_partition_keys(dynamic_partitions_store=instance),
                    shard_partitions,
                    shard_patterns,
                )
                if stage.partitions_def
                else [None]
            )
            upstream_failures: set[str | None] = set()
            for earlier in stages[: stages.index(stage)]:
                if earlier.partitions_def == stage.partitions_def:
                    for key in earlier.asset_keys:
                        upstream_failures |= failed.get(key, set())
            futures = {}
            for partition in keys:
                if partition in upstream_failures:
                    outcome = RunOutcome(stage.label, partition, None, "skipped", ["an upstream partition failed"])
                    outcomes.append(outcome)
                    report(outcome)
                    continue
                futures[partition] = pool.submit(_execute_partition, stage.asset_keys, partition, executor)
            for partition, future in futures.items():
                try:
                    run_id, success, errors = future.result()
                except Exception as error:
                    run_id, success, errors = None, False, [f"{type(error).__name__}: {error}"]
                outcome = RunOutcome(stage.label, partition, run_id, "success" if success else "failure", errors)
                if not success:
                    for key in stage.asset_keys:
                        failed.setdefault(key, set()).add(partition)
                outcomes.append(outcome)
                report(outcome)
    return outcomes
