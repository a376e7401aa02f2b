"""The `qc` command as users run it: settings errors, a run with a bad shard, read-only SQL, the UI's instance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from qc_assets.definitions import build_definitions
from qc_assets.orchestration.backfill import LAUNCHED_BY, LAUNCHED_BY_TAG, plan_backfill
from qc_assets.orchestration.service import InstanceServiceLock
from qc_assets.paths import PROJECT_ROOT, SAMPLE_CORPUS
from qc_assets.settings import load_settings
from qc_assets.testing.dagster_ui import DagsterUI
from qc_assets_tests.conftest import BIN, document, materialize_asset, run_qc, write_jsonl


def test_a_wrong_setting_fails_at_start_up_naming_the_variable(environment, tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"id": "a", "text": document(1)}])
    cases = {
        "QC_CORPUS_MIN_CHARS": ({"QC_CORPUS_MIN_CHARS": "many"}, "QC_CORPUS_MIN_CHARS"),
        "window": ({"QC_CORPUS_MIN_CHARS": "500", "QC_CORPUS_MAX_CHARS": "100"}, "QC_CORPUS_MIN_CHARS (500)"),
        "typo": ({"QC_DATA_DIRECTORY": "x"}, "unknown setting QC_DATA_DIRECTORY"),
        "catalog": ({"QC_LAKE_CATALOG": "mysql:db"}, "QC_LAKE_CATALOG"),
        "round trip": (
            {"QC_ROUND_TRIP_TOP_K": "30"},
            "QC_ROUND_TRIP_TOP_K (30) is larger than QC_ROUND_TRIP_CANDIDATES",
        ),
    }
    for name, (extra, expected) in cases.items():
        result = run_qc(["run"], environment(tmp_path / "corpus", **extra))
        assert result.returncode != 0, name
        assert expected in result.stderr + result.stdout, (name, result.stderr)
    missing = run_qc(["run"], environment(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "QC_CORPUS_SOURCE" in missing.stderr


@pytest.mark.long(120)
def test_qc_run_is_one_backfill_that_keeps_going_past_a_bad_shard_and_exits_non_zero(environment, tmp_path):
    source = tmp_path / "corpus"
    for name in ("s0", "s1"):
        write_jsonl(source / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": document(i, name)} for i in range(3)])
    (source / "s2.parquet").write_bytes(b"PAR1 this is not parquet")
    env = environment(source)
    result = run_qc(["run", "--select", "corpus"], env)
    assert result.returncode == 1
    assert "3 runs" in result.stdout and "1 failed; backfill COMPLETED_FAILED" in result.stdout, result.stdout
    assert "corpus: 2 of 3 partitions materialized, 1 failed" in result.stdout
    assert str(source / "s2.parquet") in result.stdout + result.stderr
    counts = run_qc(
        ["sql", "SELECT shard, count(*) AS n FROM corpus GROUP BY shard ORDER BY shard", "--format", "json"], env
    )
    assert json.loads(counts.stdout) == [{"shard": "s0", "n": 3}, {"shard": "s1", "n": 3}]

    with dg.DagsterInstance.from_config(str(tmp_path / "data" / "dagster")) as instance:
        runs = instance.get_runs()
        assert sorted(run.tags.get("dagster/partition") for run in runs) == ["s0", "s1", "s2"]
        assert len({run.tags["dagster/backfill"] for run in runs}) == 1
        assert sorted(str(run.status) for run in runs).count("DagsterRunStatus.SUCCESS") == 2
        materialized = instance.get_materialized_partitions(dg.AssetKey("corpus"))
        assert materialized == {"s0", "s1"}

    (source / "s2.parquet").unlink()
    rerun = run_qc(["run", "--select", "corpus"], env)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 runs" in rerun.stdout and "0 failed; backfill COMPLETED_SUCCESS" in rerun.stdout


def test_qc_sql_formats_inputs_and_refuses_writes(environment, tmp_path):
    source = tmp_path / "corpus"
    write_jsonl(source / "s0.jsonl", [{"id": f"d{i}", "text": document(i)} for i in range(2)])
    env = environment(source)
    with dg.instance_for_test() as instance:
        assert materialize_asset(load_settings(env), "corpus", instance, partition="s0").success
    query = "SELECT doc_id, n_chars FROM corpus ORDER BY doc_id"
    table = run_qc(["sql", query], env)
    assert table.returncode == 0 and "doc_id" in table.stdout and "d1" in table.stdout and "│" in table.stdout
    csv = run_qc(["sql", query, "--format", "csv"], env)
    assert csv.stdout.splitlines()[0] == "doc_id,n_chars" and csv.stdout.splitlines()[1].startswith("d0,")
    from_stdin = run_qc(["sql", "--format", "json"], env, input=query)
    assert [row["doc_id"] for row in json.loads(from_stdin.stdout)] == ["d0", "d1"]
    query_file = tmp_path / "q.sql"
    query_file.write_text("SELECT count(*) AS n FROM corpus")
    assert json.loads(run_qc(["sql", "--file", str(query_file), "--format", "json"], env).stdout) == [{"n": 2}]
    refused = run_qc(["sql", "DELETE FROM corpus"], env)
    assert refused.returncode != 0 and "read-only" in refused.stderr
    assert run_qc(["sql", "SELECT count(*) AS n FROM corpus", "--format", "csv"], env).stdout.splitlines()[1] == "2"


def test_dg_check_defs_loads_the_code_location(environment, tmp_path):
    env = environment(SAMPLE_CORPUS)
    result = subprocess.run(
        [str(BIN / "dg"), "check", "defs"],
        cwd=PROJECT_ROOT,
        env={"PATH": f"{BIN}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


@pytest.mark.long(60)
def test_qc_run_shard_globs_limit_shard_partitions_and_a_glob_that_matches_nothing_is_refused(environment, tmp_path):
    source = tmp_path / "corpus"
    for name in ("a0", "a1", "b0"):
        write_jsonl(source / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": document(i, name)} for i in range(2)])
    env = environment(source)
    refused = run_qc(["run", "--shard", "c*"], env)
    assert refused.returncode == 2 and "'c*' matches none of the 3 shards" in refused.stderr
    result = run_qc(["run", "--select", "corpus", "--shard", "a*"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 runs" in result.stdout
    counts = run_qc(["sql", "SELECT DISTINCT shard FROM corpus ORDER BY shard", "--format", "json"], env)
    assert json.loads(counts.stdout) == [{"shard": "a0"}, {"shard": "a1"}]


def _plan(settings, selection, patterns, checkpoints=()) -> dict[str, object]:
    definitions = build_definitions(settings)
    shards = definitions.resolve_assets_def("corpus").partitions_def.get_partition_keys()
    with dg.instance_for_test() as instance:
        if checkpoints:
            instance.add_dynamic_partitions("checkpoint", list(checkpoints))
        plan = plan_backfill(definitions, selection, shards, patterns, instance)
    selected = {target.key.to_user_string(): target.ranges for target in plan.targets}
    return {**selected, "deferred": [key.to_user_string() for key in plan.deferred]}


def test_the_backfill_covers_the_selected_shards_in_ranges_and_leaves_base_models_whole(settings_for, tmp_path):
    for name in ("a0", "a1", "b0", "b1"):
        write_jsonl(tmp_path / "corpus" / f"{name}.jsonl", [{"id": name, "text": document(0, name)}])
    settings = settings_for(tmp_path / "corpus")

    # No checkpoint yet: evaluation and the report are left to the sensor and the automation condition.
    assert _plan(settings, None, ()) == {
        "corpus": None,
        "teacher_labels": None,
        "sft_dataset": None,
        "student_checkpoints": None,
        "deferred": ["generated_queries", "reranker_scores", "eval_summary", "training_pairs"],
    }
    with_checkpoints = _plan(settings, None, ("a0", "b1"), checkpoints=("c1", "c2"))
    assert with_checkpoints == {
        "corpus": (("a0", "a0"), ("b1", "b1")),
        "teacher_labels": (("a0", "a0"), ("b1", "b1")),
        "sft_dataset": None,
        "student_checkpoints": None,
        "generated_queries": (("c1|a0", "c2|a0"), ("c1|b1", "c2|b1")),
        "reranker_scores": (("c1|a0", "c2|a0"), ("c1|b1", "c2|b1")),
        "eval_summary": None,
        "training_pairs": None,
        "deferred": [],
    }
    assert _plan(settings, "key:generated_queries", ("a*",), checkpoints=("c1",)) == {
        "generated_queries": (("c1|a0", "c1|a1"),),
        "deferred": [],
    }
    assert _plan(settings, "key:corpus or key:teacher_labels", ()) == {
        "corpus": None,
        "teacher_labels": None,
        "deferred": [],
    }


@pytest.mark.long(270)
@pytest.mark.timeout(1200)
def test_a_corrupt_shard_leaves_its_labels_and_evaluation_unmaterialized_and_the_run_exits_non_zero(
    environment, tmp_path
):
    """The whole graph on two sample shards; then a third shard that is not parquet at all, and a run of the shard
    stages and the evaluation. Dagster's backfill fails the shard's corpus partition and leaves its labels, queries
    and scores unmaterialized; the other shards' evaluation still runs."""
    source = tmp_path / "corpus"
    source.mkdir()
    for shard in ("sample-00000", "sample-00001"):
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", source)
    env = environment(source, QC_STUDENT_BASE_MODELS="tiny", QC_SCORER_MODEL="tiny")
    first = run_qc(["run"], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    (source / "sample-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    selection = "key:corpus or key:teacher_labels or key:generated_queries or key:reranker_scores"
    second = run_qc(["run", "--select", selection], env)
    assert second.returncode == 1, second.stdout[-3000:]
    assert str(source / "sample-00002.parquet") in second.stdout + second.stderr
    for line in (
        "corpus: 2 of 3 partitions materialized, 1 failed or not run because upstream failed",
        "teacher_labels: 2 of 3 partitions materialized, 1 failed or not run because upstream failed",
        "generated_queries: 2 of 3 partitions materialized, 1 failed or not run because upstream failed",
        "reranker_scores: 2 of 3 partitions materialized, 1 failed or not run because upstream failed",
    ):
        assert line in second.stdout, second.stdout
    with dg.DagsterInstance.from_config(str(tmp_path / "data" / "dagster")) as instance:
        for asset in ("corpus", "teacher_labels", "generated_queries", "reranker_scores"):
            materialized = {str(key) for key in instance.get_materialized_partitions(dg.AssetKey(asset))}
            assert not any("sample-00002" in key for key in materialized), (asset, materialized)
        backfills = {run.tags.get("dagster/backfill") for run in instance.get_runs() if "dagster/backfill" in run.tags}
        assert len(backfills) == 2


def _start_qc(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
    with open(log, "wb") as out:
        return subprocess.Popen([str(BIN / "qc"), *args], env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_holder(dagster_home: Path, kind: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while InstanceServiceLock(dagster_home).holder().get("kind") != kind:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@pytest.mark.long(230)
@pytest.mark.timeout(900)
def test_a_second_qc_run_waits_for_the_first_and_with_qc_ui_open_qc_run_launches_through_its_dagster(tmp_path):
    env = {"QC_DATA_DIR": str(tmp_path / "data"), "QC_CORPUS_SOURCE": str(SAMPLE_CORPUS)}
    dagster_home = tmp_path / "data" / "dagster"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start_qc(["run", "--select", "corpus"], env, first_log)
    _wait_for_holder(dagster_home, "run", first, first_log)
    second = _start_qc(["run", "--select", "corpus"], env, second_log)
    assert first.wait(timeout=600) == 0, first_log.read_text()
    assert second.wait(timeout=600) == 0, second_log.read_text()
    assert "another `qc run` is using this instance; waiting for it to end" in second_log.read_text()
    assert "waiting" not in first_log.read_text()

    with DagsterUI(env, tmp_path / "ui.log") as ui:
        ui.wait_until_loaded()
        assert InstanceServiceLock(dagster_home).holder()["kind"] == "ui"
        through_ui = run_qc(["run", "--select", "corpus"], env)
        assert through_ui.returncode == 0, through_ui.stdout + through_ui.stderr
        assert "`qc ui` is open on this instance: launching through its Dagster" in through_ui.stdout
        assert "Dagster's webserver at" not in through_ui.stdout
        # The UI's daemon ran the backfill: its runs' logs went to `qc ui`'s output, not to qc run's.
        assert "RUN_SUCCESS" in ui.log_path.read_text()
        assert "RUN_SUCCESS" not in through_ui.stdout + through_ui.stderr
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 3 and {backfill.status.value for backfill in backfills} == {"COMPLETED_SUCCESS"}
        assert {backfill.tags.get(LAUNCHED_BY_TAG) for backfill in backfills} == {LAUNCHED_BY}
