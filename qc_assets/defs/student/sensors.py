"""The checkpoint sensor: a new complete checkpoint in the store becomes a partition and gets evaluated."""

import json
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from qc_assets.defs.student.store import list_checkpoints
from qc_assets.partitions import (
    CHECKPOINT_DIMENSION,
    CHECKPOINT_PARTITIONS,
    RANGE_END_TAG,
    RANGE_START_TAG,
    evaluation_key,
)

# Short, so that `qc run` goes on to a new checkpoint's evaluation soon after training; a tick lists one directory.
SENSOR_INTERVAL_S = 5
CHECKPOINT_SENSOR = "new_checkpoints"


def build_checkpoint_sensor(
    shard_keys: Sequence[str], root: Path, targets: list[dg.AssetsDefinition]
) -> dg.SensorDefinition:
    @dg.sensor(
        name=CHECKPOINT_SENSOR,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
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
        registered = set(context.instance.get_dynamic_partitions(CHECKPOINT_DIMENSION))
        to_add = [checkpoint for checkpoint in new if checkpoint not in registered]
        context.log.info(f"new checkpoints: {', '.join(new)}")
        return dg.SensorResult(
            dynamic_partitions_requests=[CHECKPOINT_PARTITIONS.build_add_request(to_add)] if to_add else [],
            # One run per checkpoint, over all its shards (a partition range, as a backfill with a single-run policy
            # would launch it): the checkpoint is loaded once, not once a shard.
            run_requests=[
                dg.RunRequest(
                    run_key=checkpoint,
                    tags={
                        RANGE_START_TAG: evaluation_key(checkpoint, shard_keys[0]),
                        RANGE_END_TAG: evaluation_key(checkpoint, shard_keys[-1]),
                    },
                )
                for checkpoint in new
            ],
            cursor=json.dumps(sorted(seen | set(new))),
        )

    return new_checkpoints
