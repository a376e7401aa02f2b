"""The whole graph on the lake's scale-out storage next to the one-machine default: `qc run` on the embedded default
(sample corpus, sample labels, tiny models) with its catalog in PostgreSQL and its files on an S3 server, and the
same run with a SQLite catalog and local files, alternating, each in a fresh QC_DATA_DIR.

Both servers are the suite's own (qc_assets/testing/lake_servers.py): PostgreSQL 15 and `rclone serve s3` on
127.0.0.1, so the figures show the cost of the protocols (libpq round trips, S3 requests, the advisory lock), not
of a network. Printed per round: each run's wall time and the ratio to the SQLite run of the same round; then the
medians, and the rows each lake holds per table (they must match).

    python bench/lake_scale_out.py [--rounds 2] [--json bench/results/lake_scale_out.json]

Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.testing.lake_servers import PostgresServer, S3Server

ROOT = Path(__file__).resolve().parent.parent

QC = Path(sys.executable).parent / "qc"
TABLES = ("corpus", "teacher_labels", "generated_queries", "reranker_scores", "eval_summary")
# Reads every row's text or query from the files, not only the catalog's statistics.
ROW_CHECK = " UNION ALL ".join(f"SELECT '{table}' AS t, count(*) AS n FROM {table}" for table in TABLES)


def run_environment(lake: dict[str, str], data_dir: Path) -> dict[str, str]:
    outside = {key: value for key, value in os.environ.items() if not key.startswith(("QC_", "AWS_"))}
    return {
        **outside,
        **lake,
        "QC_DATA_DIR": str(data_dir),
        "QC_STUDENT_BASE_MODELS": "tiny",
        "QC_SCORER_MODEL": "tiny",
    }


def timed_run(lake: dict[str, str], data_dir: Path) -> tuple[float, dict[str, int]]:
    env = run_environment(lake, data_dir)
    started = time.perf_counter()
    done = subprocess.run([str(QC), "run"], env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"qc run failed on {lake['QC_LAKE_CATALOG']}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    counts = subprocess.run([str(QC), "sql", "--format", "csv", ROW_CHECK], env=env, capture_output=True, text=True)
    if counts.returncode != 0:
        raise SystemExit(f"qc sql failed:\n{counts.stderr[-3000:]}")
    rows = dict(line.split(",") for line in counts.stdout.splitlines()[1:])
    return seconds, {table: int(count) for table, count in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "lake_scale_out.json")
    args = parser.parse_args()
    subprocess.run([str(QC), "models", "tiny"], cwd=ROOT, check=True, capture_output=True)
    times: dict[str, list[float]] = {"sqlite": [], "postgres+s3": []}
    rows: dict[str, dict[str, int]] = {}
    with PostgresServer() as postgres, S3Server() as s3, tempfile.TemporaryDirectory(prefix="qc-bench-lake-") as work:
        for round_ in range(args.rounds):
            name = f"lake_{uuid.uuid4().hex[:12]}"
            lakes = {
                "sqlite": {
                    "QC_LAKE_CATALOG": f"sqlite:{Path(work) / name / 'catalog.sqlite'}",
                    "QC_LAKE_DATA_PATH": f"{Path(work) / name / 'files'}/",
                },
                "postgres+s3": {
                    "QC_LAKE_CATALOG": f"postgres:{postgres.create_database(name)}",
                    "QC_LAKE_DATA_PATH": f"s3://{s3.bucket('lake')}/{name}/",
                    **s3.environment(),
                },
            }
            for kind, lake in lakes.items():
                seconds, rows[kind] = timed_run(lake, Path(work) / f"{name}-{kind}")
                times[kind].append(seconds)
            print(
                f"round {round_ + 1}: sqlite + local files {times['sqlite'][-1]:.1f}s, postgres + s3 "
                f"{times['postgres+s3'][-1]:.1f}s, ratio {times['postgres+s3'][-1] / times['sqlite'][-1]:.2f}",
                flush=True,
            )
    reference, scale_out = statistics.median(times["sqlite"]), statistics.median(times["postgres+s3"])
    print(f"median over {args.rounds} rounds: {scale_out:.1f}s vs {reference:.1f}s, ratio {scale_out / reference:.2f}")
    print(
        "rows per table, sqlite / postgres+s3:",
        {table: (rows["sqlite"][table], rows["postgres+s3"][table]) for table in TABLES},
    )
    write_results(
        args.json,
        {
            "rounds": args.rounds,
            "times_s": times,
            "rows": rows,
            "figures": [
                figure(
                    "whole graph `qc run`, PostgreSQL catalog + S3 files",
                    scale_out,
                    "s",
                    reference="SQLite catalog + local files",
                    reference_value=reference,
                    ratio=scale_out / reference,
                )
            ],
        },
    )


if __name__ == "__main__":
    main()
