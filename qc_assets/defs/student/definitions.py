import dagster as dg

from qc_assets.defs.student.assets import StudentResource, build_student_asset
from qc_assets.defs.student.sensors import build_checkpoint_sensor
from qc_assets.graph import current_graph
from qc_assets.lake.tables import GENERATED_QUERIES, RERANKER_SCORES


@dg.definitions
def student() -> dg.Definitions:
    graph = current_graph()
    return dg.Definitions(
        assets=[build_student_asset(graph.settings.student_models)],
        sensors=[
            build_checkpoint_sensor(
                graph.by_shard.get_partition_keys(),
                graph.settings.data_root / "checkpoints",
                [dg.AssetKey(GENERATED_QUERIES.name), dg.AssetKey(RERANKER_SCORES.name)],
            )
        ],
        resources={
            "student": StudentResource.from_settings(graph.settings),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )
