"""The generated_queries asset: each checkpoint writes one query per test-split document and category."""


import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from qc_assets.categories import CATEGORIES
from qc_assets.defs.generation.backends import GenerationRequest, GeneratorUnavailable, open_generator
from qc_assets.defs.sft.assets import SFT_DATASET, SftResource
from qc_assets.defs.sft.dataset import split_is_test_sql
from qc_assets.defs.student.store import Checkpoint, list_checkpoints
from qc_assets.deploy import GPU_POD, GPU_POOL
from qc_assets.lake.resource import LakeResource, replace_partition, run_transaction
from qc_assets.lake.tables import CORPUS, GENERATED_QUERIES
from qc_assets.settings import Settings

CHECKPOINT_DIMENSION = "checkpoint"
SHARD_DIMENSION = "shard"


class GenerationResource(dg.ConfigurableResource):
    """How checkpoints write queries (QC_GENERATION_*)."""

    backend: str = Field(default="transformers", description="QC_GENERATION_BACKEND: transformers, vllm or openai.")
    base_url: str | None = Field(default=None, description="QC_GENERATION_BASE_URL (openai backend).")
    batch_size: int = Field(default=64, description="QC_GENERATION_BATCH_SIZE")
    max_new_tokens: int = Field(default=64, description="QC_GENERATION_MAX_NEW_TOKENS")
    temperature: float = Field(default=0.0, description="QC_GENERATION_TEMPERATURE")
    checkpoints_root: str = Field(description="The checkpoint store, QC_DATA_DIR/checkpoints.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "GenerationResource":
        return cls(
            backend=settings.generation_backend,
            base_url=settings.generation_base_url,
            batch_size=settings.generation_batch_size,
            max_new_tokens=settings.generation_max_new_tokens,
            temperature=settings.generation_temperature,
            checkpoints_root=str(settings.data_root / "checkpoints"),
        )


def evaluation_documents(connection: duckdb.DuckDBPyConnection, shard: str, test_fraction: float) -> list[tuple[str, str]]:
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
        metadata={"dagster/column_schema": GENERATED_QUERIES.dagster_schema(), "dagster/table_name": f"lake.{GENERATED_QUERIES.name}"},
        check_specs=[
            dg.AssetCheckSpec("no_empty_queries", asset=GENERATED_QUERIES.name, blocking=True,
                              description="Every generated query has text."),
            dg.AssetCheckSpec("category_validity", asset=GENERATED_QUERIES.name,
                              description="Share of queries that pass their category's validator (warns below 50%)."),
        ],
    )
    def generated_queries(
        context: dg.AssetExecutionContext, generation: GenerationResource, sft: SftResource, lake: LakeResource
    ):
        by_checkpoint: dict[str, list[str]] = defaultdict(list)
        for key in context.partition_keys:
            dimensions = partitions_def.get_partition_key_from_str(key).keys_by_dimension
            by_checkpoint[dimensions[CHECKPOINT_DIMENSION]].append(dimensions[SHARD_DIMENSION])
        totals = {"documents": 0, "queries": 0, "input_tokens": 0, "output_tokens": 0, "empty": 0}
        validity: dict[str, list[int]] = {name: [0, 0] for name in CATEGORIES}
        started = time.perf_counter()
        generate_seconds = generate_cpu_seconds = 0.0
        tiny = False
        load_seconds = 0.0
        # One lake connection for the whole run: attaching the lake (loading DuckDB's extensions, reading the
        # catalog) costs about half a second of CPU, which a connection per read and per write paid twice a shard.
        with lake.get_connection() as connection:
            for checkpoint, shards in by_checkpoint.items():
                found = find_checkpoint(Path(generation.checkpoints_root), checkpoint, context.log.warning)
                path = found.path
                tiny = tiny or bool(found.manifest.get("tiny_model"))
                context.log.info(f"{checkpoint}: generating for the test documents of {len(shards)} shards with {generation.backend}")
                load_started = time.perf_counter()
                try:
                    generator = open_generator(
                        generation.backend, str(path), batch_size=generation.batch_size,
                        max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                        base_url=generation.base_url, model_name=checkpoint,
                    )
                except GeneratorUnavailable as error:
                    raise dg.Failure(description=f"QC_GENERATION_BACKEND={generation.backend}: {error}") from None
                load_seconds += time.perf_counter() - load_started
                try:
                    # One shard at a time: the checkpoint is loaded once, and what is held in memory is one shard's
                    # requests and answers, however many shards the run covers.
                    for shard in shards:
                        documents = evaluation_documents(connection, shard, sft.test_fraction)
                        requests = [
                            GenerationRequest(key=(doc_id, name), category=name, text=text)
                            for doc_id, text in documents
                            for name in CATEGORIES
                        ]
                        del documents
                        context.log.info(f"{checkpoint}|{shard}: {len(requests)} queries for {len(requests) // len(CATEGORIES)} test documents")
                        generate_started, generate_cpu_started = time.perf_counter(), time.process_time()
                        results = generator.generate(requests, log=context.log.info)
                        generate_seconds += time.perf_counter() - generate_started
                        generate_cpu_seconds += time.process_time() - generate_cpu_started
                        del requests
                        now = datetime.now(timezone.utc)
                        rows = []
                        for result in results:
                            doc_id, name = result.key
                            rows.append({
                                "doc_id": doc_id, "shard": shard, "category": name, "checkpoint": checkpoint,
                                "query": result.query, "input_tokens": result.input_tokens,
                                "output_tokens": result.output_tokens, "backend": generation.backend, "created_at": now,
                            })
                            totals["input_tokens"] += result.input_tokens
                            totals["output_tokens"] += result.output_tokens
                            totals["empty"] += not result.query.strip()
                            try:
                                CATEGORIES[name].validate(result.query)
                                validity[name][0] += 1
                            except ValueError:
                                pass
                            validity[name][1] += 1
                        table = pa.Table.from_pylist(rows, schema=_ARROW_SCHEMA)
                        del rows

                        def write(connection, table=table, shard=shard):
                            connection.register("generated_rows", table)
                            count = replace_partition(
                                connection, GENERATED_QUERIES, {"checkpoint": checkpoint, "shard": shard}, "generated_rows"
                            )
                            # The connection outlives this write: it should not hold on to the rows.
                            connection.unregister("generated_rows")
                            return count

                        run_transaction(connection, write, f"write generated queries {checkpoint}|{shard}")
                        totals["documents"] += len(results) // len(CATEGORIES)
                        totals["queries"] += len(results)
                        del results, table
                finally:
                    generator.close()
        elapsed = time.perf_counter() - started
        rates = {name: (valid / total if total else 1.0) for name, (valid, total) in validity.items()}
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": totals["queries"],
                "checkpoints": len(by_checkpoint),
                "partitions": len(context.partition_keys),
                "documents": totals["documents"],
                "input_tokens": totals["input_tokens"],
                "output_tokens": totals["output_tokens"],
                "input_tokens_per_second": round(totals["input_tokens"] / generate_seconds, 1) if generate_seconds else 0.0,
                "output_tokens_per_second": round(totals["output_tokens"] / generate_seconds, 1) if generate_seconds else 0.0,
                "documents_per_second": round(totals["documents"] / generate_seconds, 2) if generate_seconds else 0.0,
                "backend": generation.backend,
                # Model compute: time inside the generator (prompts, generate, decoding), and loading checkpoints.
                "generate_seconds": round(generate_seconds, 3),
                "generate_cpu_seconds": round(generate_cpu_seconds, 3),
                "model_load_seconds": round(load_seconds, 3),
                "seconds": round(elapsed, 2),
            }
        )
        # A tiny random-weight student often answers with nothing at all; that is expected of it, so for tiny
        # checkpoints the blocking check only warns.
        yield dg.AssetCheckResult(
            check_name="no_empty_queries",
            passed=totals["empty"] == 0,
            severity=dg.AssetCheckSeverity.WARN if tiny else dg.AssetCheckSeverity.ERROR,
            metadata={"empty_queries": totals["empty"], "tiny_model": tiny},
        )
        yield dg.AssetCheckResult(
            check_name="category_validity",
            passed=min(rates.values()) >= 0.5,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={f"valid_{name}": round(rate, 3) for name, rate in rates.items()},
        )

    return generated_queries


_ARROW_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("shard", pa.string()), ("category", pa.string()), ("checkpoint", pa.string()),
    ("query", pa.string()), ("input_tokens", pa.int32()), ("output_tokens", pa.int32()), ("backend", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
