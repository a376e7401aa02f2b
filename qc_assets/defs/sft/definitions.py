"""The SFT dataset's resource; the asset itself, partitioned by nothing, is autoloaded from `assets.py`."""

import dagster as dg

from qc_assets.defs.sft.assets import SftResource
from qc_assets.graph import current_graph


@dg.definitions
def sft() -> dg.Definitions:
    return dg.Definitions(resources={"sft": SftResource.from_settings(current_graph().settings)})
