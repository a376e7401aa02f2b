"""Generation, scoring and the evaluation report on tiny models; the checkpoint sensor on a real instance."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import duckdb
import pyarrow as pa
import pytest

from qc_assets.categories import CATEGORIES
from qc_assets.definitions import build_definitions
from qc_assets.defs.report.assets import _markdown, _round_trip_gaps, summary_sql
from qc_assets.defs.sft.dataset import is_test_document
from qc_assets.defs.student.store import new_checkpoint_id, publish, staging_directory
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import CHECKPOINTS, EVAL_SUMMARY, RERANKER_SCORES
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets_tests.conftest import (
    lake_rows,
    materialization_metadata,
    materialize,
    materialize_asset,
    tick_checkpoint_sensor,
)

SHARDS = ("sample-00000", "sample-00001")


@pytest.mark.long(110)
def test_students_and_teacher_are_scored_on_the_same_documents_and_reruns_replace(settings_for, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    source = tmp_path / "corpus"
    source.mkdir()
    for shard in SHARDS:
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", source)
    settings = settings_for(
        source,
        QC_STUDENT_BASE_MODELS="tiny",
        QC_SCORER_MODEL="tiny",
        QC_SFT_TEST_FRACTION="0.3",
        QC_GENERATION_MAX_NEW_TOKENS="12",
    )
    with dg.instance_for_test() as instance:
        for shard in SHARDS:
            assert materialize(settings, shard, instance).success
        assert materialize_asset(settings, "sft_dataset", instance).success
        trained = materialize_asset(settings, "student_checkpoints", instance, partition="tiny")
        assert trained.success
        checkpoint = materialization_metadata(trained, "student_checkpoints")["checkpoint"]
        assert instance.get_dynamic_partitions("checkpoint") == []  # the sensor's to add
        (request,) = tick_checkpoint_sensor(settings, instance)
        assert instance.get_dynamic_partitions("checkpoint") == [checkpoint]
        assert request.partition_key_range.start == f"{checkpoint}|{SHARDS[0]}"
        partition = dg.MultiPartitionKey({"checkpoint": checkpoint, "shard": SHARDS[0]})

        generated = materialize_asset(settings, "generated_queries", instance, partition=partition)
        assert generated.success
        metadata = materialization_metadata(generated, "generated_queries")
        test_docs = lake_rows(settings, "SELECT DISTINCT doc_id FROM generated_queries ORDER BY 1")
        assert metadata["documents"] == len(test_docs) > 0
        assert metadata["dagster/row_count"] == len(test_docs) * len(CATEGORIES)
        assert metadata["input_tokens"] > 0 and metadata["documents_per_second"] > 0
        checks = {result.check_name: result for result in generated.get_asset_check_evaluations()}
        assert set(checks) == {"empty_queries", "category_validity"}

        # The same keys labelled under an earlier prompt: only the current labels are the teacher's row.
        LakeResource(catalog=settings.catalog, data_path=settings.data_path).transaction(
            lambda connection: connection.execute(
                "INSERT INTO teacher_labels SELECT * REPLACE ('earlier-prompt' AS prompt_version, "
                "'earlier ' || query AS query) FROM teacher_labels WHERE shard = ?",
                [SHARDS[0]],
            ),
            "label again under an earlier prompt",
        )
        scored = materialize_asset(settings, "reranker_scores", instance, partition=partition)
        assert scored.success
        # The teacher is scored on every split (its train split makes training pairs), each key once.
        (current_labels,) = lake_rows(
            settings,
            "SELECT count(*) FROM teacher_labels WHERE shard = ? AND prompt_version <> 'earlier-prompt'",
            [SHARDS[0]],
        )
        assert lake_rows(
            settings,
            "SELECT count(*), count(DISTINCT (doc_id, category)), count(*) FILTER (starts_with(query, 'earlier ')), "
            "count(*) FILTER (doc_id IN (SELECT doc_id FROM generated_queries)) "
            "FROM reranker_scores WHERE starts_with(source, 'teacher:')",
        ) == [(current_labels[0], current_labels[0], 0, len(test_docs) * len(CATEGORIES))]
        assert all(result.passed for result in scored.get_asset_check_evaluations())
        summary = materialize_asset(settings, "eval_summary", instance)
        assert summary.success
        report = materialization_metadata(summary, "eval_summary")
        checks = {result.check_name: result for result in summary.get_asset_check_evaluations()}
        assert set(checks) == {"no_regression", "round_trip_vs_teacher"}
        assert lake_rows(settings, "SELECT max(missing_pairs) FROM eval_summary") == [(0,)]
        assert report["tiny_models"] is True and "mean nothing" in report["table"]
        assert report["percentile_plot"].startswith("![percentiles](data:image/png;base64,")

        overall = lake_rows(
            settings, "SELECT source, n, mean, std FROM eval_summary WHERE category = 'all' ORDER BY source"
        )
        by_source = {row[0]: row[1:] for row in overall}
        assert set(by_source) == {checkpoint, "teacher:handwritten-sample"}
        assert {n for n, _, _ in by_source.values()} == {len(test_docs) * len(CATEGORIES)}
        assert all(0 <= mean <= 1 for _, mean, _ in by_source.values())
        (recomputed,) = lake_rows(
            settings, "SELECT avg(score), stddev_pop(score) FROM reranker_scores WHERE source = ?", [checkpoint]
        )
        assert (
            abs(recomputed[0] - by_source[checkpoint][1]) < 1e-9
            and abs(recomputed[1] - by_source[checkpoint][2]) < 1e-9
        )
        pairs = lake_rows(
            settings,
            "SELECT s.doc_id, s.category FROM reranker_scores s WHERE source = ? EXCEPT "
            "SELECT doc_id, category FROM reranker_scores WHERE source LIKE 'teacher:%'",
            [checkpoint],
        )
        assert pairs == []
        # The round trip: each pair's document re-ranked among BM25's candidates, passing within the top k.
        (trip,) = lake_rows(
            settings,
            """SELECT count(*), count(round_trip), count(*) FILTER (rerank_rank > $1),
                      count(*) FILTER (round_trip <> coalesce(rerank_rank <= round_trip_k, false)),
                      count(*) FILTER (rerank_rank IS NULL AND bm25_rank = 1),
                      count(*) FILTER (copy_verbatim AND copy_share < 1 OR copy_share NOT BETWEEN 0 AND 1),
                      count(DISTINCT round_trip_k),
                      count(*) FILTER ((negative_doc_ids IS NULL) = round_trip),
                      count(*) FILTER (list_contains(negative_doc_ids, doc_id)),
                      count(*) FILTER (len(negative_doc_ids) + negatives_too_close + negatives_near_duplicate
                                       > $1 - 1 OR len(negative_doc_ids) > $2)
               FROM reranker_scores""",
            [settings.round_trip_candidates, settings.negatives_per_pair],
        )
        assert trip[0] == trip[1] > 0 and trip[2:] == (0, 0, 0, 0, 1, 0, 0, 0), trip
        (rates,) = lake_rows(
            settings,
            "SELECT e.round_trip_rate, (SELECT avg(round_trip::DOUBLE) FROM reranker_scores WHERE source = ?), "
            "e.copy_rate, (SELECT avg(copy_verbatim::DOUBLE) FROM reranker_scores WHERE source = ?) "
            "FROM eval_summary e WHERE e.source = ? AND e.category = 'all'",
            [checkpoint, checkpoint, checkpoint],
        )
        assert abs(rates[0] - rates[1]) < 1e-9 and abs(rates[2] - rates[3]) < 1e-9
        assert "round trip" in report["table"] and "copied verbatim" in report["table"]
        assert "negatives / pair" in report["table"] and "R@1 BM25 → re-rank" in report["table"]
        for category in CATEGORIES:
            assert f"| {category} | {checkpoint} |" in report["by_category"]
        written = (settings.data_root / "reports" / "eval_summary.md").read_text(encoding="utf-8")
        assert "## By category" in written and report["by_category"] in written
        per_category = lake_rows(settings, "SELECT count(DISTINCT category) FROM eval_summary WHERE category <> 'all'")
        assert per_category == [(len(CATEGORIES),)]

        counts = lake_rows(
            settings, "SELECT (SELECT count(*) FROM generated_queries), (SELECT count(*) FROM reranker_scores)"
        )
        assert materialize_asset(settings, "generated_queries", instance, partition=partition).success
        assert materialize_asset(settings, "reranker_scores", instance, partition=partition).success
        assert (
            lake_rows(
                settings, "SELECT (SELECT count(*) FROM generated_queries), (SELECT count(*) FROM reranker_scores)"
            )
            == counts
        )
    assert (settings.data_root / "reports" / "eval_percentiles.png").stat().st_size > 1000


def fake_checkpoint(root, slug: str, version: str, minute: int, complete: bool = True):
    checkpoint = new_checkpoint_id(slug, version).rsplit("--", 1)[0] + f"--20260101T00{minute:02d}00Z"
    staging = staging_directory(root, slug, checkpoint)
    (staging / "config.json").write_text("{}")
    if not complete:
        return checkpoint, staging
    manifest = {
        "checkpoint": checkpoint,
        "base_model": slug,
        "dataset_version": version,
        "hyperparameters": {},
        "metrics": {},
        "created_at": f"2026-01-01T00:{minute:02d}:00+00:00",
    }
    return checkpoint, publish(staging, manifest)


def test_the_sensor_evaluates_a_checkpoint_on_each_shard_once_its_corpus_and_labels_are_materialized(
    settings_for, tmp_path
):
    settings = settings_for(SAMPLE_CORPUS)
    repository = build_definitions(settings).get_repository_def()
    sensor = repository.get_sensor_def("new_checkpoints")
    shards = sorted(path.stem for path in SAMPLE_CORPUS.glob("*.jsonl"))
    checkpoint, _ = fake_checkpoint(settings.data_root / "checkpoints", "tiny", "aaaaaaaa", 1)
    with dg.instance_for_test() as instance:

        def tick(cursor):
            return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repository))

        def ranges(result) -> list[tuple[str, str]]:
            return [(run.partition_key_range.start, run.partition_key_range.end) for run in result.run_requests]

        def materialized(asset: str, *indices: int) -> None:
            for index in indices:
                instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=shards[index]))

        waiting = tick(None)
        assert isinstance(waiting, dg.SkipReason) and "wait for their shards' corpus and labels" in waiting.skip_message
        # The third shard's corpus failed; the second has its corpus but not its labels yet.
        materialized("corpus", 0, 1, 3)
        materialized("teacher_labels", 0, 3)
        first = tick(None)
        assert ranges(first) == [(f"{checkpoint}|{shards[i]}", f"{checkpoint}|{shards[i]}") for i in (0, 3)]
        assert len({run.run_key for run in first.run_requests}) == 2
        assert json.loads(first.cursor) == {checkpoint: [shards[0], shards[3]]}
        assert isinstance(tick(first.cursor), dg.SkipReason)  # nothing newly ready
        instance.add_dynamic_partitions("checkpoint", [checkpoint])  # as the daemon does with the first request

        materialized("teacher_labels", 1)
        second = tick(first.cursor)
        assert ranges(second) == [(f"{checkpoint}|{shards[1]}", f"{checkpoint}|{shards[1]}")]
        assert second.dynamic_partitions_requests == []
        materialized("corpus", 2)
        materialized("teacher_labels", 2)
        third = tick(second.cursor)
        assert ranges(third) == [(f"{checkpoint}|{shards[2]}", f"{checkpoint}|{shards[2]}")]
        assert json.loads(third.cursor) == {checkpoint: "*"}
        assert isinstance(tick(third.cursor), dg.SkipReason)


def test_the_sensor_registers_each_complete_checkpoint_once_and_requests_one_run_over_every_shard(
    settings_for, tmp_path
):
    settings = settings_for(SAMPLE_CORPUS)
    repository = build_definitions(settings).get_repository_def()
    sensor = repository.get_sensor_def("new_checkpoints")
    root = settings.data_root / "checkpoints"
    shards = sorted(path.stem for path in SAMPLE_CORPUS.glob("*.jsonl"))
    with dg.instance_for_test() as instance:

        def tick(cursor):
            # The sensor's own function: evaluate_tick would validate run requests against partitions that
            # build_sensor_context never adds to the instance.
            result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repository))
            return result

        def requested(run: dg.RunRequest) -> list[str]:
            """The partitions of the run's range: one checkpoint, every shard."""
            partitions = repository.assets_defs_by_key[dg.AssetKey("generated_queries")].partitions_def
            return sorted(
                partitions.get_partition_keys_in_range(run.partition_key_range, dynamic_partitions_store=instance)
            )

        assert isinstance(tick(None), dg.SkipReason)
        for shard in shards:
            for asset in ("corpus", "teacher_labels"):
                instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=shard))
        first, staging = fake_checkpoint(root, "tiny", "aaaaaaaa", 1, complete=False)
        assert isinstance(tick(None), dg.SkipReason)  # half-written: invisible until its manifest lands
        publish(
            staging,
            {
                "checkpoint": first,
                "base_model": "tiny",
                "dataset_version": "aaaaaaaa",
                "hyperparameters": {},
                "metrics": {},
                "created_at": "2026-01-01T00:01:00+00:00",
            },
        )
        result = tick(None)
        (request,) = result.dynamic_partitions_requests
        assert list(request.partition_keys) == [first]
        cursor = result.cursor
        instance.add_dynamic_partitions("checkpoint", [first])
        (run,) = result.run_requests
        assert requested(run) == [f"{first}|{shard}" for shard in shards]

        assert isinstance(tick(cursor), dg.SkipReason)  # each checkpoint triggers once
        second, _ = fake_checkpoint(root, "tiny", "bbbbbbbb", 2)
        result = tick(cursor)
        instance.add_dynamic_partitions("checkpoint", [second])
        (run,) = result.run_requests
        assert requested(run) == [f"{second}|{shard}" for shard in shards]
        assert list(result.dynamic_partitions_requests[0].partition_keys) == [second]
        cursor = result.cursor
        assert set(json.loads(cursor)) == {first, second}

        shutil.rmtree(root / "tiny" / first)  # removed: not an error, nothing requested
        (root / "tiny" / "broken").mkdir()
        (root / "tiny" / "broken" / "manifest.json").write_text("[")
        assert isinstance(tick(cursor), dg.SkipReason)


