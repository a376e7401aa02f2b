"""The qc_assets code location: the whole asset graph, built from the QC_* settings."""

from __future__ import annotations

import dagster as dg

from qc_assets.defs.corpus.assets import CorpusResource, build_corpus_asset
from qc_assets.defs.sft.assets import SftResource, sft_dataset
from qc_assets.defs.student.assets import StudentResource, build_student_asset
from qc_assets.defs.teacher.assets import TeacherResource, build_discount_schedule, build_teacher_asset
from qc_assets.lake.resource import LakeResource
from qc_assets.settings import Settings, load_settings


def build_definitions(settings: Settings) -> dg.Definitions:
    corpus_source = CorpusResource.from_settings(settings)
    shards = corpus_source.open().shards()
    shard_partitions = dg.StaticPartitionsDefinition([shard.key for shard in shards])
    teacher_labels = build_teacher_asset(shard_partitions)
    teacher_job = dg.define_asset_job("teacher_labels_job", selection=[teacher_labels])
    return dg.Definitions(
        assets=[
            build_corpus_asset(shards, shard_partitions),
            teacher_labels,
            sft_dataset,
            build_student_asset(settings.student_models),
        ],
        jobs=[teacher_job],
        schedules=[build_discount_schedule(teacher_job, shard_partitions.get_partition_keys())],
        resources={
            "lake": LakeResource(catalog=settings.catalog, data_path=settings.data_path),
            "corpus_source": corpus_source,
            "teacher": TeacherResource.from_settings(settings),
            "sft": SftResource.from_settings(settings),
            "student": StudentResource.from_settings(settings),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_settings())

