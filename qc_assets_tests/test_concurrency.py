"""Several writer processes and runs at once, with an analyst session open and querying throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import dagster as dg
import pytest

from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.lake.resource import LakeResource
from qc_assets.orchestration.home import prepare_dagster_home
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets.settings import load_settings
from qc_assets.testing.analyst import analyst_session, inconsistencies
from qc_assets.testing.teacher_server import run_teacher_server
from qc_assets_tests.conftest import BIN, lake_rows, materialize_asset, run_qc
from qc_assets_tests.test_teacher import openai_environment

SHARDS = 6
ROWS = 2_000


@pytest.mark.long(70)
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
        [
            sys.executable,
            "-m",
            "qc_assets_tests.lake_reader",
            settings.catalog,
            settings.data_path,
            str(stop_file),
            str(ROWS),
        ],
        env={**clean_env, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        dagster_home = prepare_dagster_home(settings)
        writers = [
            subprocess.Popen(
                [
                    str(BIN / "dagster"),
                    "asset",
                    "materialize",
                    "-m",
                    "qc_assets.definitions",
                    "--select",
                    "corpus",
                    "--partition",
                    f"shard-{index}",
                ],
                env={**clean_env, **env, "DAGSTER_HOME": dagster_home},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for index in range(3)
        ]
        for writer in writers:
            output, _ = writer.communicate(timeout=300)
            assert writer.returncode == 0, output[-3000:]
        # Three new shards and three replaced ones, three runs at a time.
        parallel_runs = run_qc(["run", "--select", "corpus"], env)
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


@pytest.mark.long(60)
def test_qc_sql_in_a_loop_reads_consistent_counts_while_runs_write(tmp_path, environment):
    """An analyst re-running `qc sql` (a new process each time) while `qc run` writes corpus and label partitions."""
    source = tmp_path / "corpus"
    source.mkdir()
    for shard in ("sample-00000", "sample-00001"):
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", source)
    # The teacher's latency keeps each shard's labelling open for seconds, committing every 8 labels, so the
    # analyst's queries land in the middle of it.
    with run_teacher_server(tmp_path, {"latency_ms": 300, "rules": []}) as server:
        env = openai_environment(
            environment,
            source,
            server,
            QC_TEACHER_CONCURRENCY="4",
            QC_TEACHER_BATCH_SIZE="8",
            QC_TEACHER_FLUSH_SECONDS="0.05",
            QC_TEACHER_TIMEOUT_S="10",
        )
        with analyst_session(tmp_path, env) as analyst:
            writes = run_qc(["run", "--select", "key:corpus or key:teacher_labels"], env)
            assert writes.returncode == 0, writes.stdout[-3000:]
        final = analyst.final_by_shard()
    assert analyst.failures == []
    assert len(analyst.answers) >= 5

    assert len(final) == 2 and sum(row["labels"] for row in final.values()) == 7 * sum(
        row["documents"] for row in final.values()
    )
    assert inconsistencies(analyst.answers, final) == []
    assert any(0 < row["labels"] < final[row["shard"]]["labels"] for answer in analyst.answers for row in answer), (
        "no query caught a shard half-labelled: the test did not overlap the writes"
    )


def _first_attach(catalog: str, data_path: str, start_at: float, results) -> None:
    """In a fresh process: attach the lake at `start_at` and read a table inside a write transaction."""
    import time

    from qc_assets.lake.resource import run_transaction

    lake = LakeResource(catalog=catalog, data_path=data_path)
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        with lake.get_connection() as connection:

            def work(connection):
                connection.execute("CREATE OR REPLACE TEMP TABLE staged AS SELECT 1 AS x")
                time.sleep(0.2)
                return connection.execute('SELECT count(*) FROM "corpus"').fetchone()[0]

            results.put(("ok", run_transaction(connection, work, "read corpus")))
    except Exception as error:  # reported to the test, which names it
        results.put(("error", f"{type(error).__name__}: {error}"))


@pytest.mark.long(40)
def test_processes_that_open_a_new_lake_at_the_same_moment_all_succeed(tmp_path):
    # `qc run --parallel` on a fresh QC_DATA_DIR: its first runs attach a catalog nobody has initialised yet and
    # create the tables at once. Without the first-use lock about half of such starts failed ("database disk image
    # is malformed", or a table not found inside a transaction while another process created the tables).
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    for trial in range(3):
        root = tmp_path / f"lake-{trial}"
        results = context.Queue()
        start_at = time.time() + 4
        processes = [
            context.Process(
                target=_first_attach,
                args=(f"sqlite:{root / 'catalog.sqlite'}", f"{root / 'files'}/", start_at, results),
            )
            for _ in range(3)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == [("ok", 0)] * 3, outcomes


@pytest.mark.long(60)
def test_two_runs_of_one_shards_labels_started_at_once_both_succeed_and_pay_for_each_key_once(tmp_path, environment):
    """Two runs of the same teacher partition at once (a backfill and a run launched by hand, say), each a
    `dagster asset materialize` process on the same instance: the journal's lock makes one wait for the other."""
    from filelock import FileLock

    from qc_assets.categories import CATEGORIES
    from qc_assets.defs.teacher.labeling import path_component
    from qc_assets_tests.conftest import document
    from qc_assets_tests.test_teacher import SHARD, chat_requests, write_corpus

    source = write_corpus(tmp_path / "corpus", [document(i, "同時") for i in range(8)])
    with run_teacher_server(tmp_path, {"latency_ms": 100, "rules": []}) as server:
        env = openai_environment(environment, source, server, QC_TEACHER_CONCURRENCY="4")
        settings = load_settings(env)
        with dg.instance_for_test() as instance:
            assert materialize_asset(settings, "corpus", instance, partition=SHARD).success
        clean = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
        dagster_home = prepare_dagster_home(settings)
        # Both runs find the shard taken and wait; released, they race for it. Without this, on a busy machine one
        # run can finish before the other has started, and nothing is tested.
        lock_path = settings.teacher_dir / "journal" / path_component("test-teacher") / path_component(SHARD) / ".lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_path):
            runs = [
                subprocess.Popen(
                    [str(BIN / "dagster"), "asset", "materialize", "-m", "qc_assets.definitions"]
                    + ["--select", "teacher_labels", "--partition", SHARD],
                    env={**clean, **env, "DAGSTER_HOME": dagster_home},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for _ in range(2)
            ]
            outputs = [[] for _ in runs]
            readers = [
                threading.Thread(target=lambda run=run, lines=lines: lines.extend(run.stdout), daemon=True)
                for run, lines in zip(runs, outputs)
            ]
            for reader in readers:
                reader.start()
            deadline = time.monotonic() + 240
            while not all(any("in another run; waiting for it" in line for line in lines) for lines in outputs):
                assert time.monotonic() < deadline and all(run.poll() is None for run in runs), outputs
                time.sleep(0.1)
        for run, reader in zip(runs, readers):
            run.wait(timeout=300)
            reader.join(timeout=30)
        texts = ["".join(lines) for lines in outputs]
        assert [run.returncode for run in runs] == [0, 0], texts
        entries = chat_requests(server)
        keys = [(entry["category"], entry["text_key"]) for entry in entries]
        assert len(keys) == len(set(keys)) == 8 * len(CATEGORIES), [
            {name: entry.get(name) for name in ("category", "text_key", "client_port", "status", "delivered", "t")}
            for entry in entries
        ]
    assert lake_rows(settings, "SELECT count(*), count(DISTINCT (doc_id, category)) FROM teacher_labels") == [(56, 56)]


def _timed_write(catalog: str, data_path: str, start_at: float, results) -> None:
    """In a fresh process: a lake transaction that takes half a second; when it held the lake, to the test."""
    import time

    from qc_assets.lake.resource import run_transaction

    with LakeResource(catalog=catalog, data_path=data_path).get_connection() as connection:
        while time.time() < start_at:
            time.sleep(0.001)

        def work(connection):
            began = time.time()
            connection.execute("CREATE OR REPLACE TEMP TABLE staged AS SELECT 1 AS x")
            time.sleep(0.5)
            return began, time.time()

        results.put(run_transaction(connection, work, "timed write"))


def test_writers_of_one_sqlite_catalog_commit_one_at_a_time(tmp_path):
    # DuckLake lost a commit made beside another (see `_write_lock`): writers of a SQLite catalog take turns.
    import multiprocessing

    root = tmp_path / "lake"
    catalog, data_path = f"sqlite:{root / 'catalog.sqlite'}", f"{root / 'files'}/"
    with LakeResource(catalog=catalog, data_path=data_path).get_connection():
        pass
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 4
    processes = [context.Process(target=_timed_write, args=(catalog, data_path, start_at, results)) for _ in range(3)]
    for process in processes:
        process.start()
    spans = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert all(later_start >= earlier_end for (_, earlier_end), (later_start, _) in zip(spans, spans[1:])), spans
