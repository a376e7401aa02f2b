"""Several writer processes and runs at once, with an analyst session open and querying throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.lake.resource import LakeResource
from qc_assets.runner import prepare_dagster_home
from qc_assets_tests.conftest import BIN, lake_rows, run_qc

SHARDS = 6
ROWS = 2_000


def test_writers_and_an_open_reader_never_lock_each_other_out(tmp_path, environment, settings_for):
    source = tmp_path / "corpus"
    for index in range(SHARDS):
        write_fineweb_shard(source / f"shard-{index}.parquet", ROWS, mean_chars=300, seed=index)
    env = environment(source)
    settings = settings_for(source)
    with LakeResource(catalog=settings.catalog, data_path=settings.data_path).get_connection():
        pass
    clean_env = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
    stop_file = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-m", "qc_assets_tests.lake_reader", settings.catalog, settings.data_path, str(stop_file), str(ROWS)],
        env={**clean_env, **env}, stdout=subprocess.PIPE, text=True,
    )
    try:
        dagster_home = prepare_dagster_home(settings)
        for wave in (range(0, 3), range(3, 6), range(0, 3)):
            writers = [
                subprocess.Popen(
                    [str(BIN / "dagster"), "asset", "materialize", "-m", "qc_assets.definitions",
                     "--select", "corpus", "--partition", f"shard-{index}"],
                    env={**clean_env, **env, "DAGSTER_HOME": dagster_home},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                for index in wave
            ]
            for writer in writers:
                output, _ = writer.communicate(timeout=300)
                assert writer.returncode == 0, output[-3000:]
        parallel_runs = run_qc(["run", "--select", "corpus", "--parallel", "3", "--executor", "multiprocess"], env)
        assert parallel_runs.returncode == 0, parallel_runs.stdout[-3000:] + parallel_runs.stderr[-3000:]
    finally:
        stop_file.touch()
        report, _ = reader.communicate(timeout=120)
    seen = json.loads(report)
    assert seen["problems"] == []
    assert seen["queries"] > 10
    assert seen["max_rows"] == SHARDS * ROWS
    assert lake_rows(settings, "SELECT count(*), count(DISTINCT doc_id), count(DISTINCT shard) FROM corpus") == [
        (SHARDS * ROWS, SHARDS * ROWS, SHARDS)
    ]
