"""The lake's data contract: every table's columns and the analysts' views, in one place.

Asset keys match table names. Later stages add their tables here, so analysts and code read one definition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import dagster as dg
import pyarrow as pa

from qc_assets.lake.sql import sql_identifier

# The Arrow type of each DuckDB column type used below: what DuckDB reads into that column without a cast.
# TIMESTAMP WITH TIME ZONE is kept in microseconds UTC, as DuckDB stores it.
ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "UBIGINT": pa.uint64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "VARCHAR[]": pa.list_(pa.string()),
    "INTEGER[]": pa.list_(pa.int32()),
    "DOUBLE[]": pa.list_(pa.float64()),
    "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    description: str

    def arrow_field(self) -> pa.Field:
        if self.sql_type not in ARROW_TYPES:
            raise KeyError(f"column {self.name!r}: no Arrow type for {self.sql_type}; add it to ARROW_TYPES")
        return pa.field(self.name, ARROW_TYPES[self.sql_type])


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple[Column, ...]
    partition_columns: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    def create_sql(self) -> str:
        body = ", ".join(f"{sql_identifier(column.name)} {column.sql_type}" for column in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {sql_identifier(self.name)} ({body})"

    def add_missing_columns_sql(self, existing: set[str]) -> list[str]:
        return [
            f"ALTER TABLE {sql_identifier(self.name)} ADD COLUMN {sql_identifier(column.name)} {column.sql_type}"
            for column in self.columns
            if column.name not in existing
        ]

    def arrow_schema(self) -> pa.Schema:
        """The table's rows as Arrow, in column order: build rows with it, so Python never restates the columns."""
        return pa.schema([column.arrow_field() for column in self.columns])

    def dagster_schema(self) -> dg.TableSchema:
        return dg.TableSchema(
            columns=[
                dg.TableColumn(name=column.name, type=column.sql_type, description=column.description)
                for column in self.columns
            ]
        )


CORPUS = Table(
    name="corpus",
    description="Cleaned documents, one row per document, deduplicated by normalized text across shards.",
    columns=(
        Column("doc_id", "VARCHAR", "The source's id, or <shard>:<row> where the source has none."),
        Column("shard", "VARCHAR", "Partition key: the source file the document came from."),
        Column("text", "VARCHAR", "Text with control characters removed and outer whitespace trimmed."),
        Column("n_chars", "INTEGER", "Characters (code points) of text."),
        Column("source", "VARCHAR", "The file or dataset URL the shard was read from."),
        Column("source_row", "BIGINT", "Zero-based row of the document in its source file."),
        Column("text_hash", "UBIGINT", "Upper 64 bits of the md5 of text, for deduplication."),
        Column("ingested_at", "TIMESTAMP WITH TIME ZONE", "When the shard was materialized."),
    ),
    partition_columns=("shard",),
)

_LABEL_KEY = (
    Column("doc_id", "VARCHAR", "The labelled document (corpus.doc_id)."),
    Column("shard", "VARCHAR", "Partition key: the document's corpus shard."),
    Column("category", "VARCHAR", "One of the seven categories in qc_assets/categories.py."),
)
_LABEL_PROVENANCE = (
    Column("teacher", "VARCHAR", "The teacher model (or replay source) that wrote the label; part of the key."),
    Column("prompt_version", "VARCHAR", "Hash of the category's prompt (or `replay`); part of the key."),
)
_LABEL_SPEND = (
    Column(
        "input_tokens", "BIGINT", "Prompt tokens, summed over every attempt for the key (earlier quarantined runs too)."
    ),
    Column("cached_input_tokens", "BIGINT", "Prompt tokens served from the provider's cache."),
    Column("output_tokens", "BIGINT", "Completion tokens (reasoning included), summed over every attempt."),
    Column("reasoning_tokens", "BIGINT", "Reasoning tokens among output_tokens."),
    Column(
        "cost_usd",
        "DOUBLE",
        "What every attempt for this key cost, earlier quarantined runs included, at the configured price.",
    ),
    Column("attempts", "INTEGER", "Requests made for this key, over every run that asked for it."),
)

