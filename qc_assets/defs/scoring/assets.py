"""The reranker_scores asset: a cross-encoder's score of students' and teacher's queries, the round trip (does BM25
then the cross-encoder find the query's document again?) and how much of each query is copied from its document."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from qc_assets.defs.generation.assets import checkpoint_and_shard
from qc_assets.defs.scoring.copying import copying
from qc_assets.defs.scoring.index_cache import ShardIndexes
from qc_assets.defs.scoring.lexical import ShardIndex, lexical_checks
from qc_assets.defs.scoring.negatives import Negatives, NegativeSettings, bigram_sets, mine
from qc_assets.defs.scoring.round_trip import RoundTripSettings, round_trips, scored_pairs
from qc_assets.defs.scoring.scorers import QueryScorer, open_scorer, scorer_name
from qc_assets.defs.sft.assets import SftResource
from qc_assets.defs.sft.dataset import is_test_document, split_is_test_sql
from qc_assets.defs.teacher.assets import TeacherResource
from qc_assets.execution import GPU_POD, GPU_POOL
from qc_assets.lake.resource import LakeResource, fetch_row, replace_partition_rows, run_transaction
from qc_assets.lake.tables import CORPUS, GENERATED_QUERIES, RERANKER_SCORES, TEACHER_LABELS, TEACHER_SOURCE_PREFIX
from qc_assets.models.tiny import CROSS_ENCODER_DIR, ensure_tiny_models, sample_texts
from qc_assets.partitions import SHARD_DIMENSION
from qc_assets.settings import TINY_STUDENT, Settings


class ScoringResource(dg.ConfigurableResource):
    """The cross-encoder that judges queries (QC_SCORER_*)."""

    model: str = Field(description="QC_SCORER_MODEL: hub id, directory, or `tiny`.")
    max_length: int = Field(description="QC_SCORER_MAX_LENGTH")
    batch_size: int = Field(description="QC_SCORER_BATCH_SIZE")
    models_dir: str = Field(description="Where the tiny models live, QC_DATA_DIR/models.")
    indexes_dir: str = Field(description="Where each shard's BM25 index is kept between runs, QC_DATA_DIR/indexes.")
    round_trip_candidates: int = Field(description="QC_ROUND_TRIP_CANDIDATES")
    round_trip_top_k: int = Field(description="QC_ROUND_TRIP_TOP_K")
    negatives_per_pair: int = Field(description="QC_NEGATIVES_PER_PAIR")
    negatives_relative_margin: float = Field(description="QC_NEGATIVES_RELATIVE_MARGIN")
    negatives_max_similarity: float = Field(description="QC_NEGATIVES_MAX_SIMILARITY")
    score_teacher_train_split: bool = Field(description="QC_SCORE_TEACHER_TRAIN_SPLIT")

    @classmethod
    def from_settings(cls, settings: Settings) -> "ScoringResource":
        return cls(
            model=settings.scorer_model,
            max_length=settings.scorer_max_length,
            batch_size=settings.scorer_batch_size,
            models_dir=str(settings.data_root / "models"),
            indexes_dir=str(settings.data_root / "indexes"),
            round_trip_candidates=settings.round_trip_candidates,
            round_trip_top_k=settings.round_trip_top_k,
            negatives_per_pair=settings.negatives_per_pair,
            negatives_relative_margin=settings.negatives_relative_margin,
            negatives_max_similarity=settings.negatives_max_similarity,
            score_teacher_train_split=settings.score_teacher_train_split,
        )

    @property
    def round_trip(self) -> RoundTripSettings:
        return RoundTripSettings(self.round_trip_candidates, self.round_trip_top_k)

    @property
    def negatives(self) -> NegativeSettings:
        return NegativeSettings(self.negatives_per_pair, self.negatives_relative_margin, self.negatives_max_similarity)

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_STUDENT

    @property
    def scorer_name(self) -> str:
        """The name stored with each score, known without loading the model."""
        return f"tiny-cross-encoder@{self.max_length}" if self.is_tiny else scorer_name(self.model, self.max_length)

    def open(self) -> QueryScorer:
        model = self.model
        if self.is_tiny:
            model = str(ensure_tiny_models(Path(self.models_dir), sample_texts())[CROSS_ENCODER_DIR])
        return open_scorer(model, max_length=self.max_length, batch_size=self.batch_size, name=self.scorer_name)


_ARROW_SCHEMA = RERANKER_SCORES.arrow_schema()


# A query and the document it is scored against: (doc_id, category, query).
Pair = tuple[str, str, str]


@dataclass
class ScoringTally:
    """What a run wrote and where its time went: the metadata and the check read it."""

    student_pairs: int = 0
    teacher_pairs: int = 0
    candidate_pairs: int = 0  # scored for the round trip alone: first-stage candidates other than the source
    student_round_trips: int = 0
    negatives: int = 0
    negatives_too_close: int = 0
    negatives_near_duplicate: int = 0
    out_of_range: int = 0
    model_load_seconds: float = 0.0
    score_seconds: float = 0.0
    score_cpu_seconds: float = 0.0
    lexical_seconds: float = 0.0


@dataclass(frozen=True)
class ScoringRun:
    """What every partition of one run shares."""

    scorer: QueryScorer
    connection: duckdb.DuckDBPyConnection
    teacher_name: str
    prompt_versions: dict[str, str]
    test_fraction: float
    teacher_train_split: bool
    round_trip: RoundTripSettings
    negatives: NegativeSettings
    indexes: ShardIndexes
    log: dg.DagsterLogManager
    tally: ScoringTally

    @property
    def teacher_source(self) -> str:
        return TEACHER_SOURCE_PREFIX + self.teacher_name

    def same_split(self, doc_id: str) -> Callable[[str], bool]:
        in_test = is_test_document(doc_id, self.test_fraction)
        return lambda candidate: is_test_document(candidate, self.test_fraction) == in_test


def _score_partition(run: ScoringRun, checkpoint: str, shard: str) -> None:
    texts = _shard_texts(run.connection, shard)
    student = _student_pairs(run.connection, checkpoint, shard)
    teacher = _teacher_pairs(run, shard, texts)
    by_source = {checkpoint: student} if student else {}
    if not student:
        # A small shard can have no test-split document; then generated_queries wrote nothing either.
        run.log.warning(f"{checkpoint}|{shard}: no generated queries to score")
    # The teacher's labels are scored once per shard and scorer, not per checkpoint; those of a shard without
    # test documents too, for the training pairs.
    if teacher and _stored_teacher_scores(run, shard) != len(teacher):
        by_source[run.teacher_source] = teacher
    if not by_source:
        return
    tables = _score_sources(run, shard, texts, by_source)
    # The writes need only the scored rows: the shard's documents go before them.
    del texts
    for source, table in tables.items():
        _write_scores(run, shard, source, table)
    scored_teacher = len(by_source.get(run.teacher_source, []))
    run.log.info(f"{checkpoint}|{shard}: {len(student)} student and {scored_teacher} teacher pairs scored")


def _shard_texts(connection: duckdb.DuckDBPyConnection, shard: str) -> dict[str, str]:
    return dict(connection.execute(f'SELECT doc_id, text FROM "{CORPUS.name}" WHERE shard = $1', [shard]).fetchall())


def _student_pairs(connection: duckdb.DuckDBPyConnection, checkpoint: str, shard: str) -> list[Pair]:
    return connection.execute(
        "SELECT doc_id, category, query FROM generated_queries WHERE checkpoint = $1 AND shard = $2 ORDER BY ALL",
        [checkpoint, shard],
    ).fetchall()


def _teacher_pairs(run: ScoringRun, shard: str, texts: dict[str, str]) -> list[Pair]:
    """The teacher's labels of the shard's documents (test split only unless QC_SCORE_TEACHER_TRAIN_SPLIT) under the
    prompt versions the settings label with: a key relabelled under a new prompt is scored once, for its current
    label."""
    in_split = "true" if run.teacher_train_split else split_is_test_sql("l.doc_id", run.test_fraction)
    labels = run.connection.execute(
        f"""SELECT l.doc_id, l.category, l.query, l.prompt_version FROM teacher_labels l
            WHERE l.shard = $1 AND l.teacher = $2 AND {in_split}
            ORDER BY ALL""",
        [shard, run.teacher_name],
    ).fetchall()
    return [
        (doc_id, category, query)
        for doc_id, category, query, version in labels
        if run.prompt_versions.get(category) == version and doc_id in texts
    ]


def _stored_teacher_scores(run: ScoringRun, shard: str) -> int:
    """The teacher's pairs already scored in this shard by this scorer with this round trip."""
    return fetch_row(
        run.connection.execute(
            "SELECT count(*) FROM reranker_scores WHERE shard = $1 AND source = $2 AND scorer = $3 "
            "AND round_trip_k = $4",
            [shard, run.teacher_source, run.scorer.name, run.round_trip.top_k],
        )
    )[0]


def _score_sources(
    run: ScoringRun, shard: str, texts: dict[str, str], by_source: dict[str, list[Pair]]
) -> dict[str, pa.Table]:
    index = run.indexes.get(shard, texts)
    return {source: _score_rows(run, index, texts, pairs, shard, source) for source, pairs in by_source.items()}


def _score_rows(
    run: ScoringRun, index: ShardIndex, texts: dict[str, str], pairs: list[Pair], shard: str, source: str
) -> pa.Table:
    """Each pair's score, round trip and copying; adds the time spent in BM25 and in the cross-encoder to the tally."""
    items = [(query, doc_id) for doc_id, _, query in pairs]
    started = time.perf_counter()
    lexical = lexical_checks(index, items, candidates=run.round_trip.candidates)
    run.tally.lexical_seconds += time.perf_counter() - started
    to_score = scored_pairs(items, lexical)
    run.tally.candidate_pairs += len(to_score) - len(set(items))
    started, cpu_started = time.perf_counter(), time.process_time()
    scored = dict(
        zip(to_score, run.scorer.score([(query, texts[doc_id]) for query, doc_id in to_score], log=run.log.info))
    )
    run.tally.score_seconds += time.perf_counter() - started
    run.tally.score_cpu_seconds += time.process_time() - cpu_started
    trips = round_trips(items, lexical, lambda query, doc_id: scored[query, doc_id], run.round_trip)
    bigrams = bigram_sets(texts)
    negatives = [
        mine(doc_id, trip.reranked, bigrams, run.negatives, run.same_split(doc_id)) if trip.passed else None
        for (_, doc_id), trip in zip(items, trips)
    ]
    _tally_negatives(run.tally, negatives)
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [
            {
                "doc_id": doc_id,
                "shard": shard,
                "category": category,
                "source": source,
                "scorer": run.scorer.name,
                "score": float(scored[query, doc_id]),
                "query": query,
                "bm25_overlap": float(check.overlap),
                "bm25_rank": int(check.rank),
                "rerank_rank": trip.rerank_rank,
                "round_trip": trip.passed,
                "round_trip_k": run.round_trip.top_k,
                "copy_share": copied.share,
                "copy_verbatim": copied.verbatim,
                **_negative_columns(mined),
                "created_at": now,
            }
            for (doc_id, category, query), check, trip, mined in zip(pairs, lexical, trips, negatives)
            for copied in [copying(query, texts[doc_id])]
        ],
        schema=_ARROW_SCHEMA,
    )


