"""The training pairs, from scored pairs to a dataset sentence-transformers' trainers load: a planted near-duplicate
never becomes a negative, a planted copied query is measured as copied, and train and test share no document."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import datasets
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qc_assets.defs.scoring.lexical import char_bigrams
from qc_assets.defs.scoring.negatives import jaccard
from qc_assets.defs.sft.dataset import is_test_document
from qc_assets.defs.training_pairs.export import PairSelection, source_root, verify
from qc_assets.hf_export import current_version
from qc_assets.lake.resource import LakeResource
from qc_assets.models.tiny import CROSS_ENCODER_DIR
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets_tests.conftest import lake_rows, materialization_metadata, materialize, materialize_asset

SHARDS = ("sample-00000", "sample-00001")
TEST_FRACTION = 0.3
ORIGINAL = "qc-sample-00-00"
CHECKPOINT = "planted-student"
TEACHER = "teacher:handwritten-sample"


def _near_duplicate_id() -> str:
    """An id in the original's split: a near duplicate in the other split is never a candidate negative anyway."""
    wanted = is_test_document(ORIGINAL, TEST_FRACTION)
    return next(
        doc_id for i in range(100) if is_test_document(doc_id := f"planted-near-duplicate-{i}", TEST_FRACTION) == wanted
    )


def _corpus_with_a_near_duplicate(directory) -> tuple[str, str]:
    directory.mkdir()
    for shard in SHARDS:
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", directory)
    path = directory / f"{SHARDS[0]}.jsonl"
    original = next(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    assert original["id"] == ORIGINAL
    near = {"id": _near_duplicate_id(), "text": original["text"].replace("二人分", "2人分")}
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(near, ensure_ascii=False) + "\n")
    return near["id"], original["text"]


def _plant_a_copied_query_and_a_students_queries(settings, copied: str) -> None:
    """The original's `query` label becomes a phrase of its document; the stand-in student (no GPU, no training
    here) answers each test-split document of the first shard with the teacher's label reversed, and none of the
    second, as for a shard without test documents."""

    def plant(connection: duckdb.DuckDBPyConnection) -> None:
        connection.execute(
            "UPDATE teacher_labels SET query = $1 WHERE doc_id = $2 AND category = 'query'", [copied, ORIGINAL]
        )
        connection.execute(
            "INSERT INTO generated_queries (doc_id, shard, category, checkpoint, query, backend, created_at) "
            "SELECT doc_id, shard, category, $1, reverse(query), 'planted', now() FROM teacher_labels "
            f"WHERE substr(md5(doc_id), 1, 16) < '{format(int(TEST_FRACTION * 2**64), '016x')}' AND shard = $2",
            [CHECKPOINT, SHARDS[0]],
        )

    LakeResource(catalog=settings.catalog, data_path=settings.data_path).transaction(plant, "plant")


