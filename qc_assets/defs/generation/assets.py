"""The generated_queries asset: each checkpoint writes one query per test-split document and category."""

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import cast

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from qc_assets.categories import CATEGORIES, Category
from qc_assets.defs.generation.backends import (
    GeneratedQuery,
    GenerationRequest,
    GeneratorUnavailable,
    QueryGenerator,
    TokenCaps,
    open_generator,
)
from qc_assets.defs.sft.assets import SFT_DATASET, SftResource
from qc_assets.defs.sft.dataset import split_is_test_sql
from qc_assets.defs.student.store import Checkpoint, list_checkpoints
from qc_assets.execution import GPU_POD, GPU_POOL
from qc_assets.lake.resource import LakeResource, replace_partition_rows, run_transaction
from qc_assets.lake.tables import CORPUS, GENERATED_QUERIES
from qc_assets.partitions import CHECKPOINT_DIMENSION, SHARD_DIMENSION
from qc_assets.settings import Settings


class GenerationResource(dg.ConfigurableResource):
    """How checkpoints write queries (QC_GENERATION_*)."""

    backend: str = Field(description="QC_GENERATION_BACKEND: transformers, vllm or openai.")
    base_url: str | None = Field(description="QC_GENERATION_BASE_URL (openai backend).")
    batch_size: int = Field(description="QC_GENERATION_BATCH_SIZE")
    max_new_tokens: int | None = Field(description="QC_GENERATION_MAX_NEW_TOKENS; None: per category.")
    temperature: float = Field(description="QC_GENERATION_TEMPERATURE")
    max_empty_rate: float = Field(description="QC_GENERATION_MAX_EMPTY_RATE")
    checkpoints_root: str = Field(description="The checkpoint store, QC_DATA_DIR/checkpoints.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "GenerationResource":
        return cls(
            backend=settings.generation_backend,
            base_url=settings.generation_base_url,
            batch_size=settings.generation_batch_size,
            max_new_tokens=settings.generation_max_new_tokens,
            temperature=settings.generation_temperature,
            max_empty_rate=settings.generation_max_empty_rate,
            checkpoints_root=str(settings.data_root / "checkpoints"),
        )

    def token_caps(self) -> TokenCaps:
        if self.max_new_tokens is not None:
            return TokenCaps(self.max_new_tokens)
        by_category = {name: answer_token_cap(category) for name, category in CATEGORIES.items()}
        return TokenCaps(max(by_category.values()), by_category)


def answer_token_cap(category: Category) -> int:
    """Room for an answer at its category's character cap, however it tokenizes, and its end-of-turn token: a
    Japanese character is one token or less in the students' vocabularies, but a byte-level tokenizer can spend two
    on a rare one. Past that a student is rambling, so the cap only bounds what it costs."""
    return 2 * category.max_chars + 8


def evaluation_documents(
    connection: duckdb.DuckDBPyConnection, shard: str, test_fraction: float
) -> list[tuple[str, str]]:
    """The shard's test-split documents, by the same rule as the SFT split."""
    return connection.execute(
        f'SELECT doc_id, text FROM "{CORPUS.name}" WHERE shard = $1 AND {split_is_test_sql("doc_id", test_fraction)} '
        "ORDER BY doc_id",
        [shard],
    ).fetchall()


def find_checkpoint(root: Path, checkpoint: str, warn) -> Checkpoint:
    for candidate in list_checkpoints(root, warn=warn):
        if candidate.checkpoint == checkpoint:
            return candidate
    raise dg.Failure(description=f"checkpoint {checkpoint!r} is not in the store at {root} (removed, or incomplete)")


# The UI's kind badge per backend: which engine writes the queries.
BACKEND_KINDS = {"transformers": "huggingface", "vllm": "vllm", "openai": "openai"}


@dataclass
class GenerationTally:
    """What a run generated, counted per (checkpoint, category): the metadata and both checks read it."""

    queries: Counter = field(default_factory=Counter)
    empty: Counter = field(default_factory=Counter)
    valid: Counter = field(default_factory=Counter)
    documents: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    generate_seconds: float = 0.0
    generate_cpu_seconds: float = 0.0
    load_seconds: float = 0.0
    tiny: bool = False

    def add(self, checkpoint: str, category: str, query: str, input_tokens: int, output_tokens: int) -> None:
        key = (checkpoint, category)
        self.queries[key] += 1
        self.empty[key] += not query.strip()
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        try:
            CATEGORIES[category].validate(query)
            self.valid[key] += 1
        except ValueError:
            pass

    def empty_rates(self) -> dict[tuple[str, str], float]:
        return {key: self.empty[key] / count for key, count in self.queries.items()}

    def validity_by_category(self) -> dict[str, float]:
        rates = {}
        for name in CATEGORIES:
            total = sum(count for (_, category), count in self.queries.items() if category == name)
            valid = sum(count for (_, category), count in self.valid.items() if category == name)
            rates[name] = valid / total if total else 1.0
        return rates

    def empty_table(self) -> str:
        lines = ["| checkpoint | category | queries | empty | rate |", "|---|---|---|---|---|"]
        for (checkpoint, category), count in sorted(self.queries.items()):
            empty = self.empty[(checkpoint, category)]
            lines.append(f"| {checkpoint} | {category} | {count} | {empty} | {empty / count:.3f} |")
        return "\n".join(lines)

    def per_second(self, amount: int) -> float:
        return round(amount / self.generate_seconds, 2) if self.generate_seconds else 0.0


_ARROW_SCHEMA = GENERATED_QUERIES.arrow_schema()


@dataclass(frozen=True)
class GenerationRun:
    """What every checkpoint and shard of one run shares."""

    generation: GenerationResource
    connection: duckdb.DuckDBPyConnection
    test_fraction: float
    log: dg.DagsterLogManager
    tally: GenerationTally


def checkpoint_and_shard(partitions_def: dg.MultiPartitionsDefinition, key: str) -> tuple[str, str]:
    """The checkpoint and shard that a (checkpoint, shard) partition key names."""
    dimensions = partitions_def.get_partition_key_from_str(key).keys_by_dimension
    return dimensions[CHECKPOINT_DIMENSION], dimensions[SHARD_DIMENSION]


def _shards_by_checkpoint(
    partition_keys: list[str], partitions_def: dg.MultiPartitionsDefinition
) -> dict[str, list[str]]:
    by_checkpoint: dict[str, list[str]] = defaultdict(list)
    for key in partition_keys:
        checkpoint, shard = checkpoint_and_shard(partitions_def, key)
        by_checkpoint[checkpoint].append(shard)
    return by_checkpoint


def _open_generator(generation: GenerationResource, found: Checkpoint, tally: GenerationTally) -> QueryGenerator:
    started = time.perf_counter()
    try:
        generator = open_generator(
            generation.backend,
            str(found.path),
            batch_size=generation.batch_size,
            max_new_tokens=generation.token_caps(),
            temperature=generation.temperature,
            base_url=generation.base_url,
            model_name=found.checkpoint,
        )
    except GeneratorUnavailable as error:
        raise dg.Failure(description=f"QC_GENERATION_BACKEND={generation.backend}: {error}") from None
    tally.load_seconds += time.perf_counter() - started
    return generator


def _generate_checkpoint(run: GenerationRun, checkpoint: str, shards: list[str]) -> None:
    found = find_checkpoint(Path(run.generation.checkpoints_root), checkpoint, run.log.warning)
    run.tally.tiny = run.tally.tiny or bool(found.manifest.get("tiny_model"))
    run.log.info(
        f"{checkpoint}: generating for the test documents of {len(shards)} shards with {run.generation.backend}"
    )
    generator = _open_generator(run.generation, found, run.tally)
    try:
        # One shard at a time: the checkpoint is loaded once, and what is held in memory is one shard's requests and
        # answers, however many shards the run covers.
        for shard in shards:
            _generate_shard(run, generator, checkpoint, shard)
    finally:
        generator.close()


def _generate_shard(run: GenerationRun, generator: QueryGenerator, checkpoint: str, shard: str) -> None:
    documents = evaluation_documents(run.connection, shard, run.test_fraction)
    requests = [
        GenerationRequest(key=(doc_id, name), category=name, text=text)
        for doc_id, text in documents
        for name in CATEGORIES
    ]
    run.log.info(f"{checkpoint}|{shard}: {len(requests)} queries for {len(documents)} test documents")
    started, cpu_started = time.perf_counter(), time.process_time()
    results = generator.generate(requests, log=run.log.info)
    run.tally.generate_seconds += time.perf_counter() - started
    run.tally.generate_cpu_seconds += time.process_time() - cpu_started
    rows = _query_rows(results, checkpoint, shard, generator.name)
    for row in rows:
        run.tally.add(checkpoint, row["category"], row["query"], row["input_tokens"], row["output_tokens"])
    _write_queries(run.connection, pa.Table.from_pylist(rows, schema=_ARROW_SCHEMA), checkpoint, shard)
    run.tally.documents += len(documents)


def _query_rows(results: list[GeneratedQuery], checkpoint: str, shard: str, backend: str) -> list[dict]:
    now = datetime.now(UTC)
    rows = []
    for result in results:
        # The key _generate_shard gave the request.
        doc_id, category = cast(tuple[str, str], result.key)
        rows.append(
            {
                "doc_id": doc_id,
                "shard": shard,
                "category": category,
                "checkpoint": checkpoint,
                "query": result.query,
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "backend": backend,
                "created_at": now,
            }
        )
    return rows


def _write_queries(connection: duckdb.DuckDBPyConnection, table: pa.Table, checkpoint: str, shard: str) -> None:
    partition = {"checkpoint": checkpoint, "shard": shard}
    replace = partial(replace_partition_rows, table=GENERATED_QUERIES, partition=partition, rows=table)
    run_transaction(connection, replace, f"write generated queries {checkpoint}|{shard}")


_CHECK_SPECS = [
    dg.AssetCheckSpec(
        "empty_queries",
        asset=GENERATED_QUERIES.name,
        blocking=True,
        description="Share of empty queries per checkpoint and category is at most QC_GENERATION_MAX_EMPTY_RATE.",
    ),
    dg.AssetCheckSpec(
        "category_validity",
        asset=GENERATED_QUERIES.name,
        description="Share of queries that pass their category's validator (warns below 50%).",
    ),
]


def _results(tally: GenerationTally, generation: GenerationResource, checkpoints: int, partitions: int, seconds: float):
    yield _materialization(tally, generation, checkpoints, partitions, seconds)
    yield _empty_queries_check(tally, generation)
    yield _category_validity_check(tally)


def _materialization(
    tally: GenerationTally, generation: GenerationResource, checkpoints: int, partitions: int, seconds: float
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(tally.queries.values()),
            "checkpoints": checkpoints,
            "partitions": partitions,
            "documents": tally.documents,
            "input_tokens": tally.input_tokens,
            "output_tokens": tally.output_tokens,
            "input_tokens_per_second": tally.per_second(tally.input_tokens),
            "output_tokens_per_second": tally.per_second(tally.output_tokens),
            "documents_per_second": tally.per_second(tally.documents),
            "empty_queries": sum(tally.empty.values()),
            "empty_by_checkpoint_and_category": dg.MetadataValue.md(tally.empty_table()),
            "backend": generation.backend,
            # Model compute: time inside the generator (prompts, generate, decoding), and loading checkpoints.
            "generate_seconds": round(tally.generate_seconds, 3),
            "generate_cpu_seconds": round(tally.generate_cpu_seconds, 3),
            "model_load_seconds": round(tally.load_seconds, 3),
            "seconds": round(seconds, 2),
        }
    )


