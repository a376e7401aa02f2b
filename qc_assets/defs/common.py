"""What every stage shares: the lake, the deployment's executor and the sensor that fails runs whose process was
killed."""

import dagster as dg

from qc_assets.execution import executor_for
from qc_assets.graph import current_graph
from qc_assets.lake.resource import LakeResource
from qc_assets.orchestration.recovery import abandoned_runs_sensor


@dg.definitions
def common() -> dg.Definitions:
    graph = current_graph()
    return dg.Definitions(
        sensors=[abandoned_runs_sensor],
        resources={"lake": LakeResource(catalog=graph.settings.catalog, data_path=graph.settings.data_path)},
        executor=executor_for(graph.environment),
    )
