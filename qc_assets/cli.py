"""The `qc` command: run the graph, query the lake, open the UI."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import duckdb

from qc_assets.settings import Settings, SettingsError, load_settings

SUMMARY_QUERIES = {
    "corpus": "SELECT count(*) AS documents, count(DISTINCT shard) AS shards, round(avg(n_chars)) AS mean_chars FROM corpus",
    "teacher_labels": (
        "SELECT teacher, count(*) AS labels, count(DISTINCT doc_id) AS documents, round(sum(cost_usd), 4) AS cost_usd, "
        "(SELECT count(*) FROM teacher_quarantine q WHERE q.teacher = l.teacher) AS quarantined "
        "FROM teacher_labels l GROUP BY teacher ORDER BY teacher"
    ),
    "checkpoints": "SELECT checkpoint, base_model, steps, round(final_loss, 4) AS final_loss, tiny_model FROM checkpoints ORDER BY created_at",
    "eval_summary (seed 000's table: reranker score per source, all categories)": (
        "SELECT source AS モデル, scorer, n, round(mean, 4) AS 平均, round(std, 4) AS 標準偏差, "
        "round(round_trip_rate, 3) AS round_trip, round(bm25_mrr10, 3) AS bm25_mrr10, "
        "round(rerank_mrr10, 3) AS rerank_mrr10, round(copy_rate, 3) AS copied, "
        "tiny_model FROM eval_summary WHERE category = 'all' ORDER BY scorer, mean DESC"
    ),
    "training_pairs ((anchor, positive, negative_1..n) for sentence-transformers, per source)": (
        "SELECT source, version, sum(scored)::BIGINT AS scored, sum(passed_round_trip)::BIGINT AS passed_round_trip, "
        "coalesce(sum(exported) FILTER (split = 'train'), 0)::BIGINT AS train_rows, "
        "coalesce(sum(exported) FILTER (split = 'test'), 0)::BIGINT AS test_rows "
        "FROM training_pairs GROUP BY source, version ORDER BY source"
    ),
}


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        raise click.UsageError(str(error)) from None


def _lake(settings: Settings, read_only: bool):
    from qc_assets.lake.resource import LakeResource

    return LakeResource(catalog=settings.catalog, data_path=settings.data_path, read_only=read_only)


@click.group()
def main() -> None:
    """qc_assets: Japanese query-generation data, students and scores as a Dagster asset graph."""


@main.command()
@click.option("--select", default=None, help="Dagster asset selection, e.g. 'corpus' or 'key:corpus+'. Default: all.")
@click.option(
    "--shard",
    "shard_patterns",
    multiple=True,
    metavar="GLOB",
    help="Only these shards (glob, repeatable), e.g. 'data/train-0000*'; base-model partitions are not filtered.",
)
def run(select: str | None, shard_patterns: tuple[str, ...]) -> None:
    """Materialize the graph (or the selection) as one backfill on the persistent instance, and wait for it and for
    what the checkpoint sensor and the report's automation launch after it."""
    settings = _settings()
    from qc_assets.definitions import build_definitions
    from qc_assets.orchestration.run import RunRequest, RunRequestError, run_graph

    try:
        definitions = build_definitions(settings)
    except Exception as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Dagster home {settings.dagster_home}; lake {settings.catalog}")
    started = time.perf_counter()
    try:
        outcome = run_graph(settings, RunRequest(select, shard_patterns), definitions, click.echo)
    except RunRequestError as error:
        raise click.UsageError(str(error)) from None
    click.echo(
        f"\n{outcome.runs} runs in {time.perf_counter() - started:.1f}s: {outcome.failed_runs} failed"
        + (f"; backfill {outcome.backfill_status}" if outcome.backfill_status else "")
    )
    _print_summary(settings)
    if not outcome.success:
        sys.exit(1)


SUMMARY_WIDTH = 200
SUMMARY_COLUMN_WIDTH = 34


def _print_summary(settings: Settings) -> None:
    with _lake(settings, read_only=True).get_connection() as connection:
        for table, query in SUMMARY_QUERIES.items():
            try:
                relation = connection.sql(query)
            except duckdb.CatalogException:
                continue
            click.echo(f"\n{table}:")
            # Wider than a terminal's guess: seed 000's table with the round trip has ten columns, none to elide.
            relation.show(max_width=SUMMARY_WIDTH, max_col_width=SUMMARY_COLUMN_WIDTH)
            if table.startswith("eval_summary") and any(row[-1] for row in relation.fetchall()):
                click.echo("Tiny models took part: these scores mean nothing; they only show the pipeline works.")
            if table.startswith("training_pairs"):
                click.echo(
                    f"Each source's current version: {settings.data_root / 'training_pairs'}/<source>/<version>/hf "
                    "(datasets.load_from_disk), its card README.md beside it."
                )