def _empty_queries_check(tally: GenerationTally, generation: GenerationResource) -> dg.AssetCheckResult:
    rates = tally.empty_rates()
    worst = max(rates, key=rates.__getitem__) if rates else None
    # A tiny random-weight student often answers with nothing at all; that is expected of it, so for tiny
    # checkpoints the blocking check only warns.
    return dg.AssetCheckResult(
        check_name="empty_queries",
        passed=worst is None or rates[worst] <= generation.max_empty_rate,
        severity=dg.AssetCheckSeverity.WARN if tally.tiny else dg.AssetCheckSeverity.ERROR,
        description=f"highest empty rate {rates[worst]:.3f} ({worst[0]}, {worst[1]}); the limit is "
        f"QC_GENERATION_MAX_EMPTY_RATE={generation.max_empty_rate:g}"
        if worst
        else "nothing generated",
        metadata={
            "empty_queries": sum(tally.empty.values()),
            "highest_empty_rate": rates[worst] if worst else 0.0,
            "max_empty_rate": generation.max_empty_rate,
            "tiny_model": tally.tiny,
        },
    )


def _category_validity_check(tally: GenerationTally) -> dg.AssetCheckResult:
    validity = tally.validity_by_category()
    return dg.AssetCheckResult(
        check_name="category_validity",
        passed=min(validity.values()) >= 0.5,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={f"valid_{name}": round(rate, 3) for name, rate in validity.items()},
    )


