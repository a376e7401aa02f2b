"""The qc_assets code location: every stage's definitions under `qc_assets/defs/`, autoloaded by Dagster and built
from the QC_* settings."""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

import qc_assets.defs
from qc_assets.defs.corpus.assets import CorpusResource
from qc_assets.defs.corpus.sources import Shard
from qc_assets.execution import Environment
from qc_assets.graph import GraphSpec, building
from qc_assets.settings import Settings, load_settings

# The beta APIs used here (multi-dimension partition mappings, backfill policies) are deliberate, with Dagster
# pinned; unfiltered, their warnings repeat in every run process and bury the run's own log.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

PACKAGE_DIR = Path(__file__).parent


def build_definitions(
    settings: Settings, shards: list[Shard] | None = None, environment: Environment = "local"
) -> dg.Definitions:
    """The graph for `settings`, partitioned by `shards` (default: the corpus source's shards as listed now), with
    `environment`'s executor (qc_assets.execution)."""
    if shards is None:
        shards = CorpusResource.from_settings(settings).open().shards()
    with building(GraphSpec(settings, tuple(shards), environment)):
        return dg.ComponentTree.from_module(defs_module=qc_assets.defs, project_root=PACKAGE_DIR).build_defs()


# Dagster reconstructs the code location five times in every run (job, execution plan, step); the graph is a
# function of the settings, the data directory they resolve to (a relative QC_DATA_DIR follows the working
# directory) and the shard listing alone, so a process builds it once for each.
_built: dict[tuple[Settings, Path, tuple[Shard, ...]], dg.Definitions] = {}


@dg.definitions
def defs() -> dg.Definitions:
    settings = load_settings()
    shards = tuple(CorpusResource.from_settings(settings).open().shards())
    key = (settings, settings.data_root, shards)
    if key not in _built:
        _built[key] = build_definitions(settings, list(shards))
    return _built[key]
