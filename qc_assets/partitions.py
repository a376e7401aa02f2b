"""The graph's partitionings, declared once: shards, checkpoints, and checkpoint × shard for evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

SHARD_DIMENSION = "shard"
# Also the name of the dynamic partitions definition, which the checkpoint sensor adds to.
CHECKPOINT_DIMENSION = "checkpoint"

CHECKPOINT_PARTITIONS = dg.DynamicPartitionsDefinition(name=CHECKPOINT_DIMENSION)


def shard_partitions(shard_keys: Sequence[str]) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(shard_keys))


def evaluation_partitions(shards: dg.PartitionsDefinition) -> dg.MultiPartitionsDefinition:
    """Generation and scoring: one partition per checkpoint and shard."""
    return dg.MultiPartitionsDefinition({CHECKPOINT_DIMENSION: CHECKPOINT_PARTITIONS, SHARD_DIMENSION: shards})


def contiguous_runs(ordered: Sequence[str], chosen: set[str]) -> list[list[str]]:
    """The keys of `chosen` in `ordered`'s order, split where a key is not chosen: each run is one partition range."""
    runs: list[list[str]] = []
    previous_chosen = False
    for key in ordered:
        if key in chosen:
            if previous_chosen:
                runs[-1].append(key)
            else:
                runs.append([key])
        previous_chosen = key in chosen
    return runs


def evaluation_key(checkpoint: str, shard: str) -> str:
    return str(dg.MultiPartitionKey({CHECKPOINT_DIMENSION: checkpoint, SHARD_DIMENSION: shard}))


# Dagster's documented run tags for a run over a partition range (what a single-run backfill launches).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
