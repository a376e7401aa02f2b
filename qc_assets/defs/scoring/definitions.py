import dagster as dg

from qc_assets.defs.scoring.assets import ScoringResource, build_scoring_asset
from qc_assets.graph import current_graph


@dg.definitions
def scoring() -> dg.Definitions:
    graph = current_graph()
    return dg.Definitions(
        assets=[build_scoring_asset(graph.by_checkpoint_and_shard)],
        resources={"scoring": ScoringResource.from_settings(graph.settings)},
    )