TEACHER_LABELS = Table(
    name="teacher_labels",
    description="One valid teacher query per (doc_id, category, teacher, prompt_version), paid for once.",
    columns=(
        *_LABEL_KEY,
        Column("query", "VARCHAR", "The label, as its category's validator returned it."),
        Column(
            "over_cap",
            "BOOLEAN",
            "The label is longer than its category's prompt asks (characters or keywords): a real answer, kept and "
            "flagged. NULL (rows older than the column, when over-cap answers were refused) means within the cap.",
        ),
        *_LABEL_PROVENANCE,
        Column(
            "reasoning", "VARCHAR", "The teacher's reasoning (R1 reasoning_content or inline <think>); never a target."
        ),
        *_LABEL_SPEND,
        Column("latency_s", "DOUBLE", "Seconds the successful request took."),
        Column("run_id", "VARCHAR", "The Dagster run that paid for the label."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the label arrived."),
    ),
    partition_columns=("shard",),
)

TEACHER_QUARANTINE = Table(
    name="teacher_quarantine",
    description="Keys whose teacher output stayed unusable after the retry budget; retried on the next run.",
    columns=(
        *_LABEL_KEY,
        *_LABEL_PROVENANCE,
        Column("raw_output", "VARCHAR", "The last raw completion (or error body) received."),
        Column("error", "VARCHAR", "Why the last attempt was rejected."),
        *_LABEL_SPEND,
        Column("run_id", "VARCHAR", "The Dagster run that gave up on the key."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the key was quarantined."),
    ),
    partition_columns=("shard",),
)

CHECKPOINTS = Table(
    name="checkpoints",
    description="Complete student checkpoints in the store (those with a manifest), one row per checkpoint.",
    columns=(
        Column("checkpoint", "VARCHAR", "Checkpoint id: <base-model-slug>--<dataset version>--<UTC time>."),
        Column("base_model", "VARCHAR", "The base model fine-tuned (hub id, path, or `tiny`)."),
        Column("path", "VARCHAR", "The checkpoint directory."),
        Column("dataset_version", "VARCHAR", "The SFT dataset version it was trained on."),
        Column("method", "VARCHAR", "`full` or `lora` (merged)."),
        Column("steps", "INTEGER", "Optimizer steps."),
        Column("final_loss", "DOUBLE", "Training loss at the last logged step."),
        Column("tokens_per_second", "DOUBLE", "Training tokens per second."),
        Column("tiny_model", "BOOLEAN", "True for the random-weight tiny student: its outputs mean nothing."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the checkpoint was published."),
    ),
    partition_columns=(),
)

GENERATED_QUERIES = Table(
    name="generated_queries",
    description="One query per test-split document and category, written by a student checkpoint.",
    columns=(
        Column("doc_id", "VARCHAR", "A test-split document (corpus.doc_id)."),
        Column("shard", "VARCHAR", "Partition key (with checkpoint): the document's corpus shard."),
        Column("category", "VARCHAR", "The category in the system turn."),
        Column("checkpoint", "VARCHAR", "Partition key (with shard): the checkpoint that wrote the query."),
        Column("query", "VARCHAR", "The generated query (first line of the answer)."),
        Column("input_tokens", "INTEGER", "Prompt tokens."),
        Column("output_tokens", "INTEGER", "Generated tokens."),
        Column("backend", "VARCHAR", "transformers, vllm or openai."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the partition was generated."),
    ),
    partition_columns=("checkpoint", "shard"),
)

RERANKER_SCORES = Table(
    name="reranker_scores",
    description="Cross-encoder score of each (query, document) pair, for students and the teacher, per scorer.",
    columns=(
        Column("doc_id", "VARCHAR", "A test-split document."),
        Column("shard", "VARCHAR", "The document's shard."),
        Column("category", "VARCHAR", "The query's category."),
        Column("source", "VARCHAR", "A checkpoint id, or teacher:<model> for the teacher's label."),
        Column("scorer", "VARCHAR", "The cross-encoder (model@max_length); part of the key."),
        Column("score", "DOUBLE", "Sigmoid relevance in 0..1."),
        Column("query", "VARCHAR", "The query scored."),
        Column("bm25_overlap", "DOUBLE", "Share of the query's character bigrams found in the document."),
        Column(
            "bm25_rank",
            "INTEGER",
            "Rank of the source document under character-bigram BM25 over the shard (1 = first).",
        ),
        Column(
            "rerank_rank",
            "INTEGER",
            "Rank of the source document once the cross-encoder re-ranks BM25's best QC_ROUND_TRIP_CANDIDATES "
            "(1 = first); NULL when BM25 did not put it among them.",
        ),
        Column("round_trip", "BOOLEAN", "The re-ranked candidates put the source document within round_trip_k."),
        Column("round_trip_k", "INTEGER", "QC_ROUND_TRIP_TOP_K when the pair was scored."),
        Column("copy_share", "DOUBLE", "Longest run of the query found verbatim in the document, as a share of it."),
        Column("copy_verbatim", "BOOLEAN", "The whole query appears verbatim in the document."),
        Column(
            "negative_doc_ids",
            "VARCHAR[]",
            "Hard negatives of a pair that passes the round trip: the best re-ranked rivals the guards let through; "
            "NULL when the pair does not pass.",
        ),
        Column("negative_ranks", "INTEGER[]", "Each negative's rank among the re-ranked candidates."),
        Column("negative_scores", "DOUBLE[]", "Each negative's cross-encoder score."),
        Column("negatives_too_close", "INTEGER", "Candidates dropped for scoring too close to the positive."),
        Column("negatives_near_duplicate", "INTEGER", "Candidates dropped as near duplicates of the positive."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the score was written."),
    ),
    partition_columns=("shard", "source", "scorer"),
)

EVAL_SUMMARY = Table(
    name="eval_summary",
    description="Seed 000's table: reranker score statistics per source, scorer and category ('all' overall).",
    columns=(
        Column("source", "VARCHAR", "A checkpoint id or teacher:<model>."),
        Column("scorer", "VARCHAR", "The cross-encoder."),
        Column("category", "VARCHAR", "A category, or 'all'."),
        Column("n", "BIGINT", "Scored pairs."),
        Column("mean", "DOUBLE", "Mean score (seed 000's 平均)."),
        Column("std", "DOUBLE", "Population standard deviation (seed 000's 標準偏差)."),
        *(Column(f"p{q:02d}", "DOUBLE", f"{q}th percentile of the score.") for q in (5, 10, 25, 50, 75, 90, 95)),
        Column("bm25_overlap", "DOUBLE", "Mean character-bigram overlap of the query with its document."),
        Column("bm25_top1", "DOUBLE", "Share of queries whose document BM25 ranks first in its shard (recall@1)."),
        Column("bm25_recall10", "DOUBLE", "Share of queries whose document BM25 ranks within 10."),
        Column("bm25_mrr10", "DOUBLE", "Mean reciprocal rank of the document under BM25, 0 beyond 10."),
        Column("rerank_recall1", "DOUBLE", "Share of queries whose document the re-ranked candidates put first."),
        Column("rerank_recall10", "DOUBLE", "Share of queries whose document the re-ranked candidates put within 10."),
        Column("rerank_mrr10", "DOUBLE", "Mean reciprocal rank of the document after re-ranking, 0 beyond 10."),
        Column("round_trip_rate", "DOUBLE", "Share of pairs that pass the round trip."),
        Column("copy_rate", "DOUBLE", "Share of queries found verbatim in their document."),
        Column("copy_share", "DOUBLE", "Mean longest verbatim run of a query in its document, as a share of it."),
        Column("negatives_per_pair", "DOUBLE", "Mean hard negatives kept per pair that passes the round trip."),
        Column(
            "missing_pairs",
            "BIGINT",
            "(document, category) pairs another source has under this scorer and this one lacks; 0: the row covers "
            "the same pairs as every other.",
        ),
        Column("tiny_model", "BOOLEAN", "The source or the scorer is a tiny model: the scores mean nothing."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the summary was computed."),
    ),
    partition_columns=(),
)

TRAINING_PAIRS = Table(
    name="training_pairs",
    description="The training pairs' current version per source: pairs scored, passing the round trip and exported "
    "as (anchor, positive, negative_1..n) rows, per split and category.",
    columns=(
        Column("source", "VARCHAR", "A checkpoint id or teacher:<model>: who wrote the queries."),
        Column("scorer", "VARCHAR", "The cross-encoder that re-ranked and mined."),
        Column("version", "VARCHAR", "The dataset version: a hash of its rows' keys and the filter."),
        Column("split", "VARCHAR", "train or test, by the SFT dataset's document split."),
        Column("category", "VARCHAR", "The query's category."),
        Column("scored", "BIGINT", "Pairs scored."),
        Column("passed_round_trip", "BIGINT", "Pairs whose document the re-ranked candidates put within the top k."),
        Column("exported", "BIGINT", "Rows exported: pairs that passed with enough hard negatives."),
        Column("path", "VARCHAR", "The version's directory; `hf/` in it loads with datasets.load_from_disk."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the export was checked."),
    ),
    partition_columns=(),
)

TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        CORPUS,
        TEACHER_LABELS,
        TEACHER_QUARANTINE,
        CHECKPOINTS,
        GENERATED_QUERIES,
        RERANKER_SCORES,
        EVAL_SUMMARY,
        TRAINING_PAIRS,
    )
}


TEACHER_SOURCE_PREFIX = "teacher:"


@dataclass(frozen=True)
class View:
    """A saved query for analysts, stored in the lake's catalog so every DuckDB client that attaches sees it."""

    name: str
    description: str
    sql: str

    @property
    def comment(self) -> str:
        # The definition's hash rides in the comment, so a writer replaces the view only when the code changed it.
        digest = hashlib.sha256(self.sql.encode()).hexdigest()[:12]
        return f"{self.description} [definition {digest}]"

    def create_sql(self) -> str:
        return f"CREATE OR REPLACE VIEW {sql_identifier(self.name)} AS {self.sql}"


_SPEND_SUMS = (
    "sum(attempts) AS requests, sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens, "
    "sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens, sum(cost_usd) AS cost_usd"
)
_SPEND_COLUMNS = "attempts, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_usd"

LABEL_COSTS = View(
    name="label_costs",
    description="Teacher spend per shard, category and teacher: labels, quarantined keys, requests, tokens and USD.",
    sql=(
        "SELECT shard, category, teacher, count(*) FILTER (WHERE outcome = 'labelled') AS labels, "
        f"count(*) FILTER (WHERE outcome = 'quarantined') AS quarantined, {_SPEND_SUMS}, "
        "sum(cost_usd) / nullif(count(*) FILTER (WHERE outcome = 'labelled'), 0) AS usd_per_label "
        f"FROM (SELECT 'labelled' AS outcome, shard, category, teacher, {_SPEND_COLUMNS} FROM teacher_labels "
        f"UNION ALL SELECT 'quarantined' AS outcome, shard, category, teacher, {_SPEND_COLUMNS} FROM teacher_quarantine) "
        "GROUP BY shard, category, teacher ORDER BY shard, category, teacher"
    ),
)

TEACHER_VS_STUDENT = View(
    name="teacher_vs_student",
    description="Each student query next to the teacher's for the same document, category and scorer, with both scores.",
    sql=(
        "SELECT student.doc_id, student.shard, student.category, student.scorer, teacher.source AS teacher, "
        "student.source AS checkpoint, teacher.query AS teacher_query, student.query AS student_query, "
        "teacher.score AS teacher_score, student.score AS student_score, student.score - teacher.score AS score_gain, "
        "teacher.bm25_rank AS teacher_bm25_rank, student.bm25_rank AS student_bm25_rank, corpus.text AS document "
        "FROM reranker_scores student JOIN reranker_scores teacher ON teacher.doc_id = student.doc_id "
        "AND teacher.shard = student.shard AND teacher.category = student.category AND teacher.scorer = student.scorer "
        f"AND starts_with(teacher.source, '{TEACHER_SOURCE_PREFIX}') "
        "LEFT JOIN corpus ON corpus.doc_id = student.doc_id AND corpus.shard = student.shard "
        f"WHERE NOT starts_with(student.source, '{TEACHER_SOURCE_PREFIX}')"
    ),
)

QUARANTINE = View(
    name="quarantine",
    description="Keys the teacher could not label yet, with the reason, the last raw output and the document's start.",
    sql=(
        "SELECT q.shard, q.doc_id, q.category, q.teacher, q.error, q.raw_output, q.attempts, q.cost_usd, q.run_id, "
        "q.created_at, left(corpus.text, 200) AS document_start, q.prompt_version "
        "FROM teacher_quarantine q LEFT JOIN corpus ON corpus.doc_id = q.doc_id AND corpus.shard = q.shard "
        "ORDER BY q.shard, q.doc_id, q.category"
    ),
)

ROUND_TRIP_NEGATIVES = View(
    name="round_trip_negatives",
    description="Each scored pair's round trip, one row per hard negative kept (or one row without when none was): "
    "the query, both ranks of its document, its copying, each negative with its rank, score and start, and what "
    "the guards dropped.",
    sql=(
        "SELECT s.source, s.scorer, s.shard, s.doc_id, s.category, s.query, s.score, s.bm25_rank, s.rerank_rank, "
        "s.round_trip, s.round_trip_k, s.copy_share, s.copy_verbatim, s.negatives_too_close, "
        "s.negatives_near_duplicate, n.position AS negative, s.negative_doc_ids[n.position] AS negative_doc_id, "
        "s.negative_ranks[n.position] AS negative_rank, s.negative_scores[n.position] AS negative_score, "
        "left(negative.text, 200) AS negative_start, left(positive.text, 200) AS document_start "
        "FROM reranker_scores s "
        "LEFT JOIN LATERAL (SELECT unnest(range(1, len(s.negative_doc_ids) + 1)) AS position) n ON true "
        "LEFT JOIN corpus positive ON positive.doc_id = s.doc_id AND positive.shard = s.shard "
        "LEFT JOIN corpus negative ON negative.doc_id = s.negative_doc_ids[n.position] AND negative.shard = s.shard"
    ),
)

VIEWS: dict[str, View] = {
    view.name: view for view in (LABEL_COSTS, TEACHER_VS_STUDENT, QUARANTINE, ROUND_TRIP_NEGATIVES)
}
