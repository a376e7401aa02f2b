"""The Kubernetes deployment's code location: the same asset graph, each step in its own pod.

The executor and the GPU steps' tags are chosen in `qc_assets.execution`; local runs use `qc_assets.definitions`.
"""

from __future__ import annotations

import dagster as dg

from qc_assets.definitions import build_definitions
from qc_assets.settings import load_settings


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_settings(), environment="kubernetes")
