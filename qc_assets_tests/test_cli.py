"""The `qc` command as users run it: settings errors, a run with a bad shard, read-only SQL, the UI's instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg

from qc_assets.definitions import build_definitions
from qc_assets.paths import PROJECT_ROOT, SAMPLE_CORPUS
from qc_assets.runner import partition_blocks, plan_stages, select_shards, threads_per_run
from qc_assets.settings import load_settings
from qc_assets_tests.conftest import BIN, document, run_qc, write_jsonl


def test_a_wrong_setting_fails_at_start_up_naming_the_variable(environment, tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"id": "a", "text": document(1)}])
    cases = {
        "QC_CORPUS_MIN_CHARS": ({"QC_CORPUS_MIN_CHARS": "many"}, "QC_CORPUS_MIN_CHARS"),
        "window": ({"QC_CORPUS_MIN_CHARS": "500", "QC_CORPUS_MAX_CHARS": "100"}, "QC_CORPUS_MIN_CHARS (500)"),
        "typo": ({"QC_DATA_DIRECTORY": "x"}, "unknown setting QC_DATA_DIRECTORY"),
        "catalog": ({"QC_LAKE_CATALOG": "mysql:db"}, "QC_LAKE_CATALOG"),
    }
    for name, (extra, expected) in cases.items():
        result = run_qc(["run"], environment(tmp_path / "corpus", **extra))
        assert result.returncode != 0, name
        assert expected in result.stderr + result.stdout, (name, result.stderr)
    missing = run_qc(["run"], environment(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "QC_CORPUS_SOURCE" in missing.stderr


def test_qc_run_materializes_every_partition_keeps_going_past_a_bad_shard_and_exits_non_zero(environment, tmp_path):
    source = tmp_path / "corpus"
    for name in ("s0", "s1"):
        write_jsonl(source / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": document(i, name)} for i in range(3)])
    (source / "s2.parquet").write_bytes(b"PAR1 this is not parquet")
    env = environment(source)
    result = run_qc(["run", "--select", "corpus"], env)
    assert result.returncode == 1
    assert "2 succeeded, 1 failed" in result.stdout
    assert str(source / "s2.parquet") in result.stdout + result.stderr
    counts = run_qc(
        ["sql", "SELECT shard, count(*) AS n FROM corpus GROUP BY shard ORDER BY shard", "--format", "json"], env
    )
    assert json.loads(counts.stdout) == [{"shard": "s0", "n": 3}, {"shard": "s1", "n": 3}]

    with dg.DagsterInstance.from_config(str(tmp_path / "data" / "dagster")) as instance:
        runs = instance.get_runs()
        assert sorted(run.tags.get("dagster/partition") for run in runs) == ["s0", "s1", "s2"]
        assert sorted(str(run.status) for run in runs).count("DagsterRunStatus.SUCCESS") == 2
        materialized = instance.get_materialized_partitions(dg.AssetKey("corpus"))
        assert materialized == {"s0", "s1"}

    (source / "s2.parquet").unlink()
    rerun = run_qc(["run", "--select", "corpus"], env)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 succeeded, 0 failed" in rerun.stdout


def test_qc_sql_formats_inputs_and_refuses_writes(environment, tmp_path):
    source = tmp_path / "corpus"
    write_jsonl(source / "s0.jsonl", [{"id": f"d{i}", "text": document(i)} for i in range(2)])
    env = environment(source)
    assert run_qc(["run", "--select", "corpus"], env).returncode == 0
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


def test_qc_run_shard_globs_limit_shard_partitions_and_a_glob_that_matches_nothing_is_refused(environment, tmp_path):
    source = tmp_path / "corpus"
    for name in ("a0", "a1", "b0"):
        write_jsonl(source / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": document(i, name)} for i in range(2)])
    env = environment(source)
    result = run_qc(["run", "--select", "corpus", "--shard", "a*"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 runs" in result.stdout
    counts = run_qc(["sql", "SELECT DISTINCT shard FROM corpus ORDER BY shard", "--format", "json"], env)
    assert json.loads(counts.stdout) == [{"shard": "a0"}, {"shard": "a1"}]
    refused = run_qc(["run", "--shard", "c*"], env)
    assert refused.returncode == 2 and "'c*' matches none of the 3 shards" in refused.stderr


def test_shard_globs_filter_the_shard_dimension_of_checkpoint_partitions_and_leave_base_models_whole():
    shards = dg.StaticPartitionsDefinition(["a0", "a1", "b0"])
    base_models = dg.StaticPartitionsDefinition(["tiny", "Qwen--Qwen3-1.7B"])
    evaluation = dg.MultiPartitionsDefinition(
        {"checkpoint": dg.StaticPartitionsDefinition(["c1", "c2"]), "shard": shards}
    )
    assert select_shards(shards, shards.get_partition_keys(), shards, ("a*",)) == ["a0", "a1"]
    assert select_shards(base_models, base_models.get_partition_keys(), shards, ("a*",)) == ["tiny", "Qwen--Qwen3-1.7B"]
    kept = select_shards(evaluation, evaluation.get_partition_keys(), shards, ("b0",))
    assert sorted(str(key) for key in kept) == ["c1|b0", "c2|b0"]
    assert select_shards(shards, shards.get_partition_keys(), shards, ()) == ["a0", "a1", "b0"]


def test_single_run_stages_go_in_partition_ranges_that_cover_exactly_the_selected_partitions(environment, tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"id": "x", "text": document(0)}])
    definitions = build_definitions(load_settings(environment(tmp_path / "corpus")))
    stages = {stage.label: stage.single_run for stage in plan_stages(definitions, None)}
    # Generation and scoring load a model: their whole stage is one run; every other stage is a run per partition.
    assert stages == {
        "corpus, teacher_labels": False,
        "sft_dataset": False,
        "student_checkpoints": False,
        "generated_queries, reranker_scores": True,
        "eval_summary": False,
    }

    shards = dg.StaticPartitionsDefinition(["a0", "a1", "b0", "b1"])
    evaluation = dg.MultiPartitionsDefinition(
        {"checkpoint": dg.StaticPartitionsDefinition(["c1", "c2"]), "shard": shards}
    )
    with dg.DagsterInstance.ephemeral() as instance:
        for patterns, expected in [
            ((), [("c1|a0", "c2|b1", 8)]),
            (("a*",), [("c1|a0", "c2|a1", 4)]),
            (("a0", "b1"), [("c1|a0", "c2|a0", 2), ("c1|b1", "c2|b1", 2)]),
        ]:
            keys = select_shards(evaluation, evaluation.get_partition_keys(), shards, patterns)
            blocks = partition_blocks(evaluation, keys, instance)
            assert [(block.start, block.end, len(block.keys)) for block in blocks] == expected
            for block in blocks:
                in_range = evaluation.get_partition_keys_in_range(dg.PartitionKeyRange(block.start, block.end))
                assert sorted(map(str, in_range)) == sorted(block.keys)
            assert sorted(key for block in blocks for key in block.keys) == sorted(map(str, keys))
        uneven = partition_blocks(evaluation, ["c1|a0", "c1|a1", "c2|a1"], instance)
        assert [(block.start, block.end) for block in uneven] == [("c1|a0", "c1|a0"), ("c1|a1", "c2|a1")]
        assert [block.keys for block in partition_blocks(shards, ["a0", "a1", "b1"], instance)] == [
            ("a0", "a1"),
            ("b1",),
        ]


def test_runs_at_once_share_the_cores_and_a_users_omp_num_threads_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads_per_run(runs, cores=2) for runs in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_run(2, cores=16) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_run(2, cores=16) == 3


def test_a_worker_limits_torch_and_the_processes_its_run_starts():
    # In a fresh interpreter, as a spawned worker: torch imported first, then a run's limit applied.
    script = (
        "import os, subprocess, sys, torch\n"
        "from qc_assets.runner import _limit_threads\n"
        "_limit_threads(1)\n"
        "child = subprocess.run([sys.executable, '-c', 'import torch; print(torch.get_num_threads())'],"
        " capture_output=True, text=True, check=True).stdout.strip()\n"
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], child)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["1", "1", "1"]
