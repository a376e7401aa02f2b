"""The reranker_scores asset: a cross-encoder and a character-bigram BM25 check on students' and teacher's queries."""

import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from qc_assets.defs.generation.assets import CHECKPOINT_DIMENSION, SHARD_DIMENSION
from qc_assets.defs.scoring.lexical import ShardIndex, lexical_checks
from qc_assets.defs.scoring.scorers import open_scorer
from qc_assets.defs.sft.assets import SftResource
from qc_assets.defs.sft.dataset import split_is_test_sql
from qc_assets.defs.teacher.assets import TeacherResource
from qc_assets.execution import GPU_POD, GPU_POOL
from qc_assets.lake.resource import LakeResource, fetch_row, replace_partition, run_transaction
from qc_assets.lake.tables import CORPUS, GENERATED_QUERIES, RERANKER_SCORES, TEACHER_LABELS, TEACHER_SOURCE_PREFIX
from qc_assets.models.tiny import CROSS_ENCODER_DIR, ensure_tiny_models, sample_texts
from qc_assets.settings import TINY_STUDENT, Settings


class ScoringResource(dg.ConfigurableResource):
    """The cross-encoder that judges queries (QC_SCORER_*)."""

    model: str = Field(default="BAAI/bge-reranker-v2-m3", description="QC_SCORER_MODEL: hub id, directory, or `tiny`.")
    max_length: int = Field(default=512, description="QC_SCORER_MAX_LENGTH")
    batch_size: int = Field(default=32, description="QC_SCORER_BATCH_SIZE")
    models_dir: str = Field(description="Where the tiny models live, QC_DATA_DIR/models.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "ScoringResource":
        return cls(
            model=settings.scorer_model,
            max_length=settings.scorer_max_length,
            batch_size=settings.scorer_batch_size,
            models_dir=str(settings.data_root / "models"),
        )

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_STUDENT

    def open(self):
        if self.is_tiny:
            path = ensure_tiny_models(Path(self.models_dir), sample_texts())[CROSS_ENCODER_DIR]
            return open_scorer(
                str(path),
                max_length=self.max_length,
                batch_size=self.batch_size,
                name=f"tiny-cross-encoder@{self.max_length}",
            )
        return open_scorer(self.model, max_length=self.max_length, batch_size=self.batch_size)


_ARROW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("shard", pa.string()),
        ("category", pa.string()),
        ("source", pa.string()),
        ("scorer", pa.string()),
        ("score", pa.float64()),
        ("query", pa.string()),
        ("bm25_overlap", pa.float64()),
        ("bm25_rank", pa.int32()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _score_rows(
    scorer,
    index: ShardIndex,
    texts: dict[str, str],
    items: list[tuple[str, str, str]],
    shard: str,
    source: str,
    log,
    seconds: dict[str, float],
) -> pa.Table:
    """items: (doc_id, category, query) -> rows with the neural score and the lexical check; adds the time spent in
    the cross-encoder and in the lexical check to `seconds`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    scores = scorer.score([(query, texts[doc_id]) for doc_id, _, query in items], log=log)
    scored = time.perf_counter()
    seconds["score_cpu"] += time.process_time() - cpu_started
    lexical = lexical_checks(index, [(query, doc_id) for doc_id, _, query in items])
    seconds["score"] += scored - started
    seconds["lexical"] += time.perf_counter() - scored
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [
            {
                "doc_id": doc_id,
                "shard": shard,
                "category": category,
                "source": source,
                "scorer": scorer.name,
                "score": float(score),
                "query": query,
                "bm25_overlap": float(overlap),
                "bm25_rank": int(rank),
                "created_at": now,
            }
            for (doc_id, category, query), score, (overlap, rank) in zip(items, scores, lexical)
        ],
        schema=_ARROW_SCHEMA,
    )


def _write_scores(connection: duckdb.DuckDBPyConnection, table: pa.Table, partition: dict[str, str]) -> int:
    connection.register("scored_rows", table)
    count = replace_partition(connection, RERANKER_SCORES, partition, "scored_rows")
    # The connection outlives this write: it should not hold on to the rows.
    connection.unregister("scored_rows")
    return count


def build_scoring_asset(partitions_def: dg.MultiPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=RERANKER_SCORES.name,
        partitions_def=partitions_def,
        deps=[
            dg.AssetDep(GENERATED_QUERIES.name),
            dg.AssetDep(
                TEACHER_LABELS.name, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(SHARD_DIMENSION)
            ),
        ],
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="scoring",
        op_tags=GPU_POD,
        pool=GPU_POOL,
        kinds={"pytorch", "duckdb"},
        description=RERANKER_SCORES.description
        + " The teacher's labels of the same test documents are scored by the same scorer once per shard.",
        metadata={
            "dagster/column_schema": RERANKER_SCORES.dagster_schema(),
            "dagster/table_name": f"lake.{RERANKER_SCORES.name}",
        },
        check_specs=[
            dg.AssetCheckSpec(
                "scores_in_range",
                asset=RERANKER_SCORES.name,
                blocking=True,
                description="Every score is a number in 0..1.",
            ),
        ],
    )
    def reranker_scores(
        context: dg.AssetExecutionContext,
        scoring: ScoringResource,
        teacher: TeacherResource,
        sft: SftResource,
        lake: LakeResource,
    ):
        started = time.perf_counter()
        teacher_name, prompt_versions = teacher.identity()
        teacher_source = TEACHER_SOURCE_PREFIX + teacher_name
        seconds = {"model_load": 0.0, "score": 0.0, "score_cpu": 0.0, "lexical": 0.0, "index": 0.0}
        scorer = scoring.open()
        seconds["model_load"] = time.perf_counter() - started
        context.log.info(f"scoring with {scorer.name}")
        written = {"student": 0, "teacher": 0}
        out_of_range = 0
        try:
            # One lake connection for the whole run: attaching the lake (loading DuckDB's extensions, reading the
            # catalog) costs about half a second of CPU, which a connection per read and per write paid 2-3 times a
            # partition.
            with lake.get_connection() as connection:
                for key in context.partition_keys:
                    dimensions = partitions_def.get_partition_key_from_str(key).keys_by_dimension
                    checkpoint, shard = dimensions[CHECKPOINT_DIMENSION], dimensions[SHARD_DIMENSION]
                    texts = dict(
                        connection.execute(
                            f'SELECT doc_id, text FROM "{CORPUS.name}" WHERE shard = $1', [shard]
                        ).fetchall()
                    )
                    student = connection.execute(
                        "SELECT doc_id, category, query FROM generated_queries WHERE checkpoint = $1 AND shard = $2 ORDER BY ALL",
                        [checkpoint, shard],
                    ).fetchall()
                    teacher_items = connection.execute(
                        f"""SELECT l.doc_id, l.category, l.query FROM teacher_labels l
                            WHERE l.shard = $1 AND l.teacher = $2 AND {split_is_test_sql("l.doc_id", sft.test_fraction)}
                            ORDER BY ALL""",
                        [shard, teacher_name],
                    ).fetchall()
                    teacher_items = [
                        item for item in teacher_items if prompt_versions.get(item[1]) is not None and item[0] in texts
                    ]
                    already = fetch_row(
                        connection.execute(
                            "SELECT count(*) FROM reranker_scores WHERE shard = $1 AND source = $2 AND scorer = $3",
                            [shard, teacher_source, scorer.name],
                        )
                    )[0]
                    if not student:
                        # A small shard can have no test-split document; then generated_queries wrote nothing either.
                        context.log.warning(f"{checkpoint}|{shard}: no generated queries to score")
                        continue
                    index_started = time.perf_counter()
                    index = ShardIndex(list(texts), list(texts.values()))
                    seconds["index"] += time.perf_counter() - index_started
                    batches = [
                        (
                            checkpoint,
                            _score_rows(scorer, index, texts, student, shard, checkpoint, context.log.info, seconds),
                        )
                    ]
                    # The teacher's labels of these documents are scored once per shard and scorer, not per checkpoint.
                    if teacher_items and already != len(teacher_items):
                        batches.append(
                            (
                                teacher_source,
                                _score_rows(
                                    scorer,
                                    index,
                                    texts,
                                    teacher_items,
                                    shard,
                                    teacher_source,
                                    context.log.info,
                                    seconds,
                                ),
                            )
                        )
                    del index, texts
                    for source, table in batches:
                        scores = table.column("score").to_pylist()
                        out_of_range += sum(not (0.0 <= score <= 1.0) for score in scores)
                        partition = {"shard": shard, "source": source, "scorer": scorer.name}
                        write = partial(_write_scores, table=table, partition=partition)
                        count = run_transaction(connection, write, f"write reranker scores {source}|{shard}")
                        written["teacher" if source == teacher_source else "student"] += count
                    context.log.info(
                        f"{checkpoint}|{shard}: {len(student)} student and {len(teacher_items)} teacher pairs scored"
                    )
        finally:
            scorer.close()
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": written["student"],
                "scorer": scorer.name,
                "tiny_scorer": scoring.is_tiny,
                "student_pairs": written["student"],
                "teacher_pairs_rescored": written["teacher"],
                "seconds": round(time.perf_counter() - started, 2),
                # Model compute: time inside the cross-encoder, and loading it. The BM25 check is not model compute.
                "score_seconds": round(seconds["score"], 3),
                "score_cpu_seconds": round(seconds["score_cpu"], 3),
                "model_load_seconds": round(seconds["model_load"], 3),
                "bm25_index_seconds": round(seconds["index"], 3),
                "bm25_check_seconds": round(seconds["lexical"], 3),
            }
        )
        yield dg.AssetCheckResult(
            check_name="scores_in_range", passed=out_of_range == 0, metadata={"out_of_range": out_of_range}
        )

    return reranker_scores
