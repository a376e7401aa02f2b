import dagster as dg

from qc_assets.defs.generation.assets import GenerationResource, build_generation_asset
from qc_assets.graph import current_graph


@dg.definitions
def generation() -> dg.Definitions:
    graph = current_graph()
    return dg.Definitions(
        assets=[build_generation_asset(graph.by_checkpoint_and_shard, graph.settings.generation_backend)],
        resources={"generation": GenerationResource.from_settings(graph.settings)},
    )