def _summary_lake(scores: list[dict], test_fraction: float = 1.0) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    for table in (RERANKER_SCORES, CHECKPOINTS, EVAL_SUMMARY):
        connection.execute(table.create_sql())
    columns = RERANKER_SCORES.column_names
    connection.register("incoming", pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in scores]))
    connection.execute(f"INSERT INTO reranker_scores SELECT {', '.join(columns)} FROM incoming")
    names = ", ".join(EVAL_SUMMARY.column_names)
    connection.execute(f"INSERT INTO eval_summary ({names}) SELECT {names} FROM ({summary_sql(test_fraction)})")
    return connection


def _score(source: str, doc_id: str, category: str = "title", passed: bool = True, scorer: str = "bge@512") -> dict:
    return {
        "source": source,
        "doc_id": doc_id,
        "category": category,
        "scorer": scorer,
        "score": 0.5,
        "bm25_rank": 1,
        "round_trip": passed,
    }


def test_each_row_says_how_many_of_the_pairs_other_sources_have_it_lacks():
    connection = _summary_lake(
        [_score("ckpt-a", doc) for doc in ("d1", "d2", "d3")]
        + [_score("teacher:t", doc) for doc in ("d1", "d2")]
        + [_score("ckpt-a", "d1", "faq"), _score("ckpt-a", "d1", scorer="other@512")]
    )
    rows = connection.execute(
        "SELECT source, scorer, category, n, missing_pairs FROM eval_summary ORDER BY ALL"
    ).fetchall()
    assert rows == [
        ("ckpt-a", "bge@512", "all", 4, 0),
        ("ckpt-a", "bge@512", "faq", 1, 0),
        ("ckpt-a", "bge@512", "title", 3, 0),
        ("ckpt-a", "other@512", "all", 1, 0),
        ("ckpt-a", "other@512", "title", 1, 0),
        ("teacher:t", "bge@512", "all", 2, 2),
        ("teacher:t", "bge@512", "title", 2, 1),
    ]
    table = _markdown(
        connection.execute("SELECT * FROM eval_summary WHERE category = 'all'").to_arrow_table().to_pylist()
    )
    assert "| 2 (2 missing) |" in table and "| 4 |" in table


