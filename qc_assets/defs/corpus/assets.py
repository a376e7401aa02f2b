"""The raw corpus asset: one partition per source shard, cleaned and written to the lake's `corpus` table."""

import time
from pathlib import Path

import dagster as dg
import duckdb
from pydantic import Field

from qc_assets.defs.corpus.cleaning import (
    STAGED,
    LengthWindow,
    StagedSummary,
    resolve_against_lake,
    stage_shard,
    summarize_staged,
)
from qc_assets.defs.corpus.sources import (
    BAD_ROWS_SHOWN,
    HF_PREFIX,
    CorpusSource,
    Shard,
    ShardReadError,
    open_corpus_source,
)
from qc_assets.lake.resource import LakeResource, replace_partition
from qc_assets.lake.tables import CORPUS
from qc_assets.settings import Settings


class CorpusResource(dg.ConfigurableResource):
    """Where the raw documents come from and which of them are kept (QC_CORPUS_*)."""

    source: str = Field(
        description="Local directory/glob/file of parquet or jsonl, or hf:<dataset> (QC_CORPUS_SOURCE)."
    )
    hf_config: str | None = Field(description="Hugging Face dataset config (QC_CORPUS_CONFIG).")
    hf_split: str = Field(description="Hugging Face dataset split (QC_CORPUS_SPLIT).")
    text_column: str = Field(description="QC_CORPUS_TEXT_COLUMN")
    id_column: str = Field(description="QC_CORPUS_ID_COLUMN")
    min_chars: int = Field(description="QC_CORPUS_MIN_CHARS")
    max_chars: int = Field(description="QC_CORPUS_MAX_CHARS")
    listing_cache_dir: str = Field(description="Where a Hugging Face file listing is cached, under QC_DATA_DIR.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "CorpusResource":
        return cls(
            source=settings.corpus_source,
            hf_config=settings.corpus_config,
            hf_split=settings.corpus_split,
            text_column=settings.corpus_text_column,
            id_column=settings.corpus_id_column,
            min_chars=settings.corpus_min_chars,
            max_chars=settings.corpus_max_chars,
            listing_cache_dir=str(settings.data_root / "sources"),
        )

    def open(self) -> CorpusSource:
        return open_corpus_source(
            self.source, self.hf_config, self.hf_split, self.text_column, self.id_column, Path(self.listing_cache_dir)
        )

    @property
    def window(self) -> LengthWindow:
        return LengthWindow(self.min_chars, self.max_chars)


def _bad_rows_text(shard: Shard, bad_rows: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"row {row}: {problem}" for row, problem in bad_rows[:BAD_ROWS_SHOWN])
    more = f"; and {len(bad_rows) - BAD_ROWS_SHOWN} more" if len(bad_rows) > BAD_ROWS_SHOWN else ""
    return f"{shard.location}: {len(bad_rows)} unreadable rows skipped ({shown}{more})"


def build_corpus_asset(shards: list[Shard], partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    by_key = {shard.key: shard for shard in shards}

    @dg.asset(
        name=CORPUS.name,
        partitions_def=partitions_def,
        group_name="corpus",
        kinds={"duckdb", "parquet"},
        description=CORPUS.description,
        metadata={"dagster/column_schema": CORPUS.dagster_schema(), "dagster/table_name": f"lake.{CORPUS.name}"},
    )
    def corpus(
        context: dg.AssetExecutionContext, corpus_source: CorpusResource, lake: LakeResource
    ) -> dg.MaterializeResult:
        shard = by_key[context.partition_key]
        started = time.perf_counter()
        context.log.info(f"reading shard {shard.key} from {shard.location}")
        try:
            rows = corpus_source.open().read(shard)
        except ShardReadError as error:
            raise dg.Failure(description=f"shard {shard.key}: {error}") from error
        read_s = time.perf_counter() - started
        context.log.info(f"read {rows.num_rows} rows in {read_s:.2f}s")
        if rows.bad_rows:
            context.log.warning(_bad_rows_text(shard, rows.bad_rows))

        def write(connection) -> tuple[int, int, StagedSummary]:
            stage_shard(connection, rows.relation(connection), shard.key, shard.location, corpus_source.window)
            removed_later = resolve_against_lake(connection, shard.key)
            written = replace_partition(
                connection, CORPUS, {"shard": shard.key}, f"(SELECT * FROM {STAGED} WHERE status = 'ok')"
            )
            return written, removed_later, summarize_staged(connection)

        try:
            written, removed_later, summary = lake.transaction(write, f"write corpus shard {shard.key}")
        except duckdb.Error as error:
            raise dg.Failure(description=f"shard {shard.key}: {shard.location}: {error}") from error
        elapsed = time.perf_counter() - started
        drops = {reason: count for reason, count in summary.status_counts.items() if reason != "ok"}
        dropped = ", ".join(f"{reason} {count}" for reason, count in drops.items() if count) or "none"
        context.log.info(
            f"shard {shard.key}: kept {written} of {rows.num_rows + len(rows.bad_rows)} rows "
            f"in {elapsed:.2f}s; dropped: {dropped}"
        )
        if removed_later:
            context.log.warning(f"removed {removed_later} rows of later shards that duplicate this shard's documents")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": written,
                "source": shard.location
                if shard.location.startswith(HF_PREFIX)
                else dg.MetadataValue.path(shard.location),
                "rows_read": rows.num_rows + len(rows.bad_rows),
                "rows_unreadable": len(rows.bad_rows),
                **{f"dropped_{reason}": count for reason, count in drops.items()},
                "rows_with_control_chars_removed": summary.control_character_rows,
                "later_shard_rows_removed": removed_later,
                "n_chars_min": summary.n_chars_min,
                "n_chars_mean": summary.n_chars_mean,
                "n_chars_max": summary.n_chars_max,
                "documents_per_second": round(written / elapsed, 1) if elapsed else 0.0,
                "seconds": round(elapsed, 3),
            }
        )

    return corpus
