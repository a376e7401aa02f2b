"""`qc run`: materialize the graph, or a selection of it, for every partition, on the persistent instance.

Assets are grouped into stages of one partitioning, in dependency order; each partition of a stage is one
Dagster run, so the runs appear in the UI like runs launched there. A stage whose assets all have a single-run
backfill policy (generation and scoring, which load a model) is one run per partition range instead, as a
backfill from the UI would launch it: the whole stage in one run when every partition is selected. Runs of a
stage go in parallel worker processes. A partition whose same-keyed upstream failed is skipped, not run against
missing data.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from filelock import FileLock

from qc_assets.defs.generation.assets import SHARD_DIMENSION
from qc_assets.execution import GPU_POOL
from qc_assets.paths import PROJECT_ROOT
from qc_assets.settings import Settings

DEFINITIONS_MODULE = "qc_assets.definitions"
# Tells `qc run`'s runs from the UI's in the runs list (and for bench/scaling.py).
LAUNCHED_BY_TAG = "qc/launched_by"


def prepare_dagster_home(settings: Settings) -> str:
    """Point DAGSTER_HOME at QC_DATA_DIR/dagster with the project's dagster.yaml, so runs persist for the UI.

    The first process to open a fresh home creates its SQLite storages; two doing so at once collide
    ("table already exists"), so creation happens once, under a file lock. The `gpu` pool's limit is set to
    QC_GPU_SLOTS here, for `qc run` and the UI alike.
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
        with dg.DagsterInstance.get() as instance:
            storage = instance.event_log_storage
            pool = storage.get_concurrency_info(GPU_POOL)
            if pool.slot_count != settings.gpu_slots or pool.using_default_limit:
                storage.set_concurrency_slots(GPU_POOL, settings.gpu_slots)
    return str(home)


@dataclass(frozen=True)
class Stage:
    asset_keys: tuple[dg.AssetKey, ...]
    partitions_def: dg.PartitionsDefinition | None
    # Every asset has BackfillPolicy.single_run(): many partitions go in one run (a partition range).
    single_run: bool = False

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
    chosen = (dg.AssetSelection.from_string(selection) if selection else dg.AssetSelection.all()).resolve(graph)
    stages: list[Stage] = []
    for key in graph.toposorted_asset_keys:
        if key not in chosen or not graph.get(key).is_materializable:
            continue
        node = graph.get(key)
        partitions_def = node.partitions_def
        policy = node.backfill_policy
        single_run = partitions_def is not None and policy is not None and policy.max_partitions_per_run is None
        if stages and stages[-1].partitions_def == partitions_def:
            stages[-1] = Stage(stages[-1].asset_keys + (key,), partitions_def, stages[-1].single_run and single_run)
        else:
            stages.append(Stage((key,), partitions_def, single_run))
    return stages


@dataclass(frozen=True)
class PartitionBlock:
    """What one run materializes: one partition, or a range whose keys are exactly `keys`; None is the one run of an
    unpartitioned stage."""

    start: str | None
    end: str | None
    keys: tuple[str | None, ...]

    @property
    def label(self) -> str | None:
        return self.start if len(self.keys) == 1 else f"{self.start} … {self.end} ({len(self.keys)} partitions)"


