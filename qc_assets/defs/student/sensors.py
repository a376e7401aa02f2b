"""The checkpoint sensor: a new complete checkpoint in the store becomes a partition and gets evaluated."""

import json
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from qc_assets.defs.student.store import list_checkpoints
from qc_assets.lake.tables import CORPUS, TEACHER_LABELS
from qc_assets.partitions import (
    CHECKPOINT_DIMENSION,
    CHECKPOINT_PARTITIONS,
    RANGE_END_TAG,
    RANGE_START_TAG,
    contiguous_runs,
    evaluation_key,
)

# Short, so that `qc run` goes on to a new checkpoint's evaluation soon after training; a tick lists one directory.
SENSOR_INTERVAL_S = 5
CHECKPOINT_SENSOR = "new_checkpoints"


def ready_shards(instance: dg.DagsterInstance, shard_keys: Sequence[str]) -> set[str]:
    """The shards whose corpus and teacher labels are materialized: a checkpoint is evaluated on a shard only once it
    is, so a failed or missing upstream partition leaves its evaluation partitions unmaterialized, as in a backfill."""
    corpus = instance.get_materialized_partitions(dg.AssetKey(CORPUS.name))
    labels = instance.get_materialized_partitions(dg.AssetKey(TEACHER_LABELS.name))
    return set(shard_keys) & corpus & labels


# In the cursor: every shard of the checkpoint has been requested.
EVERY_SHARD = "*"


def _requested(cursor: str | None) -> dict[str, list[str] | str]:
    """checkpoint -> the shards already requested for it (or EVERY_SHARD)."""
    return json.loads(cursor) if cursor else {}


def build_checkpoint_sensor(
    shard_keys: Sequence[str], root: Path, targets: Sequence[dg.AssetKey]
) -> dg.SensorDefinition:
    @dg.sensor(
        name=CHECKPOINT_SENSOR,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=targets,
        description="Watches the checkpoint store; each new complete checkpoint (manifest present) becomes a "
        "`checkpoint` partition and gets its queries generated and scored on each shard once, as soon as that "
        "shard's corpus and labels are materialized, in one run per range of such shards.",
    )
    def new_checkpoints(context: dg.SensorEvaluationContext):
        requested = _requested(context.cursor)
        pending = {
            checkpoint.checkpoint: [
                shard for shard in shard_keys if shard not in requested.get(checkpoint.checkpoint, [])
            ]
            for checkpoint in list_checkpoints(root, warn=context.log.warning)
            if requested.get(checkpoint.checkpoint) != EVERY_SHARD
        }
        if not any(pending.values()):
            return dg.SkipReason(f"no new complete checkpoint under {root}")
        ready = ready_shards(context.instance, shard_keys)
        ranges = {
            checkpoint: contiguous_runs(shard_keys, set(shards) & ready) for checkpoint, shards in pending.items()
        }
        ranges = {checkpoint: runs for checkpoint, runs in ranges.items() if runs}
        if not ranges:
            return dg.SkipReason(f"checkpoints {', '.join(pending)} wait for their shards' corpus and labels")
        registered = set(context.instance.get_dynamic_partitions(CHECKPOINT_DIMENSION))
        to_add = [checkpoint for checkpoint in ranges if checkpoint not in registered]
        context.log.info(f"evaluating checkpoints {', '.join(ranges)}")
        for checkpoint, runs in ranges.items():
            done = {*requested.get(checkpoint, []), *(shard for run in runs for shard in run)}
            requested[checkpoint] = EVERY_SHARD if done >= set(shard_keys) else sorted(done)
        return dg.SensorResult(
            dynamic_partitions_requests=[CHECKPOINT_PARTITIONS.build_add_request(to_add)] if to_add else [],
            # One run per range of shards (as a backfill with a single-run policy would launch it): the checkpoint
            # is loaded once a run, not once a shard.
            run_requests=[
                dg.RunRequest(
                    run_key=checkpoint if len(shards) == len(shard_keys) else f"{checkpoint}|{shards[0]}…{shards[-1]}",
                    tags={
                        RANGE_START_TAG: evaluation_key(checkpoint, shards[0]),
                        RANGE_END_TAG: evaluation_key(checkpoint, shards[-1]),
                    },
                )
                for checkpoint, runs in ranges.items()
                for shards in runs
            ],
            cursor=json.dumps(requested),
        )

    return new_checkpoints
