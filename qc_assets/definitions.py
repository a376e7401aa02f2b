"""The qc_assets code location: the whole asset graph, built from the QC_* settings."""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

from qc_assets.defs.corpus.assets import CorpusResource, build_corpus_asset
from qc_assets.defs.corpus.sources import Shard
from qc_assets.defs.generation.assets import GenerationResource, build_generation_asset
from qc_assets.defs.report.assets import ReportResource, eval_summary, report_automation
from qc_assets.defs.scoring.assets import ScoringResource, build_scoring_asset
from qc_assets.defs.sft.assets import SftResource, sft_dataset
from qc_assets.defs.student.assets import StudentResource, build_student_asset
from qc_assets.defs.student.sensors import build_checkpoint_sensor
from qc_assets.defs.teacher.assets import TeacherResource, build_discount_schedule, build_teacher_asset
from qc_assets.execution import Environment, executor_for
from qc_assets.lake.resource import LakeResource
from qc_assets.orchestration.recovery import abandoned_runs_sensor
from qc_assets.partitions import evaluation_partitions, shard_partitions
from qc_assets.settings import Settings, load_settings

# The beta APIs used here (multi-dimension partition mappings, backfill policies) are deliberate, with Dagster
# pinned; unfiltered, their warnings repeat in every run process and bury the run's own log.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def build_definitions(
    settings: Settings, shards: list[Shard] | None = None, environment: Environment = "local"
) -> dg.Definitions:
    """The graph for `settings`, partitioned by `shards` (default: the corpus source's shards as listed now), with
    `environment`'s executor (qc_assets.execution)."""
    corpus_source = CorpusResource.from_settings(settings)
    if shards is None:
        shards = corpus_source.open().shards()
    by_shard = shard_partitions([shard.key for shard in shards])
    teacher_labels = build_teacher_asset(by_shard)
    teacher_job = dg.define_asset_job("teacher_labels_job", selection=[teacher_labels])
    by_checkpoint_and_shard = evaluation_partitions(by_shard)
    generated_queries = build_generation_asset(by_checkpoint_and_shard, settings.generation_backend)
    reranker_scores = build_scoring_asset(by_checkpoint_and_shard)
    return dg.Definitions(
        assets=[
            build_corpus_asset(shards, by_shard),
            teacher_labels,
            sft_dataset,
            build_student_asset(settings.student_models),
            generated_queries,
            reranker_scores,
            eval_summary,
        ],
        jobs=[teacher_job],
        schedules=[
            build_discount_schedule(
                teacher_job,
                by_shard.get_partition_keys(),
                TeacherResource.from_settings(settings).discount_window(),
            )
        ],
        sensors=[
            build_checkpoint_sensor(
                by_shard.get_partition_keys(),
                settings.data_root / "checkpoints",
                [generated_queries, reranker_scores],
            ),
            report_automation,
            abandoned_runs_sensor,
        ],
        resources={
            "lake": LakeResource(catalog=settings.catalog, data_path=settings.data_path),
            "corpus_source": corpus_source,
            "teacher": TeacherResource.from_settings(settings),
            "sft": SftResource.from_settings(settings),
            "student": StudentResource.from_settings(settings),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
            "generation": GenerationResource.from_settings(settings),
            "scoring": ScoringResource.from_settings(settings),
            "report": ReportResource.from_settings(settings),
        },
        executor=executor_for(environment),
    )


# Dagster reconstructs the code location five times in every run (job, execution plan, step); the graph is a
# function of the settings, the data directory they resolve to (a relative QC_DATA_DIR follows the working
# directory) and the shard listing alone, so a process builds it once for each.
_built: dict[tuple[Settings, Path, tuple[Shard, ...]], dg.Definitions] = {}


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    shards = tuple(CorpusResource.from_settings(settings).open().shards())
    key = (settings, settings.data_root, shards)
    if key not in _built:
        _built[key] = build_definitions(settings, list(shards))
    return _built[key]
