import dagster as dg

from qc_assets.defs.teacher.assets import TeacherResource, build_discount_schedule, build_teacher_asset
from qc_assets.graph import current_graph


@dg.definitions
def teacher() -> dg.Definitions:
    graph = current_graph()
    resource = TeacherResource.from_settings(graph.settings)
    teacher_labels = build_teacher_asset(graph.by_shard)
    job = dg.define_asset_job("teacher_labels_job", selection=[teacher_labels])
    return dg.Definitions(
        assets=[teacher_labels],
        jobs=[job],
        schedules=[build_discount_schedule(job, graph.by_shard.get_partition_keys(), resource.discount_window())],
        resources={"teacher": resource},
    )
