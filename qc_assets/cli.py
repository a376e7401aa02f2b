"""The `qc` command: run the graph, query the lake, open the UI."""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from pathlib import Path

import click
import duckdb

from qc_assets.paths import PROJECT_ROOT
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
        "SELECT source AS モデル, scorer, n, round(mean, 4) AS 平均, round(std, 4) AS 標準偏差, round(bm25_top1, 3) AS bm25_top1, "
        "tiny_model FROM eval_summary WHERE category = 'all' ORDER BY scorer, mean DESC"
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


def _recover_abandoned_runs(instance) -> None:
    from qc_assets.recovery import recover_abandoned_runs

    recovered = recover_abandoned_runs(instance)
    if recovered:
        click.echo(
            f"{len(recovered)} runs whose process was killed marked failed, their GPU slots freed: "
            f"{', '.join(recovered)}"
        )


@click.group()
def main() -> None:
    """qc_assets: Japanese query-generation data, students and scores as a Dagster asset graph."""


@main.command()
@click.option("--select", default=None, help="Dagster asset selection, e.g. 'corpus' or 'key:corpus+'. Default: all.")
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(1, 64), help="Runs at once.")
@click.option(
    "--executor",
    default="in_process",
    show_default=True,
    type=click.Choice(["in_process", "multiprocess"]),
    help="Executor inside each run.",
)
@click.option(
    "--shard",
    "shard_patterns",
    multiple=True,
    metavar="GLOB",
    help="Only these shards (glob, repeatable), e.g. 'data/train-0000*'; base-model partitions are not filtered.",
)
def run(select: str | None, parallel: int, executor: str, shard_patterns: tuple[str, ...]) -> None:
    """Materialize the graph (or the selection) for every partition on the persistent instance."""
    settings = _settings()
    from qc_assets.runner import plan_stages, prepare_dagster_home, run_stages

    home = prepare_dagster_home(settings)
    import dagster as dg

    from qc_assets.definitions import build_definitions

    try:
        definitions = build_definitions(settings)
        stages = plan_stages(definitions, select)
    except Exception as error:
        raise click.ClickException(str(error)) from None
    if not stages:
        raise click.UsageError(f"--select {select!r} matches no asset")
    corpus_partitions = definitions.resolve_assets_def("corpus").partitions_def
    if corpus_partitions is None:
        raise click.ClickException("the corpus asset has no shard partitions")
    shards = corpus_partitions.get_partition_keys()
    for pattern in shard_patterns:
        if not any(fnmatch.fnmatchcase(shard, pattern) for shard in shards):
            raise click.UsageError(f"--shard {pattern!r} matches none of the {len(shards)} shards, e.g. {shards[0]!r}")
    click.echo(f"Dagster home {home}; lake {settings.catalog}")
    started = time.perf_counter()

    def report(outcome) -> None:
        where = f"[{outcome.partition}]" if outcome.partition else ""
        line = f"  {outcome.status:<8} {outcome.stage}{where}"
        click.echo(line + (f"  run {outcome.run_id}" if outcome.run_id else ""))
        for error in outcome.errors:
            click.echo(f"           {error}", err=outcome.status != "success")

    from qc_assets.defs.student.sensors import register_checkpoint_partitions

    with dg.DagsterInstance.get() as instance:
        _recover_abandoned_runs(instance)
        # Checkpoints copied into the store by hand are evaluated too, as the sensor would have them.
        register_checkpoint_partitions(
            instance, settings.data_root / "checkpoints", lambda message: click.echo(message, err=True)
        )
        for stage in stages:
            click.echo(f"stage {stage.label}")
        shard_partitions = definitions.resolve_assets_def("corpus").partitions_def
        outcomes = run_stages(stages, instance, parallel, executor, report, shard_partitions, shard_patterns)
    elapsed = time.perf_counter() - started
    counts = {
        status: sum(outcome.status == status for outcome in outcomes) for status in ("success", "failure", "skipped")
    }
    click.echo(
        f"\n{len(outcomes)} runs in {elapsed:.1f}s: {counts['success']} succeeded, "
        f"{counts['failure']} failed, {counts['skipped']} skipped"
    )
    _print_summary(settings)
    if counts["failure"] or counts["skipped"]:
        sys.exit(1)


def _print_summary(settings: Settings) -> None:
    with _lake(settings, read_only=True).get_connection() as connection:
        for table, query in SUMMARY_QUERIES.items():
            try:
                relation = connection.sql(query)
            except duckdb.CatalogException:
                continue
            click.echo(f"\n{table}:")
            click.echo(str(relation))
            if table.startswith("eval_summary") and any(row[-1] for row in relation.fetchall()):
                click.echo(
                    "Tiny random-weight models took part: these scores mean nothing; they only show the pipeline works."
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
    """Build, offline, the tiny random-weight student and cross-encoder under QC_DATA_DIR/models (when missing).

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
    from qc_assets.runner import prepare_dagster_home

    prepare_dagster_home(settings)
    import dagster as dg

    # The daemon's sensor would find them within a minute; at start-up a backfill waiting on them goes on at once.
    with dg.DagsterInstance.get() as instance:
        _recover_abandoned_runs(instance)
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        host,
        "-p",
        str(port),
    ]
    click.echo(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    # The code server resolves a relative QC_DATA_DIR against its own working directory; pin it to this one's.
    os.environ["QC_DATA_DIR"] = str(settings.data_root)
    # Replaced, not wrapped: a SIGTERM or SIGINT sent to `qc ui` then reaches `dagster dev`, which shuts down its
    # webserver, daemon and code server; a wrapping process would die alone and leave them holding the port.
    os.execv(sys.executable, command)