def build_generation_asset(partitions_def: dg.MultiPartitionsDefinition, backend: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=GENERATED_QUERIES.name,
        partitions_def=partitions_def,
        deps=[
            dg.AssetDep(CORPUS.name, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(SHARD_DIMENSION)),
            dg.AssetDep(SFT_DATASET),
            # Which checkpoint a partition uses is its own key; the dependency orders training before generation.
            dg.AssetDep("student_checkpoints", partition_mapping=dg.AllPartitionMapping()),
        ],
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="generation",
        # A served model (`openai` backend) does its own GPU work: the step that calls it needs none.
        op_tags={} if backend == "openai" else GPU_POD,
        pool=None if backend == "openai" else GPU_POOL,
        kinds={BACKEND_KINDS[backend], "duckdb"},
        description=GENERATED_QUERIES.description
        + " A run of many partitions loads each checkpoint once and generates for all its shards in large batches.",
        metadata={
            "dagster/column_schema": GENERATED_QUERIES.dagster_schema(),
            "dagster/table_name": f"lake.{GENERATED_QUERIES.name}",
        },
        check_specs=_CHECK_SPECS,
    )
    def generated_queries(
        context: dg.AssetExecutionContext, generation: GenerationResource, sft: SftResource, lake: LakeResource
    ):
        by_checkpoint = _shards_by_checkpoint(context.partition_keys, partitions_def)
        tally = GenerationTally()
        started = time.perf_counter()
        # One lake connection for the whole run: attaching the lake (loading DuckDB's extensions, reading the
        # catalog) costs about half a second of CPU, which a connection per read and per write paid twice a shard.
        with lake.get_connection() as connection:
            run = GenerationRun(generation, connection, sft.test_fraction, context.log, tally)
            for checkpoint, shards in by_checkpoint.items():
                _generate_checkpoint(run, checkpoint, shards)
        yield from _results(
            tally, generation, len(by_checkpoint), len(context.partition_keys), time.perf_counter() - started
        )

    return generated_queries
