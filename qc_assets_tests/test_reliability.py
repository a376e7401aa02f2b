"""The whole graph as a user runs it: SIGKILLed in every stage and resumed, compared with an uninterrupted run;
and a planted API key and hub token searched for in everything the runs wrote."""

from __future__ import annotations

import pytest

from qc_assets.testing.crash_resume import KILL_POINTS, crash_and_resume


@pytest.mark.long(860)
# Eight `qc run`s, each starting Dagster's processes and a backfill: about 860 s on CI's two cores.
@pytest.mark.timeout(1800)
def test_the_graph_killed_in_every_stage_resumes_to_the_uninterrupted_lake_and_never_shows_a_secret(tmp_path):
    report = crash_and_resume(tmp_path)
    assert [kill.point.stage for kill in report.kills if kill.killed] == [point.stage for point in KILL_POINTS], [
        (kill.point.stage, kill.killed, kill.seconds) for kill in report.kills
    ]
    assert report.final_exit == 0, report.outputs[-1][-4000:]
    assert report.differences == []
    # Only an answer in flight at a kill (delivered, never journaled) can be paid for again.
    assert report.keys_paid_twice <= report.in_flight_bound
    assert report.rows["teacher_labels"] == report.rows["corpus"] * 7
    assert len(report.rows) and report.rows["checkpoint_directories"] == 1
    assert report.secret_leaks == []


def test_the_secret_search_finds_a_key_in_output_in_a_file_and_inside_a_compressed_parquet_page(tmp_path):
    import random
    import sqlite3
    import string

    import pyarrow as pa
    import pyarrow.parquet as pq

    from qc_assets.testing.crash_resume import PLANTED_KEY, find_secrets

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "log.txt").write_text("nothing to see")
    assert find_secrets([clean], ["plain output"], (PLANTED_KEY,)) == []
    assert find_secrets([clean], [f"error: {PLANTED_KEY}"], (PLANTED_KEY,)) == ["output 0"]
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    # Inside a long varied value, zstd entropy-codes the key's bytes: only decoded values show it.
    rng = random.Random(0)
    filler = "".join(rng.choice(string.ascii_letters + "-_") for _ in range(20_000))
    pq.write_table(
        pa.table({"raw_output": [filler[:10_000] + PLANTED_KEY + filler[10_000:]]}),
        leaky / "part.parquet",
        compression="zstd",
        write_statistics=False,
    )
    assert PLANTED_KEY.encode() not in (leaky / "part.parquet").read_bytes()
    with sqlite3.connect(leaky / "runs.db") as connection:
        connection.execute("CREATE TABLE runs (config TEXT)")
        connection.execute("INSERT INTO runs VALUES (?)", [f'{{"api_key": "{PLANTED_KEY}"}}'])
    assert find_secrets([leaky], [], (PLANTED_KEY,)) == [f"{leaky / 'part.parquet'} (values)", str(leaky / "runs.db")]
