"""The training pairs' resource; the asset, partitioned by nothing, is autoloaded from `assets.py`."""

import dagster as dg

from qc_assets.defs.training_pairs.assets import TrainingPairsResource
from qc_assets.graph import current_graph


@dg.definitions
def training_pairs() -> dg.Definitions:
    return dg.Definitions(resources={"training": TrainingPairsResource.from_settings(current_graph().settings)})
