"""Where steps run, chosen here for every environment: the GPU steps' op tags and pool, and each environment's executor.

A leaf module: the asset modules import their tags from it and the code locations (`qc_assets.definitions`
locally, `qc_assets.deploy` on Kubernetes) their executor, so imports flow one way, from the code locations
to the assets to this module, and nothing here imports the project.

With the run launcher alone a Kubernetes run is one pod, sized by run tags, so a run that trains a student would
get no GPU. dagster-k8s's `k8s_job_executor` launches one Kubernetes Job per step and sizes it by that step's op
tags: the GPU stages carry GPU_POD and every other step stays on a CPU pod. The local executors ignore these tags.
"""

from __future__ import annotations

import json
from typing import Literal

import dagster as dg

Environment = Literal["local", "kubernetes"]

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


def executor_for(environment: Environment) -> dg.ExecutorDefinition | None:
    """The executor of every job in `environment`; None: Dagster's default (in-process or multiprocess, which
    `qc run` picks per run)."""
    if environment == "local":
        return None
    if environment == "kubernetes":
        # Imported here: dagster-k8s is the `deploy` extra, which local installs lack.
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"unknown environment {environment!r}; known: local, kubernetes")
