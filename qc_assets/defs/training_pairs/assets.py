"""The training_pairs asset: per source, the pairs that pass the round trip with their hard negatives, as a
versioned dataset sentence-transformers' trainers read directly (see export.py), and its counts in the lake."""

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from qc_assets.defs.scoring.assets import ScoringResource
from qc_assets.defs.sft.assets import SftResource
from qc_assets.defs.sft.dataset import SPLITS
from qc_assets.defs.teacher.assets import TeacherResource
from qc_assets.defs.training_pairs.card import Origin
from qc_assets.defs.training_pairs.export import PairSelection, PairsExport, export_source, verify
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import RERANKER_SCORES, TEACHER_SOURCE_PREFIX, TRAINING_PAIRS
from qc_assets.settings import Settings, env_name


class TrainingPairsResource(dg.ConfigurableResource):
    """Where the training pairs go (QC_DATA_DIR/training_pairs) and where they are pushed."""

    root: str = Field(description="One folder per source, its versions in it.")
    hub_repo: str | None = Field(description="QC_TRAINING_PAIRS_HUB_REPO: push each new version, a config per source.")
    hf_token: str | None = Field(description="QC_HF_TOKEN, as an EnvVar.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainingPairsResource":
        return cls(
            root=str(settings.data_root / "training_pairs"),
            hub_repo=settings.training_pairs_hub_repo,
            hf_token=dg.EnvVar(env_name("hf_token")) if settings.hf_token else None,
        )


def _sources(connection: duckdb.DuckDBPyConnection, selection: PairSelection) -> list[str]:
    return [
        source
        for (source,) in connection.execute(
            "SELECT DISTINCT source FROM reranker_scores WHERE scorer = $scorer AND round_trip_k = $k ORDER BY 1",
            selection.parameters,
        ).fetchall()
    ]


def _origin(
    connection: duckdb.DuckDBPyConnection, source: str, scoring: ScoringResource, prompt_versions: dict[str, str]
) -> Origin:
    corpus_sources = connection.execute(
        "SELECT DISTINCT c.source FROM corpus c WHERE c.shard IN "
        "(SELECT DISTINCT shard FROM reranker_scores WHERE source = $1) ORDER BY 1",
        [source],
    ).fetchall()
    filters = {
        "QC_ROUND_TRIP_CANDIDATES": scoring.round_trip_candidates,
        "QC_NEGATIVES_RELATIVE_MARGIN": scoring.negatives_relative_margin,
        "QC_NEGATIVES_MAX_SIMILARITY": scoring.negatives_max_similarity,
    }
    if source.startswith(TEACHER_SOURCE_PREFIX):
        versions = ", ".join(f"{category} `{version}`" for category, version in prompt_versions.items())
        queries_by = f"teacher `{source.removeprefix(TEACHER_SOURCE_PREFIX)}` (current prompt versions: {versions})"
        tiny_student = False
    else:
        checkpoint = connection.execute(
            "SELECT base_model, dataset_version, coalesce(tiny_model, false) FROM checkpoints WHERE checkpoint = $1",
            [source],
        ).fetchone()
        base_model, dataset_version, tiny_student = checkpoint or ("unknown", "unknown", False)
        queries_by = f"checkpoint `{source}` (base model `{base_model}`, SFT dataset {dataset_version})"
    return Origin(queries_by, filters, tuple(row[0] for row in corpus_sources), scoring.is_tiny or tiny_student)


def _record(connection: duckdb.DuckDBPyConnection, exports: list[PairsExport], scorer: str) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "source": export.source,
            "scorer": scorer,
            "version": export.version,
            "split": split,
            "category": category,
            "scored": scored,
            "passed_round_trip": export.counts.passed[split].get(category, 0),
            "exported": export.counts.kept[split].get(category, 0),
            "path": str(export.directory),
            "created_at": now,
        }
        for export in exports
        for split in SPLITS
        for category, scored in export.counts.scored[split].items()
    ]
    connection.register("incoming_training_pairs", pa.Table.from_pylist(rows, schema=TRAINING_PAIRS.arrow_schema()))
    columns = ", ".join(TRAINING_PAIRS.column_names)
    connection.execute(f'DELETE FROM "{TRAINING_PAIRS.name}"')
    connection.execute(f'INSERT INTO "{TRAINING_PAIRS.name}" ({columns}) SELECT {columns} FROM incoming_training_pairs')
    connection.unregister("incoming_training_pairs")


