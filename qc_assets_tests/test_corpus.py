"""The raw corpus asset, materialized on an ephemeral instance against a real DuckLake lake."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets_tests.conftest import document, lake_rows, materialization_metadata, materialize, write_jsonl


def test_sample_corpus_materializes_every_shard_and_rematerializing_keeps_the_same_rows(settings_for):
    settings = settings_for(SAMPLE_CORPUS)
    with dg.instance_for_test() as instance:
        shards = sorted(path.stem for path in SAMPLE_CORPUS.glob("*.jsonl"))
        assert len(shards) >= 3
        for shard in shards:
            assert materialize(settings, shard, instance).success
        first = lake_rows(settings, "SELECT doc_id, shard, text, n_chars, source FROM corpus ORDER BY doc_id")
        assert len(first) >= 60
        assert all(200 <= n_chars <= 1500 for *_, n_chars, _ in first)
        assert materialize(settings, shards[0], instance).success
        again = lake_rows(settings, "SELECT doc_id, shard, text, n_chars, source FROM corpus ORDER BY doc_id")
        assert again == first
        assert len({row[0] for row in again}) == len(again)


def test_cleaning_drops_and_counts_each_reason(settings_for, tmp_path):
    source = tmp_path / "corpus"
    good = [{"id": f"a{i}", "text": document(i)} for i in range(5)]
    write_jsonl(
        source / "a.jsonl",
        [
            *good,
            {"id": "blank", "text": " \n\u3000\t "},
            {"id": "short", "text": "短い。"},
            {"id": "long", "text": "長" * 3000},
            {"id": "copy", "text": "  " + document(0) + "\n"},
            {"id": "a1", "text": document(99)},
            {"id": "ctl", "text": document(7) + "\x00\x07\x1b"},
            {"text": document(8)},
            "{not json",
            {"id": "wrong", "text": 12},
        ],
    )
    settings = settings_for(source)
    with dg.instance_for_test() as instance:
        result = materialize(settings, "a", instance)
        assert result.success
        metadata = materialization_metadata(result)
    assert metadata["dagster/row_count"] == 7
    assert metadata["rows_read"] == 14
    assert metadata["rows_unreadable"] == 2
    assert metadata["dropped_empty"] == 1
    assert metadata["dropped_too_short"] == 1
    assert metadata["dropped_too_long"] == 1
    assert metadata["dropped_duplicate_text_in_shard"] == 1
    assert metadata["dropped_duplicate_id_in_shard"] == 1
    assert metadata["rows_with_control_chars_removed"] == 1
    rows = dict(lake_rows(settings, "SELECT doc_id, text FROM corpus"))
    assert rows["ctl"] == document(7)
    assert rows["a:11"] == document(8), "a row without an id gets <shard>:<row>"
    assert rows["a1"] == document(1), "the first occurrence of an id wins"


@pytest.mark.parametrize("order", [["s0", "s1"], ["s1", "s0"]])
def test_duplicates_across_shards_keep_the_first_shard_whatever_the_order(settings_for, tmp_path, order):
    source = tmp_path / "corpus"
    write_jsonl(source / "s0.jsonl", [{"id": f"x{i}", "text": document(i)} for i in range(4)])
    write_jsonl(
        source / "s1.jsonl",
        [{"id": "y0", "text": document(2)}, {"id": "x3", "text": document(50)}, {"id": "y1", "text": document(51)}],
    )
    settings = settings_for(source)
    with dg.instance_for_test() as instance:
        for shard in order:
            assert materialize(settings, shard, instance).success
    rows = lake_rows(settings, "SELECT shard, doc_id FROM corpus ORDER BY shard, doc_id")
    assert rows == [("s0", "x0"), ("s0", "x1"), ("s0", "x2"), ("s0", "x3"), ("s1", "y1")]


def test_fineweb_parquet_shard_and_hf_layout(settings_for, tmp_path):
    repo = tmp_path / "fineweb-like"
    write_fineweb_shard(repo / "data" / "train-00000-of-00002.parquet", 300, mean_chars=400, seed=1)
    write_fineweb_shard(repo / "data" / "train-00001-of-00002.parquet", 200, mean_chars=400, seed=2)
    for settings in (settings_for(repo / "data"), settings_for(f"hf:{repo}")):
        with dg.instance_for_test() as instance:
            for shard in ("train-00000-of-00002", "train-00001-of-00002"):
                result = materialize(settings, shard, instance)
                assert result.success, shard
        ((count, distinct, shards),) = lake_rows(
            settings, "SELECT count(*), count(DISTINCT doc_id), count(DISTINCT shard) FROM corpus"
        )
        assert (count, distinct, shards) == (500, 500, 2)
        assert lake_rows(settings, "SELECT doc_id FROM corpus WHERE source_row = 0 AND shard LIKE '%00000%'") == [
            ("<urn:uuid:00000001-0000-4000-8000-000000000000>",)
        ]


def test_bad_shards_fail_alone_with_the_file_and_problem_named(settings_for, tmp_path):
    source = tmp_path / "corpus"
    write_jsonl(source / "good.jsonl", [{"id": f"g{i}", "text": document(i)} for i in range(3)])
    corrupt = source / "corrupt.parquet"
    write_fineweb_shard(corrupt, 50, mean_chars=300)
    corrupt.write_bytes(corrupt.read_bytes()[:-20])
    pq.write_table(pa.table({"body": [document(1)], "id": ["n1"]}), source / "no_text.parquet")
    pq.write_table(pa.table({"text": [1, 2], "id": ["t1", "t2"]}), source / "int_text.parquet")
    write_jsonl(source / "no_text_field.jsonl", [{"id": "n2", "body": document(2)}])
    settings = settings_for(source)
    expected = {
        "corrupt": "not a readable parquet file",
        "no_text": "no column 'text'",
        "int_text": "holds int64, not text",
        "no_text_field": "no row has the field 'text'",
    }
    with dg.instance_for_test() as instance:
        for shard, problem in expected.items():
            result = materialize(settings, shard, instance)
            assert not result.success
            (failure,) = [event for event in result.all_events if event.is_step_failure]
            message = failure.step_failure_data.user_failure_data.description
            assert f"shard {shard}:" in message and str(source / shard) in message and problem in message
        assert materialize(settings, "good", instance).success
    assert lake_rows(settings, "SELECT count(*) FROM corpus") == [(3,)]


def test_a_failed_write_leaves_the_previous_rows(settings_for, tmp_path, monkeypatch):
    source = tmp_path / "corpus"
    write_jsonl(source / "s.jsonl", [{"id": f"d{i}", "text": document(i)} for i in range(4)])
    settings = settings_for(source)
    with dg.instance_for_test() as instance:
        assert materialize(settings, "s", instance).success
        before = lake_rows(settings, "SELECT doc_id, text FROM corpus ORDER BY doc_id")
        write_jsonl(source / "s.jsonl", [{"id": f"e{i}", "text": document(i + 10)} for i in range(6)])

        import qc_assets.defs.corpus.assets as corpus_assets

        def fail_after_delete(connection, table, partition, rows_relation):
            connection.execute('DELETE FROM "corpus" WHERE shard = ?', [partition["shard"]])
            raise RuntimeError("disk full while inserting")

        monkeypatch.setattr(corpus_assets, "replace_partition", fail_after_delete)
        assert not materialize(settings, "s", instance).success
    assert lake_rows(settings, "SELECT doc_id, text FROM corpus ORDER BY doc_id") == before
