"""The report's resource; the asset and its automation sensor, partitioned by nothing, are autoloaded from
`assets.py`."""

import dagster as dg

from qc_assets.defs.report.assets import ReportResource
from qc_assets.graph import current_graph


@dg.definitions
def report() -> dg.Definitions:
    return dg.Definitions(resources={"report": ReportResource.from_settings(current_graph().settings)})