@pytest.mark.long(60)
def test_training_pairs_keep_near_duplicates_out_measure_copying_and_load_in_the_trainers_layout(
    settings_for, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    near_id, original_text = _corpus_with_a_near_duplicate(tmp_path / "corpus")
    copied = original_text[40:70]
    settings = settings_for(
        tmp_path / "corpus",
        QC_SCORER_MODEL="tiny",
        QC_SFT_TEST_FRACTION=str(TEST_FRACTION),
        QC_NEGATIVES_PER_PAIR="2",
        # What this test shows must not hang on the tiny scorer's judgement: every pair BM25 finds passes, and only
        # a candidate scored above its positive is too close.
        QC_ROUND_TRIP_TOP_K="20",
        QC_ROUND_TRIP_CANDIDATES="20",
        QC_NEGATIVES_RELATIVE_MARGIN="0",
        QC_SCORER_MAX_LENGTH="128",
    )
    with dg.instance_for_test() as instance:
        for shard in SHARDS:
            assert materialize(settings, shard, instance).success
        _plant_a_copied_query_and_a_students_queries(settings, copied)
        instance.add_dynamic_partitions("checkpoint", [CHECKPOINT])
        for shard in SHARDS:
            partition = dg.MultiPartitionKey({"checkpoint": CHECKPOINT, "shard": shard})
            assert materialize_asset(settings, "reranker_scores", instance, partition=partition).success

        # Scoring the shard again (another checkpoint's run, say) maps its saved BM25 index back.
        partition = dg.MultiPartitionKey({"checkpoint": CHECKPOINT, "shard": SHARDS[0]})
        rescored = materialize_asset(settings, "reranker_scores", instance, partition=partition)
        indexes = materialization_metadata(rescored, "reranker_scores")
        assert (indexes["bm25_indexes_built"], indexes["bm25_indexes_loaded"]) == (0, 1)

        # The copied query is measured as copied; the near duplicate is never the original's negative.
        assert lake_rows(
            settings,
            "SELECT copy_share, copy_verbatim FROM reranker_scores WHERE source = $1 AND doc_id = $2 "
            "AND category = 'query'",
            [TEACHER, ORIGINAL],
        ) == [(1.0, True)]
        original_rows = lake_rows(
            settings,
            "SELECT list_contains(negative_doc_ids, $1), negatives_too_close + negatives_near_duplicate "
            "FROM reranker_scores WHERE doc_id = $2 AND round_trip",
            [near_id, ORIGINAL],
        )
        assert original_rows and not any(contains for contains, _ in original_rows)
        assert all(dropped >= 1 for _, dropped in original_rows)
        # Every split's teacher labels are scored; the report compares the test split only.
        (teacher_splits,) = lake_rows(
            settings,
            "SELECT count(DISTINCT doc_id) FILTER (substr(md5(doc_id), 1, 16) < $2), count(DISTINCT doc_id) "
            "FROM reranker_scores WHERE source = $1",
            [TEACHER, format(int(TEST_FRACTION * 2**64), "016x")],
        )
        assert 0 < teacher_splits[0] < teacher_splits[1]
        # A shard the student wrote nothing for still has its teacher's pairs scored.
        assert lake_rows(
            settings,
            "SELECT count(*) > 0, count(*) FILTER (source <> $1) FROM reranker_scores WHERE shard = $2",
            [TEACHER, SHARDS[1]],
        ) == [(True, 0)]

        exported = materialize_asset(settings, "training_pairs", instance)
        assert exported.success
        assert all(check.passed for check in exported.get_asset_check_evaluations())
        metadata = materialization_metadata(exported, "training_pairs")
        root = settings.data_root / "training_pairs"
        directory = current_version(source_root(root, TEACHER))
        assert directory is not None and (directory / "README.md").is_file()
        splits = datasets.load_from_disk(str(directory / "hf"))
        assert set(splits) == {"train", "test"}
        assert splits["train"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
        assert len(splits["train"]) > 0

        counted = dict(
            lake_rows(
                settings,
                "SELECT split, sum(exported) FROM training_pairs WHERE source = $1 GROUP BY split",
                [TEACHER],
            )
        )
        assert {split: len(rows) for split, rows in splits.items()} == {
            split: counted.get(split, 0) for split in ("train", "test")
        }
        assert metadata["dagster/row_count"] == sum(
            count for (count,) in lake_rows(settings, "SELECT sum(exported) FROM training_pairs")
        )
        for rows in splits.values():
            for row in rows:
                positive = frozenset(char_bigrams(row["positive"]))
                for negative in (row["negative_1"], row["negative_2"]):
                    assert negative != row["positive"]
                    assert jaccard(frozenset(char_bigrams(negative)), positive) < settings.negatives_max_similarity

        provenance = duckdb.connect()
        documents = {
            split: {
                doc_id
                for (doc_id,) in provenance.execute(
                    "SELECT doc_id FROM read_parquet($1) UNION SELECT unnest(negative_doc_ids) FROM read_parquet($1)",
                    [str(directory / "parquet" / f"{split}.parquet")],
                ).fetchall()
            }
            for split in ("train", "test")
        }
        assert documents["train"] and not documents["train"] & documents["test"]
        assert all(is_test_document(doc_id, TEST_FRACTION) for doc_id in documents["test"])

        _train_one_step_with_each_trainer(settings, splits["train"], tmp_path / "trainers")

        again = materialize_asset(settings, "training_pairs", instance)
        assert materialization_metadata(again, "training_pairs")["new_versions"] == 0
        assert current_version(source_root(root, TEACHER)) == directory


def test_the_check_reads_back_negatives_that_are_their_positive_and_documents_in_both_splits(tmp_path):
    selection = PairSelection("tiny@128", 1, 1, TEST_FRACTION)
    (tmp_path / "parquet").mkdir()

    def write(split: str, rows: list[dict]) -> None:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / f"{split}.parquet")

    def row(doc_id: str, positive: str, negative_id: str, negative: str) -> dict:
        return {"positive": positive, "negative_1": negative, "doc_id": doc_id, "negative_doc_ids": [negative_id]}

    write("train", [row("a", "text a", "b", "text b"), row("c", "text c", "d", "text c")])
    write("test", [row("e", "text e", "f", "text f")])
    assert verify(tmp_path, selection) == {"negative_is_its_positive": 1, "documents_in_both_splits": 0}
    write("test", [row("e", "text e", "b", "text b"), row("f", "text f", "f", "text f")])
    assert verify(tmp_path, selection) == {"negative_is_its_positive": 2, "documents_in_both_splits": 1}


def _train_one_step_with_each_trainer(settings, rows: datasets.Dataset, output_dir) -> None:
    """The rows feed sentence-transformers' trainers as they are: an embedder (the tiny XLM-R with mean pooling)
    under MultipleNegativesRankingLoss and the tiny cross-encoder under its own."""
    from sentence_transformers import (
        CrossEncoder,
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss as RerankerLoss
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model_dir = str(settings.data_root / "models" / CROSS_ENCODER_DIR)
    options = {"max_steps": 1, "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no"}
    embedder = SentenceTransformer(model_dir, device="cpu")
    embedder.max_seq_length = 64
    embedding = SentenceTransformerTrainer(
        model=embedder,
        args=SentenceTransformerTrainingArguments(output_dir=str(output_dir / "embedder"), **options),
        train_dataset=rows,
        loss=MultipleNegativesRankingLoss(embedder),
    ).train()
    reranker = CrossEncoder(model_dir, device="cpu", max_length=64)
    reranking = CrossEncoderTrainer(
        model=reranker,
        args=CrossEncoderTrainingArguments(output_dir=str(output_dir / "reranker"), **options),
        train_dataset=rows,
        loss=RerankerLoss(reranker),
    ).train()
    assert embedding.global_step == reranking.global_step == 1
    assert embedding.training_loss > 0 and reranking.training_loss > 0