def _push(context: dg.AssetExecutionContext, resource: TrainingPairsResource, export: PairsExport) -> None:
    if not resource.hf_token:
        raise dg.Failure(description="QC_TRAINING_PAIRS_HUB_REPO is set but QC_HF_TOKEN is not")
    import datasets

    config = export.directory.parent.name
    context.log.info(f"pushing {export.source} {export.version} to {resource.hub_repo} as config {config}")
    datasets.load_from_disk(str(export.hf_dir)).push_to_hub(
        resource.hub_repo, config_name=config, token=resource.hf_token
    )


def _table(exports: list[PairsExport]) -> str:
    lines = ["| source | version | scored | passed | train rows | test rows |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {e.source} | {e.version} | {e.counts.total('scored')} | {e.counts.total('passed')} | "
        f"{e.counts.rows('train')} | {e.counts.rows('test')} |"
        for e in exports
    ]
    return "\n".join(lines)


CHECK = "negatives_are_negative"


@dg.asset(
    name=TRAINING_PAIRS.name,
    deps=[dg.AssetDep(RERANKER_SCORES.name, partition_mapping=dg.AllPartitionMapping())],
    group_name="training_pairs",
    kinds={"huggingface", "parquet", "duckdb"},
    description=TRAINING_PAIRS.description
    + " The datasets go under QC_DATA_DIR/training_pairs/<source>/<version>, with a dataset card.",
    metadata={
        "dagster/column_schema": TRAINING_PAIRS.dagster_schema(),
        "dagster/table_name": f"lake.{TRAINING_PAIRS.name}",
    },
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset=TRAINING_PAIRS.name,
            description="Read back from the written files: no negative is its row's positive (by document or by "
            "text), and no document is in both splits.",
        )
    ],
)
def training_pairs(
    context: dg.AssetExecutionContext,
    training: TrainingPairsResource,
    scoring: ScoringResource,
    sft: SftResource,
    teacher: TeacherResource,
    lake: LakeResource,
):
    selection = PairSelection(
        scoring.scorer_name, scoring.round_trip_top_k, scoring.negatives_per_pair, sft.test_fraction
    )
    _, prompt_versions = teacher.identity()
    root = Path(training.root)
    with lake.get_connection() as connection:
        # One snapshot of the lake for the counts, the versions and the rows.
        connection.execute("BEGIN TRANSACTION")
        try:
            exports = [
                export_source(
                    connection, root, source, selection, _origin(connection, source, scoring, prompt_versions)
                )
                for source in _sources(connection, selection)
            ]
        finally:
            connection.execute("ROLLBACK")
    if not exports:
        raise dg.Failure(
            description=f"no scored pairs under scorer {selection.scorer} with QC_ROUND_TRIP_TOP_K "
            f"{selection.round_trip_k}: materialize reranker_scores first"
        )
    for export in exports:
        context.log.info(
            f"{export.source}: {export.counts.rows('train')} train and {export.counts.rows('test')} test rows of "
            f"{export.counts.total('passed')} pairs that passed the round trip ({export.version}, "
            f"{'written' if export.created else 'unchanged'} at {export.directory})"
        )
        if training.hub_repo and export.created:
            _push(context, training, export)
    lake.transaction(lambda connection: _record(connection, exports, selection.scorer), "record training_pairs")
    problems = {export.source: verify(export.directory, selection) for export in exports}
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(export.rows for export in exports),
            "sources": dg.MetadataValue.md(_table(exports)),
            "negatives_per_row": selection.negatives,
            "scorer": selection.scorer,
            "new_versions": sum(export.created for export in exports),
            "path": dg.MetadataValue.path(str(root)),
        }
    )
    yield dg.AssetCheckResult(
        check_name=CHECK,
        passed=not any(sum(found.values()) for found in problems.values()),
        metadata={"problems": dg.MetadataValue.json(problems)},
    )
