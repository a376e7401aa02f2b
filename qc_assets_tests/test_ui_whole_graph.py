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


@pytest.mark.long(300)
@pytest.mark.timeout(900)
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
    # One run per checkpoint (the trained one and the one dropped in), over every shard.
    assert sorted(run.partition for run in sensor_runs) == sorted(
        f"{checkpoint}|shard-0…{checkpoint}|shard-{SHARDS - 1}" for checkpoint in report.checkpoints
    )
    assert report.sensor_fired_during_labelling

    assert report.keys_paid_twice == 0
    assert report.analyst_failures == [] and report.analyst_queries >= 5
    assert report.analyst_inconsistencies == []
    assert report.lake_problems == []