def _negative_columns(mined: Negatives | None) -> dict:
    if mined is None:
        return dict.fromkeys(
            ("negative_doc_ids", "negative_ranks", "negative_scores", "negatives_too_close", "negatives_near_duplicate")
        )
    return {
        "negative_doc_ids": list(mined.doc_ids),
        "negative_ranks": list(mined.ranks),
        "negative_scores": list(mined.scores),
        "negatives_too_close": mined.too_close,
        "negatives_near_duplicate": mined.near_duplicates,
    }


def _tally_negatives(tally: ScoringTally, negatives: list[Negatives | None]) -> None:
    for mined in negatives:
        if mined is not None:
            tally.negatives += len(mined.doc_ids)
            tally.negatives_too_close += mined.too_close
            tally.negatives_near_duplicate += mined.near_duplicates


def _write_scores(run: ScoringRun, shard: str, source: str, table: pa.Table) -> None:
    run.tally.out_of_range += sum(not (0.0 <= score <= 1.0) for score in table.column("score").to_pylist())
    partition = {"shard": shard, "source": source, "scorer": run.scorer.name}
    replace = partial(replace_partition_rows, table=RERANKER_SCORES, partition=partition, rows=table)
    count = run_transaction(run.connection, replace, f"write reranker scores {source}|{shard}")
    if source == run.teacher_source:
        run.tally.teacher_pairs += count
    else:
        run.tally.student_pairs += count
        run.tally.student_round_trips += sum(bool(passed) for passed in table.column("round_trip").to_pylist())


