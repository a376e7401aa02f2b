"""The lake's data contract: every table's columns, in one place.

Asset keys match table names. Later stages add their tables here, so analysts and code read one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    description: str


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
        body = ", ".join(f'"{column.name}" {column.sql_type}' for column in self.columns)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({body})'

    def add_missing_columns_sql(self, existing: set[str]) -> list[str]:
        return [
            f'ALTER TABLE "{self.name}" ADD COLUMN "{column.name}" {column.sql_type}'
            for column in self.columns
            if column.name not in existing
        ]

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
    Column("input_tokens", "BIGINT", "Prompt tokens, summed over every attempt for the key (earlier quarantined runs too)."),
    Column("cached_input_tokens", "BIGINT", "Prompt tokens served from the provider's cache."),
    Column("output_tokens", "BIGINT", "Completion tokens (reasoning included), summed over every attempt."),
    Column("reasoning_tokens", "BIGINT", "Reasoning tokens among output_tokens."),
    Column("cost_usd", "DOUBLE", "What every attempt for this key cost, earlier quarantined runs included, at the configured price."),
    Column("attempts", "INTEGER", "Requests made for this key, over every run that asked for it."),
)

TEACHER_LABELS = Table(
    name="teacher_labels",
    description="One valid teacher query per (doc_id, category, teacher, prompt_version), paid for once.",
    columns=(
        *_LABEL_KEY,
        Column("query", "VARCHAR", "The label, as its category's validator returned it."),
        *_LABEL_PROVENANCE,
        Column("reasoning", "VARCHAR", "The teacher's reasoning (R1 reasoning_content or inline <think>); never a target."),
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
        Column("bm25_rank", "INTEGER", "Rank of the source document under character-bigram BM25 over the shard (1 = first)."),
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
        Column("bm25_top1", "DOUBLE", "Share of queries whose document BM25 ranks first in its shard."),
        Column("tiny_model", "BOOLEAN", "The source or the scorer is a tiny random-weight model: the scores mean nothing."),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "When the summary was computed."),
    ),
    partition_columns=(),
)

TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        CORPUS, TEACHER_LABELS, TEACHER_QUARANTINE, CHECKPOINTS, GENERATED_QUERIES, RERANKER_SCORES, EVAL_SUMMARY
    )
}
