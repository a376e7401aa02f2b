"""The Kubernetes deployment's code location: the same asset graph, each step in its own pod.

With the run launcher alone a run is one pod, sized by run tags, so a run that trains a student would
get no GPU. dagster-k8s's `k8s_job_executor` launches one Kubernetes Job per step and sizes it by that
step's op tags: the GPU stages carry GPU_POD and every other step stays on a CPU pod. Local runs use
`qc_assets.definitions`, whose executors ignore these tags.
"""

from __future__ import annotations

import json

import dagster as dg

from qc_assets.settings import load_settings

GPU_POD = {
    "dagster-k8s/config": json.dumps(
        {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
            # GPU node pools are commonly tainted so that CPU pods stay off them.
            "pod_spec_config": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            },
        }
    )
}

# The Dagster pool of the steps that use a GPU (training, local generation, scoring): its limit, QC_GPU_SLOTS,
# is how many such steps may run at once across every run of the instance, so a backfill, the sensor and a manual
# run never load two models onto one GPU.
GPU_POOL = "gpu"


@dg.definitions
def defs() -> dg.Definitions:
    # Imported here: dagster-k8s is the `deploy` extra, and the asset modules import GPU_POD from this
    # module while qc_assets.definitions imports them.
    from dagster_k8s import k8s_job_executor

    from qc_assets.definitions import build_definitions

    return dg.Definitions.merge(build_definitions(load_settings()), dg.Definitions(executor=k8s_job_executor))
