"""Corpus ingest speed: the corpus asset against a plain DuckDB copy of the same file into the same lake.

Generates one shard in fineweb-2-edu-japanese's 13-column schema, then in one process
  1. reference: INSERT INTO a lake table SELECT * FROM read_parquet(shard), plain DuckDB;
  2. the corpus asset materialized for that shard (read, clean, dedup against the lake, replace partition).
Prints documents per second for both and their ratio; writes bench/results/corpus_ingest.json (or --json PATH).

    .venv/bin/python bench/corpus_ingest.py            # 100,000 documents of about 1,000 characters
    .venv/bin/python bench/corpus_ingest.py --rows 10000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import dagster as dg

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.definitions import build_definitions
from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.lake.resource import LakeResource, sql_literal
from qc_assets.settings import load_settings


def plain_copy_seconds(lake: LakeResource, shard: Path) -> float:
    with lake.get_connection() as connection:
        started = time.perf_counter()
        connection.execute(f"CREATE TABLE plain_copy AS SELECT * FROM read_parquet({sql_literal(str(shard))})")
        return time.perf_counter() - started


def asset_seconds(settings, partition: str) -> tuple[float, dict]:
    corpus = dg.AssetKey("corpus")
    job = build_definitions(settings).get_repository_def().get_implicit_job_def_for_assets([corpus])
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        result = job.execute_in_process(partition_key=partition, instance=instance, asset_selection=[corpus])
        elapsed = time.perf_counter() - started
    (event,) = result.asset_materializations_for_node("corpus")
    return elapsed, {key: value.value for key, value in event.metadata.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chars", type=int, default=1_000, help="Mean characters per document.")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "corpus_ingest.json", help="Where the results go.")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qc-bench-") as scratch:
        root = Path(scratch)
        shard = write_fineweb_shard(root / "source" / "train-00000-of-00001.parquet", arguments.rows, arguments.chars)
        settings = load_settings(
            {"QC_DATA_DIR": str(root / "data"), "QC_CORPUS_SOURCE": str(shard.parent), "QC_CORPUS_MAX_CHARS": "100000"}
        )
        lake = LakeResource(catalog=settings.catalog, data_path=settings.data_path)
        copy_s = plain_copy_seconds(lake, shard)
        ingest_s, metadata = asset_seconds(settings, shard.stem)

    rows = metadata["dagster/row_count"]
    figures = {
        "documents": arguments.rows,
        "documents_kept": rows,
        "mean_chars": metadata["n_chars_mean"],
        "plain_copy_seconds": round(copy_s, 3),
        "plain_copy_documents_per_second": round(arguments.rows / copy_s),
        "asset_run_seconds": round(ingest_s, 3),
        "asset_documents_per_second": round(arguments.rows / ingest_s),
        "asset_step_documents_per_second": metadata["documents_per_second"],
        "ratio_asset_to_plain_copy_time": round(ingest_s / copy_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    asset_rate, copy_rate = figures["asset_documents_per_second"], figures["plain_copy_documents_per_second"]
    figures["figures"] = [
        figure(
            f"corpus asset, whole Dagster run, {arguments.rows:,} documents",
            asset_rate,
            "docs/s",
            "plain DuckDB copy into the lake",
            copy_rate,
            asset_rate / copy_rate,
            "≥ 100,000 docs/s or ≥ 0.5 of the copy",
            asset_rate >= 100_000 or asset_rate >= 0.5 * copy_rate,
        ),
        figure("corpus asset, peak memory (process)", figures["peak_rss_mib"], "MiB"),
    ]
    write_results(arguments.json, figures)
    print(f"corpus ingest, {arguments.rows:,} documents of ~{metadata['n_chars_mean']:.0f} characters")
    print(
        f"  plain DuckDB copy into the lake : {copy_s:7.2f} s  {figures['plain_copy_documents_per_second']:>9,} docs/s  (reference)"
    )
    print(f"  corpus asset (whole Dagster run): {ingest_s:7.2f} s  {figures['asset_documents_per_second']:>9,} docs/s")
    print(
        f"  ratio to the plain copy (time)  : {figures['ratio_asset_to_plain_copy_time']:.2f}x   goal: >= 100,000 docs/s or <= 2x"
    )
    print(f"  peak RSS {figures['peak_rss_mib']} MiB; written to {arguments.json}")


if __name__ == "__main__":
    main()
