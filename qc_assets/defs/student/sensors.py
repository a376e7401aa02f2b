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
    """The shards whose corpus and teacher labels are materialized: a checkpoint is evaluated on those only, so a
    failed or missing upstream partition leaves its evaluation partitions unmaterialized, as in a backfill."""
    corpus = instance.get_materialized_partitions(dg.AssetKey(CORPUS.name))
    labels = instance.get_materialized_partitions(dg.AssetKey(TEACHER_LABELS.name))
    return set(shard_keys) & corpus & labels


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
        ready = ready_shards(context.instance, shard_keys)
        if not ready:
            return dg.SkipReason(f"new checkpoints {', '.join(new)}: no shard has its corpus and labels yet")
        if len(ready) < len(shard_keys):
            context.log.warning(
                f"{len(shard_keys) - len(ready)} shards have no materialized corpus or labels and are left out "
                "(a later backfill, `qc run` for one, evaluates them)"
            )
        registered = set(context.instance.get_dynamic_partitions(CHECKPOINT_DIMENSION))
        to_add = [checkpoint for checkpoint in new if checkpoint not in registered]
        context.log.info(f"new checkpoints: {', '.join(new)}")
        ranges = contiguous_runs(shard_keys, ready)
        return dg.SensorResult(
            dynamic_partitions_requests=[CHECKPOINT_PARTITIONS.build_add_request(to_add)] if to_add else [],
            # One run per checkpoint over its shards (a partition range, as a backfill with a single-run policy
            # would launch it): the checkpoint is loaded once, not once a shard.
            run_requests=[
                dg.RunRequest(
                    run_key=checkpoint if len(ranges) == 1 else f"{checkpoint}|{shards[0]}",
                    tags={
                        RANGE_START_TAG: evaluation_key(checkpoint, shards[0]),
                        RANGE_END_TAG: evaluation_key(checkpoint, shards[-1]),
                    },
                )
                for checkpoint in new
                for shards in ranges
            ],
            cursor=json.dumps(sorted(seen | set(new))),
        )

    return new_checkpoints
