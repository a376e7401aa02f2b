"""The checkpoint sensor: a new complete checkpoint in the store becomes a partition and gets evaluated."""

import json
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from qc_assets.defs.student.store import list_checkpoints

CHECKPOINT_PARTITIONS = "checkpoint"


def register_checkpoint_partitions(instance: dg.DagsterInstance, root: Path, warn) -> list[str]:
    """Add every complete checkpoint of the store as a partition; returns the ones that were new."""
    known = set(instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS))
    new = [checkpoint.checkpoint for checkpoint in list_checkpoints(root, warn=warn) if checkpoint.checkpoint not in known]
    if new:
        instance.add_dynamic_partitions(CHECKPOINT_PARTITIONS, new)
    return new


def build_checkpoint_sensor(
    checkpoint_partitions: dg.DynamicPartitionsDefinition, shard_keys: list[str], root: Path, targets: list
) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_checkpoints",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=targets,
        description="Watches the checkpoint store; each new complete checkpoint (manifest present) becomes a "
        "`checkpoint` partition and gets its queries generated and scored for every shard, once, in one run.",
    )
    def new_checkpoints(context: dg.SensorEvaluationContext):
        seen = set(json.loads(context.cursor)) if context.cursor else set()
        complete = [checkpoint.checkpoint for checkpoint in list_checkpoints(root, warn=context.log.warning)]
        new = [checkpoint for checkpoint in complete if checkpoint not in seen]
        if not new:
            return dg.SkipReason(f"no new complete checkpoint under {root}")
        registered = set(context.instance.get_dynamic_partitions(CHECKPOINT_PARTITIONS))
        to_add = [checkpoint for checkpoint in new if checkpoint not in registered]
        context.log.info(f"new checkpoints: {', '.join(new)}")
        return dg.SensorResult(
            dynamic_partitions_requests=[checkpoint_partitions.build_add_request(to_add)] if to_add else [],
            # One run per checkpoint, over all its shards (a partition range, as a backfill with a single-run policy
            # would launch it): the checkpoint is loaded once, not once a shard.
            run_requests=[
                dg.RunRequest(
                    run_key=checkpoint,
                    tags={
                        ASSET_PARTITION_RANGE_START_TAG: str(
                            dg.MultiPartitionKey({CHECKPOINT_PARTITIONS: checkpoint, "shard": shard_keys[0]})),
                        ASSET_PARTITION_RANGE_END_TAG: str(
                            dg.MultiPartitionKey({CHECKPOINT_PARTITIONS: checkpoint, "shard": shard_keys[-1]})),
                    },
                )
                for checkpoint in new
            ],
            cursor=json.dumps(sorted(seen | set(new))),
        )

    return new_checkpoints
