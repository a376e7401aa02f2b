"""The whole graph from the UI, its daemon and webserver SIGKILLed in every stage, with the sensor firing during
the labelling runs and an analyst querying throughout (see `ui_whole_graph.py`)."""

from __future__ import annotations

import pytest

from qc_assets.testing.ui_whole_graph import (
    SHARDS,
    UI_KILL_POINTS,
    overlapping,
    run_whole_graph_from_the_ui,
)


def _range(partition: str) -> tuple[str, str, str]:
    """(checkpoint, first shard's number, last shard's number) of a sensor run's range `ckpt|shard-a…ckpt|shard-b`."""
    start, _, end = partition.partition("…")
    checkpoint, _, first = start.rpartition("|shard-")
    return checkpoint, first, (end or start).rpartition("|shard-")[2]


@pytest.mark.long(250)
@pytest.mark.timeout(1200)
def test_the_graph_run_from_the_ui_outlives_killed_daemons_and_webservers_with_the_sensor_and_an_analyst(tmp_path):
    report = run_whole_graph_from_the_ui(tmp_path)
    logs = "\n".join(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:] for path in report.ui_logs)
    assert [kill for kill in report.kills if not kill.killed] == [] and len(report.kills) == len(UI_KILL_POINTS), logs
    assert report.backfill_status == "COMPLETED_SUCCESS", logs
    assert [run for run in report.runs if run.status != "SUCCESS"] == [], logs

    backfill_runs = [run for run in report.runs if run.backfill]
    per_partition = [(asset, run.partition) for run in backfill_runs for asset in run.assets]
    assert sorted(set(per_partition)) == sorted(per_partition), "a backfill partition ran twice"
    assert any(overlapping(a, b) for a in backfill_runs for b in backfill_runs if a is not b), (
        "no backfill runs overlapped"
    )
    sensor_runs = [run for run in report.runs if run.sensor == "new_checkpoints"]
    # Each checkpoint (the trained one and the one dropped in) on every shard exactly once, in ranges of shards
    # whose labels were in: the one dropped in during labelling gets more than one.
    evaluated = [
        (checkpoint, f"shard-{index}")
        for run in sensor_runs
        for checkpoint, first, last in [_range(run.partition)]
        for index in range(int(first), int(last) + 1)
    ]
    assert sorted(evaluated) == sorted(
        (checkpoint, f"shard-{index}") for checkpoint in report.checkpoints for index in range(SHARDS)
    )
    assert report.sensor_fired_during_labelling

    assert report.keys_paid_twice == 0
    assert report.analyst_failures == [] and report.analyst_queries >= 5
    assert report.analyst_inconsistencies == []
    assert report.lake_problems == []