_CHECK_SPECS = [
    dg.AssetCheckSpec(
        "scores_in_range",
        asset=RERANKER_SCORES.name,
        blocking=True,
        description="Every score is a number in 0..1.",
    ),
]


def _results(tally: ScoringTally, indexes: ShardIndexes, scorer_name: str, tiny_scorer: bool, seconds: float):
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": tally.student_pairs,
            "scorer": scorer_name,
            "tiny_scorer": tiny_scorer,
            "student_pairs": tally.student_pairs,
            "teacher_pairs_rescored": tally.teacher_pairs,
            "round_trip_candidate_pairs": tally.candidate_pairs,
            "hard_negatives": tally.negatives,
            "negatives_dropped_too_close": tally.negatives_too_close,
            "negatives_dropped_near_duplicate": tally.negatives_near_duplicate,
            "student_round_trip_rate": round(tally.student_round_trips / max(tally.student_pairs, 1), 4),
            "seconds": round(seconds, 2),
            # Model compute: time inside the cross-encoder (sources and round-trip candidates), and loading it.
            "score_seconds": round(tally.score_seconds, 3),
            "score_cpu_seconds": round(tally.score_cpu_seconds, 3),
            "model_load_seconds": round(tally.model_load_seconds, 3),
            "bm25_index_seconds": round(indexes.seconds, 3),
            # Built here, mapped back from an earlier run's, or kept from this run's previous partition.
            "bm25_indexes_built": indexes.built,
            "bm25_indexes_loaded": indexes.loaded,
            "bm25_indexes_reused": indexes.reused,
            "bm25_check_seconds": round(tally.lexical_seconds, 3),
        }
    )
    yield dg.AssetCheckResult(
        check_name="scores_in_range", passed=tally.out_of_range == 0, metadata={"out_of_range": tally.out_of_range}
    )


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
        + " The teacher's labels of the shard (of every split unless QC_SCORE_TEACHER_TRAIN_SPLIT is false) are "
        "scored by the same scorer once per shard; hard negatives come from the source document's own split.",
        metadata={
            "dagster/column_schema": RERANKER_SCORES.dagster_schema(),
            "dagster/table_name": f"lake.{RERANKER_SCORES.name}",
        },
        check_specs=_CHECK_SPECS,
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
        scorer = scoring.open()
        tally = ScoringTally(model_load_seconds=time.perf_counter() - started)
        indexes = ShardIndexes(Path(scoring.indexes_dir))
        context.log.info(f"scoring with {scorer.name}")
        try:
            # One lake connection for the whole run: attaching the lake (loading DuckDB's extensions, reading the
            # catalog) costs about half a second of CPU, which a connection per read and per write paid 2-3 times a
            # partition.
            with lake.get_connection() as connection:
                run = ScoringRun(
                    scorer,
                    connection,
                    teacher_name,
                    prompt_versions,
                    sft.test_fraction,
                    scoring.score_teacher_train_split,
                    scoring.round_trip,
                    scoring.negatives,
                    indexes,
                    context.log,
                    tally,
                )
                # Shard by shard: each shard's index serves all of the run's checkpoints, one index in memory.
                keys = [checkpoint_and_shard(partitions_def, key) for key in context.partition_keys]
                for checkpoint, shard in sorted(keys, key=lambda key: (key[1], key[0])):
                    _score_partition(run, checkpoint, shard)
        finally:
            scorer.close()
        yield from _results(tally, indexes, scorer.name, scoring.is_tiny, time.perf_counter() - started)

    return reranker_scores
