"""What `qc run` asks Dagster for: one asset backfill over the selected assets and partitions.

The request is the one the UI's "Materialize" dialog sends (`launchPartitionBackfill` with `partitionsByAssets`), so
the daemon runs it as it runs the UI's: in dependency order, a single-run policy's partitions in one run, and a
partition whose upstream failed left unmaterialized, across partitionings. What follows from checkpoints trained
during the backfill (their queries, scores and the report) is the `new_checkpoints` sensor's and the report's
automation condition's, as under `qc ui`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from qc_assets.partitions import CHECKPOINT_PARTITIONS, contiguous_runs, evaluation_key

# Tells `qc run`'s backfills and runs from the UI's (and finds a killed `qc run`'s backfill).
LAUNCHED_BY_TAG = "qc/launched_by"
LAUNCHED_BY = "qc run"


@dataclass(frozen=True)
class AssetPartitions:
    key: dg.AssetKey
    # Contiguous (first, last) partition keys; None: every partition (or an unpartitioned asset).
    ranges: tuple[tuple[str, str], ...] | None

    def selector(self) -> dict:
        partitions = None if self.ranges is None else {"ranges": [{"start": a, "end": b} for a, b in self.ranges]}
        return {"assetKey": {"path": list(self.key.path)}, "partitions": partitions}


@dataclass(frozen=True)
class BackfillPlan:
    targets: tuple[AssetPartitions, ...]
    # Selected, but with no partition to materialize yet (no checkpoint), or downstream of one that has none: the
    # sensor and the automation condition materialize them once there is.
    deferred: tuple[dg.AssetKey, ...]

    def params(self, description: str) -> dict:
        return {
            "partitionsByAssets": [target.selector() for target in self.targets],
            "tags": [{"key": LAUNCHED_BY_TAG, "value": LAUNCHED_BY}],
            # A title may not hold a glob's `*`; the description may.
            "title": LAUNCHED_BY,
            "description": description,
        }


def matching_shards(shards: Sequence[str], patterns: tuple[str, ...]) -> set[str]:
    return {shard for shard in shards if any(fnmatch.fnmatchcase(shard, pattern) for pattern in patterns)}


def _ranges(
    partitions_def: dg.PartitionsDefinition, shard_keys: Sequence[str], shards: set[str], store: dg.DagsterInstance
) -> tuple[tuple[str, str], ...] | None:
    """The ranges covering `shards` of a shard-partitioned asset; for checkpoint × shard, every checkpoint with them
    (a multi-partition range is the product of its dimensions' ranges); None where the partitioning has no shard
    dimension (base models), which `--shard` leaves whole; () when no partition is left."""
    if not isinstance(partitions_def, dg.MultiPartitionsDefinition):
        ordered = partitions_def.get_partition_keys(dynamic_partitions_store=store)
        if list(ordered) != list(shard_keys):
            return None
        return tuple((run[0], run[-1]) for run in contiguous_runs(ordered, shards))
    checkpoints = CHECKPOINT_PARTITIONS.get_partition_keys(dynamic_partitions_store=store)
    if not checkpoints:
        return ()
    return tuple(
        (evaluation_key(checkpoints[0], run[0]), evaluation_key(checkpoints[-1], run[-1]))
        for run in contiguous_runs(shard_keys, shards)
    )


def plan_backfill(
    definitions: dg.Definitions,
    selection: str | None,
    shard_keys: Sequence[str],
    shard_patterns: tuple[str, ...],
    instance: dg.DagsterInstance,
) -> BackfillPlan:
    """The backfill for `selection` (a Dagster asset selection; None: every asset) over the shards matching
    `shard_patterns` (none: every shard), as it stands in `instance` now."""
    graph = definitions.resolve_asset_graph()
    chosen = (dg.AssetSelection.from_string(selection) if selection else dg.AssetSelection.all()).resolve(graph)
    shards = matching_shards(shard_keys, shard_patterns) if shard_patterns else set(shard_keys)
    targets: list[AssetPartitions] = []
    deferred: list[dg.AssetKey] = []
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if key not in chosen or not node.is_materializable:
            continue
        if any(parent in deferred for parent in node.parent_keys):
            deferred.append(key)
            continue
        partitions_def = node.partitions_def
        if partitions_def is None:
            targets.append(AssetPartitions(key, None))
            continue
        if not partitions_def.get_partition_keys(dynamic_partitions_store=instance):
            deferred.append(key)
            continue
        ranges = _ranges(partitions_def, shard_keys, shards, instance) if shard_patterns else None
        if ranges == ():
            deferred.append(key)
        else:
            targets.append(AssetPartitions(key, ranges))
    return BackfillPlan(tuple(targets), tuple(deferred))