def test_the_table_compares_sources_on_the_test_split_and_leaves_the_teachers_training_pairs_out():
    documents = [f"d{i}" for i in range(40)]
    test_documents = [doc for doc in documents if is_test_document(doc, 0.5)]
    assert 0 < len(test_documents) < len(documents)
    connection = _summary_lake(
        [_score("teacher:t", doc) for doc in documents] + [_score("ckpt-a", doc) for doc in test_documents],
        test_fraction=0.5,
    )
    rows = connection.execute("SELECT source, n, missing_pairs FROM eval_summary WHERE category = 'all' ORDER BY ALL")
    assert rows.fetchall() == [("ckpt-a", len(test_documents), 0), ("teacher:t", len(test_documents), 0)]


def test_the_check_names_checkpoints_whose_round_trips_pass_less_often_than_the_teachers_beyond_the_gap():
    def passes(source: str, rate_in_ten: int, scorer: str = "bge@512") -> list[dict]:
        return [_score(source, f"d{i}", passed=i < rate_in_ten, scorer=scorer) for i in range(10)]

    connection = _summary_lake(
        passes("teacher:t", 8)
        + passes("ckpt-close", 7)
        + passes("ckpt-behind", 6)
        + passes("teacher:t", 2, scorer="other@512")
        + passes("ckpt-behind", 6, scorer="other@512")
    )
    assert _round_trip_gaps(connection, 0.1) == [
        "ckpt-behind passes 0.600 of round trips, teacher:t 0.800, under bge@512"
    ]
    assert _round_trip_gaps(connection, 0.25) == []
    assert len(_round_trip_gaps(connection, 0.05)) == 2