def _contiguous_runs(ordered: Sequence[str], chosen: set[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    previous_chosen = False
    for key in ordered:
        if key in chosen:
            if previous_chosen:
                runs[-1].append(key)
            else:
                runs.append([key])
        previous_chosen = key in chosen
    return runs


def partition_blocks(
    partitions_def: dg.PartitionsDefinition, keys: list[str], instance: dg.DagsterInstance
) -> list[PartitionBlock]:
    """The fewest partition ranges that cover exactly `keys`: contiguous runs in the definition's order, and for two
    dimensions, rectangles (a multi-partition range is every combination of its dimensions' ranges)."""
    chosen = set(map(str, keys))
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        first, second = partitions_def.partitions_defs
        first_keys = first.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        second_keys = second.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        firsts_by_second: dict[str, set[str]] = {}
        for key in keys:
            dimensions = partitions_def.get_partition_key_from_str(str(key)).keys_by_dimension
            firsts_by_second.setdefault(dimensions[second.name], set()).add(dimensions[first.name])

        def key_of(a: str, b: str) -> str:
            return str(dg.MultiPartitionKey({first.name: a, second.name: b}))

        # Runs of consecutive second-dimension keys with the same first-dimension keys, then each of those split
        # into contiguous first-dimension runs: rectangles.
        groups: list[tuple[set[str], list[str]]] = []
        for run in _contiguous_runs(second_keys, set(firsts_by_second)):
            for b in run:
                if groups and groups[-1][0] == firsts_by_second[b] and groups[-1][1][-1] in run:
                    groups[-1][1].append(b)
                else:
                    groups.append((firsts_by_second[b], [b]))
        blocks = []
        covered: list[str] = []
        for firsts, seconds in groups:
            for run in _contiguous_runs(first_keys, firsts):
                block_keys = tuple(key_of(a, b) for a in run for b in seconds)
                blocks.append(PartitionBlock(key_of(run[0], seconds[0]), key_of(run[-1], seconds[-1]), block_keys))
                covered.extend(block_keys)
        if sorted(covered) == sorted(chosen) and len(covered) == len(chosen):
            return blocks
        return [PartitionBlock(str(key), str(key), (str(key),)) for key in keys]
    ordered = partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    return [PartitionBlock(run[0], run[-1], tuple(run)) for run in _contiguous_runs(ordered, chosen)]


def threads_per_run(concurrent_runs: int, cores: int | None = None) -> int:
    """The CPU threads each of `concurrent_runs` runs at once may use: the cores shared between them.

    Each torch process starts one thread per core, so two runs on two cores ran 4 busy threads and slowed model
    compute 10-50x. A user's own OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (cores or os.cpu_count() or 1) // max(1, concurrent_runs))


def _limit_threads(threads: int) -> None:
    """In a worker process, before a run: torch's threads here, and OMP_NUM_THREADS for the processes the run
    starts (the training subprocess, a multiprocess executor's steps)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # torch reads OMP_NUM_THREADS when imported; once it is, only set_num_threads changes its pool.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _execute_partition(
    asset_keys: tuple[dg.AssetKey, ...],
    partition: str | None,
    executor: str,
    range_end: str | None = None,
    threads: int = 1,
) -> tuple[str | None, bool, list[str]]:
    """Runs in a worker process: one Dagster run of one stage and partition, or of the partition range
    `partition`..`range_end`, with at most `threads` CPU threads for torch."""
    _limit_threads(threads)
    repository = ReconstructableRepository.for_module(DEFINITIONS_MODULE, "defs", str(PROJECT_ROOT))
    job = repository.get_definition().get_implicit_job_def_for_assets(list(asset_keys))
    if job is None:
        raise RuntimeError(f"{DEFINITIONS_MODULE} has no asset job for {', '.join(map(str, asset_keys))}")
    tags: Mapping[str, str]
    if partition and range_end is not None and range_end != partition:
        tags = {ASSET_PARTITION_RANGE_START_TAG: partition, ASSET_PARTITION_RANGE_END_TAG: range_end}
    elif partition:
        tags = job.get_tags_for_partition_key(partition, selected_asset_keys=list(asset_keys))
    else:
        tags = {}
    with dg.execute_job(
        repository.get_reconstructable_job(job.name),
        instance=_worker_instance(),
        asset_selection=list(asset_keys),
        tags={**tags, LAUNCHED_BY_TAG: "qc run"},
        run_config={
            "execution": {"config": {executor: {}}},
            "loggers": {"console": {"config": {"log_level": "INFO"}}},
        },
        raise_on_error=False,
    ) as result:
        errors = [_failure_message(event) for event in result.all_events if event.is_step_failure]
        return result.run_id, result.success, errors


_instance: dg.DagsterInstance | None = None


def _worker_instance() -> dg.DagsterInstance:
    """The worker process's instance, opened at its first run and kept for the rest: opening one checks every
    storage's schema, a third of a second of CPU per run."""
    global _instance
    if _instance is None:
        _instance = dg.DagsterInstance.get()
    return _instance


def _failure_message(event: dg.DagsterEvent) -> str:
    """The user's own words for a dg.Failure, else the innermost error, which names the real problem."""
    failure = event.step_failure_data
    if failure.user_failure_data and failure.user_failure_data.description:
        return failure.user_failure_data.description
    error = failure.error
    if error is None:
        return "the step failed and recorded no error"
    while error.cause is not None:
        error = error.cause
    return error.to_string().strip().splitlines()[0] if error.message is None else error.message.strip()


def select_shards(
    partitions_def: dg.PartitionsDefinition,
    keys: Sequence[str],
    shard_partitions: dg.PartitionsDefinition | None,
    shard_patterns: tuple[str, ...],
) -> Sequence[str]:
    """Keep the partitions whose shard matches one of the glob patterns; other partitionings (base models) stay whole."""
    if not shard_patterns:
        return keys

    def shard_of(key: str) -> str | None:
        if isinstance(partitions_def, dg.MultiPartitionsDefinition):
            multi_key = key if isinstance(key, dg.MultiPartitionKey) else partitions_def.get_partition_key_from_str(key)
            return multi_key.keys_by_dimension.get(SHARD_DIMENSION)
        return key if partitions_def == shard_partitions else None

    return [
        key
        for key in keys
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
            keys: Sequence[str | None] = (
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
            runnable: list[str | None] = []
            for partition in keys:
                if partition in upstream_failures:
                    outcome = RunOutcome(stage.label, partition, None, "skipped", ["an upstream partition failed"])
                    outcomes.append(outcome)
                    report(outcome)
                    continue
                runnable.append(partition)
            if stage.single_run and stage.partitions_def is not None and runnable:
                # A partitioned stage's keys are all strings.
                blocks = partition_blocks(stage.partitions_def, [key for key in runnable if key is not None], instance)
            else:
                blocks = [PartitionBlock(partition, partition, (partition,)) for partition in runnable]
            threads = threads_per_run(min(parallel, len(blocks)))
            futures = {
                block: pool.submit(_execute_partition, stage.asset_keys, block.start, executor, block.end, threads)
                for block in blocks
            }
            for block, future in futures.items():
                try:
                    run_id, success, errors = future.result()
                except Exception as error:
                    run_id, success, errors = None, False, [f"{type(error).__name__}: {error}"]
                label = block.label if block.start is not None else None
                outcome = RunOutcome(stage.label, label, run_id, "success" if success else "failure", errors)
                if not success:
                    for key in stage.asset_keys:
                        failed.setdefault(key, set()).update(block.keys)
                outcomes.append(outcome)
                report(outcome)
    return outcomes