def _read_sql(sql: str | None, file: str | None) -> str:
    if file:
        with open(file, encoding="utf-8") as handle:
            return handle.read()
    if sql == "-" or (sql is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if sql is None:
        raise click.UsageError("give the SQL as an argument, with --file, or on standard input")
    return sql


@main.command()
@click.argument("sql", required=False)
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False), help="Read the SQL from a file.")
@click.option(
    "--format", "output_format", default="table", type=click.Choice(["table", "csv", "json"]), show_default=True
)
@click.option("--max-rows", default=100, show_default=True, help="Rows shown in table format.")
def sql(sql: str | None, file: str | None, output_format: str, max_rows: int) -> None:
    """Query the lake read-only; safe while runs are writing."""
    settings = _settings()
    query = _read_sql(sql, file)
    try:
        with _lake(settings, read_only=True).get_connection() as connection:
            relation = connection.sql(query)
            if relation is None:
                return
            if output_format == "table":
                relation.show(max_rows=max_rows, max_width=10_000)
                return
            frame = relation.pl()
    except (duckdb.Error, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    if output_format == "csv":
        click.echo(frame.write_csv(), nl=False)
    else:
        click.echo(frame.write_json())


@main.command()
@click.option(
    "--documents",
    default=20,
    show_default=True,
    type=click.IntRange(1),
    help="Pilot documents; each gets all 7 categories.",
)
@click.option("--shard", default=None, help="Shard the pilot comes from. Default: the first materialized shard.")
def estimate(documents: int, shard: str | None) -> None:
    """Label a pilot sample with the configured teacher and project cost and hours for the whole corpus.

    The pilot's labels are kept in the lake, so the full run does not pay for them again.
    """
    settings = _settings()
    from qc_assets.defs.corpus.assets import CorpusResource
    from qc_assets.defs.teacher.assets import TeacherResource
    from qc_assets.defs.teacher.estimate import estimate as run_estimate

    teacher = TeacherResource.from_settings(settings, secret_inline=True)
    try:
        shard_count = len(CorpusResource.from_settings(settings).open().shards())
        projection = run_estimate(teacher, _lake(settings, read_only=False), shard, documents, shard_count, click.echo)
    except (ValueError, RuntimeError, duckdb.Error) as error:
        raise click.ClickException(str(error)) from None
    for line in projection.lines():
        click.echo(line)


@main.command()
@click.option(
    "--quick",
    is_flag=True,
    help="Small sizes: a smoke run of every benchmark in about a minute; its figures mean little.",
)
@click.option(
    "--only", multiple=True, metavar="NAME", help="Run only this benchmark (repeatable), e.g. --only scaling."
)
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the JSON files go. Default: bench/results/.",
)
def bench(quick: bool, only: tuple[str, ...], results_dir: Path | None) -> None:
    """Run every benchmark in bench/ and write results.json; when every benchmark has full-run figures (`--only`
    keeps the others' last ones from this machine), also rewrite the README's performance table.

    Every figure is printed next to a reference measured in the same run, as a ratio. Nothing here is a test.
    """
    from qc_assets.benchmarks import RESULTS_DIR, is_complete, render_table, run_benchmarks, update_readme

    try:
        summary = run_benchmarks(quick, only, results_dir or RESULTS_DIR, click.echo)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    table = render_table(summary)
    click.echo("\n" + table)
    failed = [name for name, entry in summary["benchmarks"].items() if entry["status"] != "ok"]
    if is_complete(summary) and results_dir is None:
        update_readme(table)
        click.echo("\nREADME.md's performance table rewritten.")
    click.echo(
        f"\n{len(summary['benchmarks'])} benchmarks in {summary['seconds']:.0f}s; results in {(results_dir or RESULTS_DIR) / 'results.json'}"
    )
    if failed:
        raise click.ClickException(f"benchmarks failed: {', '.join(failed)}")


@main.group()
def models() -> None:
    """Models the project builds itself."""


@models.command("tiny")
@click.option("--force", is_flag=True, help="Rebuild even when present.")
def tiny_models(force: bool) -> None:
    """Build, offline, the tiny random-weight student and fine-tuned cross-encoder under QC_DATA_DIR/models (when missing).

    Their tokenizers are trained on the sample corpus. Anything they produce means nothing: they exist so the
    embedded default and the tests run real architectures on CPU.
    """
    settings = _settings()
    from qc_assets.models.tiny import ensure_tiny_models, sample_texts

    started = time.perf_counter()
    built = ensure_tiny_models(settings.data_root / "models", sample_texts(), force=force)
    for name, path in built.items():
        click.echo(f"{name}: {path}")
    click.echo(f"ready in {time.perf_counter() - started:.1f}s")


@main.command()
@click.option("--port", default=3000, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True, help="Keep the default unless you add authentication.")
def ui(port: int, host: str) -> None:
    """Start the Dagster webserver and daemon with the project's persistent instance."""
    settings = _settings()
    import dagster as dg

    from qc_assets.orchestration.home import prepare_dagster_home
    from qc_assets.orchestration.recovery import recover_abandoned_runs
    from qc_assets.orchestration.service import InstanceServiceLock, dagster_dev_command

    prepare_dagster_home(settings)
    lock = InstanceServiceLock(settings.dagster_home)
    if not lock.try_acquire():
        raise click.ClickException(
            f"a `qc run` or another `qc ui` is running Dagster on this instance ({settings.dagster_home}); "
            "open the UI once it has ended"
        )
    lock.publish("ui", f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", keep_across_exec=True)
    # The daemon's sensor would find them within a minute; at start-up a backfill waiting on them goes on at once.
    with dg.DagsterInstance.get() as instance:
        for run_id in recover_abandoned_runs(instance):
            click.echo(f"run {run_id}: its process was killed; marked failed and its GPU slots freed")
    command = dagster_dev_command(host, port)
    click.echo(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    # The code server resolves a relative QC_DATA_DIR against its own working directory; pin it to this one's.
    os.environ["QC_DATA_DIR"] = str(settings.data_root)
    # Replaced, not wrapped: a SIGTERM or SIGINT sent to `qc ui` then reaches `dagster dev`, which shuts down its
    # webserver, daemon and code server; a wrapping process would die alone and leave them holding the port.
    # exec drops what is still buffered: the address above would never reach a log file.
    sys.stdout.flush()
    os.execv(sys.executable, command)
