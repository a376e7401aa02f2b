"""The eval_summary asset: seed 000's table (mean and population std of reranker scores per source), a percentile
plot, and the checks that guard it."""

import base64
import io
from pathlib import Path

import dagster as dg
from pydantic import Field

from qc_assets.defs.sft.dataset import split_is_test_sql
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import EVAL_SUMMARY, RERANKER_SCORES, TEACHER_SOURCE_PREFIX, TRAINING_PAIRS
from qc_assets.settings import Settings

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
TINY_NOTE = "Tiny models took part: these scores mean nothing; they only show the pipeline works."


class ReportResource(dg.ConfigurableResource):
    reports_dir: str = Field(description="Where plots go, QC_DATA_DIR/reports.")
    round_trip_max_gap: float = Field(description="QC_ROUND_TRIP_MAX_GAP")
    test_fraction: float = Field(description="QC_SFT_TEST_FRACTION: the table compares sources on the test split.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "ReportResource":
        return cls(
            reports_dir=str(settings.data_root / "reports"),
            round_trip_max_gap=settings.round_trip_max_gap,
            test_fraction=settings.sft_test_fraction,
        )


def summary_sql(test_fraction: float) -> str:
    """Seed 000's table over the test split's pairs: the documents students never trained on, which the teacher's
    row is scored on too (its train-split rows are training pairs, not evaluation)."""
    return _SUMMARY_SQL.format(in_test=split_is_test_sql("doc_id", test_fraction))


_SUMMARY_SQL = f"""
WITH evaluated AS (SELECT * FROM reranker_scores WHERE {{in_test}}),
scored AS (
    SELECT s.*, coalesce(c.tiny_model, false) OR s.scorer LIKE 'tiny-%' AS tiny
    FROM evaluated s LEFT JOIN checkpoints c ON c.checkpoint = s.source
),
-- Every (document, category) some source was scored on under a scorer: what each row should cover.
covered AS (
    SELECT scorer, coalesce(category, 'all') AS category, count(*) AS pairs
    FROM (SELECT DISTINCT scorer, doc_id, category FROM evaluated)
    GROUP BY GROUPING SETS ((scorer, category), (scorer))
),
summary AS (
SELECT source, scorer, coalesce(category, 'all') AS category, count(*) AS n, avg(score) AS mean,
       stddev_pop(score) AS std,
       {", ".join(f"quantile_cont(score, {q / 100}) AS p{q:02d}" for q in PERCENTILES)},
       avg(bm25_overlap) AS bm25_overlap, avg(CASE WHEN bm25_rank = 1 THEN 1.0 ELSE 0.0 END) AS bm25_top1,
       avg(CASE WHEN bm25_rank <= 10 THEN 1.0 ELSE 0.0 END) AS bm25_recall10,
       avg(CASE WHEN bm25_rank <= 10 THEN 1.0 / bm25_rank ELSE 0.0 END) AS bm25_mrr10,
       avg(CASE WHEN rerank_rank = 1 THEN 1.0 ELSE 0.0 END) AS rerank_recall1,
       avg(CASE WHEN rerank_rank <= 10 THEN 1.0 ELSE 0.0 END) AS rerank_recall10,
       avg(CASE WHEN rerank_rank <= 10 THEN 1.0 / rerank_rank ELSE 0.0 END) AS rerank_mrr10,
       avg(round_trip::DOUBLE) AS round_trip_rate, avg(copy_verbatim::DOUBLE) AS copy_rate,
       avg(copy_share) AS copy_share, avg(len(negative_doc_ids)) AS negatives_per_pair,
       bool_or(tiny) AS tiny_model, now() AS created_at
FROM scored
GROUP BY GROUPING SETS ((source, scorer, category), (source, scorer))
)
SELECT summary.*, covered.pairs - summary.n AS missing_pairs
FROM summary JOIN covered USING (scorer, category)
"""


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| モデル (source) | scorer | n | 平均 (mean) | 標準偏差 (std) | p50 | round trip | R@1 BM25 → re-rank "
        "| MRR@10 BM25 → re-rank | copied verbatim | copy share | negatives / pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['source']} | {row['scorer']} | {_count(row)} | {row['mean']:.4f} | {row['std']:.4f} | "
            f"{row['p50']:.4f} | {_share(row['round_trip_rate'])} | {_share(row['bm25_top1'])} → "
            f"{_share(row['rerank_recall1'])} | {_share(row['bm25_mrr10'])} → {_share(row['rerank_mrr10'])} | "
            f"{_share(row['copy_rate'])} | {_share(row['copy_share'])} | {_share(row['negatives_per_pair'])} |"
        )
    return "\n".join(lines)


def _category_markdown(rows: list[dict]) -> str:
    """Per source and category, side by side: the measures that differ most between categories."""
    lines = [
        "| category | モデル (source) | scorer | n | 平均 (mean) | round trip | copied verbatim | copy share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['category']} | {row['source']} | {row['scorer']} | {_count(row)} | {row['mean']:.4f} | "
            f"{_share(row['round_trip_rate'])} | {_share(row['copy_rate'])} | {_share(row['copy_share'])} |"
        )
    return "\n".join(lines)


def _count(row: dict) -> str:
    """n, and the pairs other rows have and this one lacks: rows compare only where they cover the same pairs."""
    return f"{row['n']} ({row['missing_pairs']} missing)" if row["missing_pairs"] else str(row["n"])


def _share(value: float | None) -> str:
    """Rows scored before the round trip existed have none of its columns."""
    return "–" if value is None else f"{value:.3f}"


def _plot(rows: list[dict], path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, rates) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for row in rows:
        axis.plot(
            PERCENTILES, [row[f"p{q:02d}"] for q in PERCENTILES], marker="o", label=f"{row['source']} ({row['scorer']})"
        )
    axis.set_xlabel("percentile")
    axis.set_ylabel("reranker score")
    axis.set_ylim(0, 1)
    axis.set_title("Reranker score percentiles per source (all categories)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    _plot_rates(rates, rows)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


RATES = {"round trip": "round_trip_rate", "copied verbatim": "copy_rate", "re-rank R@1": "rerank_recall1"}


def _plot_rates(axis, rows: list[dict]) -> None:
    """The round trip's pass rate, the copy rate and re-ranked recall@1 per source, as grouped bars."""
    width = 0.8 / max(len(rows), 1)
    for offset, row in enumerate(rows):
        axis.bar(
            [position + offset * width for position in range(len(RATES))],
            [row[column] or 0.0 for column in RATES.values()],
            width,
            label=row["source"],
        )
    axis.set_xticks([position + width * (len(rows) - 1) / 2 for position in range(len(RATES))], list(RATES))
    axis.set_ylim(0, 1)
    axis.set_title("Round trip and copying per source")
    axis.grid(alpha=0.3, axis="y")


def _regressions(connection) -> list[str]:
    """Checkpoints whose overall mean is below the best earlier checkpoint of the same base model, per scorer."""
    rows = connection.execute(
        """
        SELECT e.source, e.scorer, e.mean, c.base_model, c.created_at
        FROM eval_summary e JOIN checkpoints c ON c.checkpoint = e.source
        WHERE e.category = 'all' ORDER BY c.created_at
        """
    ).fetchall()
    best: dict[tuple[str, str], tuple[float, str]] = {}
    worse = []
    for source, scorer, mean, base_model, _ in rows:
        key = (base_model, scorer)
        if key in best and mean < best[key][0]:
            worse.append(f"{source} ({mean:.4f}) < {best[key][1]} ({best[key][0]:.4f}) under {scorer}")
        if key not in best or mean > best[key][0]:
            best[key] = (mean, source)
    return worse


def _round_trip_gaps(connection, max_gap: float) -> list[str]:
    """Checkpoints whose overall round-trip pass rate is below the teacher's, same scorer, by more than max_gap."""
    rows = connection.execute(
        f"""
        SELECT student.source, student.scorer, student.round_trip_rate, teacher.source, teacher.round_trip_rate
        FROM eval_summary student JOIN eval_summary teacher
          ON teacher.scorer = student.scorer AND teacher.category = 'all'
         AND starts_with(teacher.source, '{TEACHER_SOURCE_PREFIX}')
        WHERE student.category = 'all' AND NOT starts_with(student.source, '{TEACHER_SOURCE_PREFIX}')
          AND teacher.round_trip_rate - student.round_trip_rate > $1
        ORDER BY ALL
        """,
        # Rates are means of booleans: a gap equal to the margin (0.8 - 0.7 in floating point) is within it.
        [max_gap + 1e-9],
    ).fetchall()
    return [
        f"{source} passes {rate:.3f} of round trips, {teacher} {teacher_rate:.3f}, under {scorer}"
        for source, scorer, rate, teacher, teacher_rate in rows
    ]


@dg.asset(
    name=EVAL_SUMMARY.name,
    deps=[dg.AssetDep(RERANKER_SCORES.name, partition_mapping=dg.AllPartitionMapping())],
    group_name="report",
    kinds={"duckdb", "matplotlib"},
    description=EVAL_SUMMARY.description + " Also a percentile plot under QC_DATA_DIR/reports/.",
    metadata={
        "dagster/column_schema": EVAL_SUMMARY.dagster_schema(),
        "dagster/table_name": f"lake.{EVAL_SUMMARY.name}",
    },
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(
            "no_regression",
            asset=EVAL_SUMMARY.name,
            description="Warns when a checkpoint scores below the best earlier one of its base model.",
        ),
        dg.AssetCheckSpec(
            "round_trip_vs_teacher",
            asset=EVAL_SUMMARY.name,
            description="Warns when a checkpoint's round-trip pass rate is below the teacher's under the same "
            "scorer by more than QC_ROUND_TRIP_MAX_GAP.",
        ),
    ],
)
def eval_summary(context: dg.AssetExecutionContext, lake: LakeResource, report: ReportResource):
    columns = ", ".join(EVAL_SUMMARY.column_names)

    def rebuild(connection):
        connection.execute(f'DELETE FROM "{EVAL_SUMMARY.name}"')
        connection.execute(
            f'INSERT INTO "{EVAL_SUMMARY.name}" ({columns}) SELECT {columns} FROM ({summary_sql(report.test_fraction)})'
        )
        overall = (
            connection.execute(f"SELECT * FROM {EVAL_SUMMARY.name} WHERE category = 'all' ORDER BY scorer, mean DESC")
            .to_arrow_table()
            .to_pylist()
        )
        by_category = (
            connection.execute(
                f"SELECT * FROM {EVAL_SUMMARY.name} WHERE category <> 'all' ORDER BY category, scorer, source"
            )
            .to_arrow_table()
            .to_pylist()
        )
        return overall, by_category, _regressions(connection), _round_trip_gaps(connection, report.round_trip_max_gap)

    overall, by_category, worse, behind = lake.transaction(rebuild, "rebuild eval_summary")
    if not overall:
        raise dg.Failure(
            description="reranker_scores is empty: materialize generated_queries and reranker_scores first"
        )
    tiny = any(row["tiny_model"] for row in overall)
    table = _markdown(overall)
    png = _plot(overall, Path(report.reports_dir) / "eval_percentiles.png")
    categories = _category_markdown(by_category)
    (Path(report.reports_dir) / "eval_summary.md").write_text(
        (f"> {TINY_NOTE}\n\n" if tiny else "") + table + "\n\n## By category\n\n" + categories + "\n",
        encoding="utf-8",
    )
    context.log.info("evaluation:\n" + table + (f"\n{TINY_NOTE}" if tiny else ""))
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(overall),
            "sources": len({row["source"] for row in overall}),
            "table": dg.MetadataValue.md((f"**{TINY_NOTE}**\n\n" if tiny else "") + table),
            "by_category": dg.MetadataValue.md(categories),
            "percentile_plot": dg.MetadataValue.md(
                f"![percentiles](data:image/png;base64,{base64.b64encode(png).decode()})"
            ),
            "plot_path": dg.MetadataValue.path(str(Path(report.reports_dir) / "eval_percentiles.png")),
            "tiny_models": tiny,
        }
    )
    yield dg.AssetCheckResult(
        check_name="no_regression",
        passed=not worse,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"regressions": dg.MetadataValue.json(worse)},
    )
    yield dg.AssetCheckResult(
        check_name="round_trip_vs_teacher",
        passed=not behind,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"behind_the_teacher": dg.MetadataValue.json(behind), "max_gap": report.round_trip_max_gap},
    )


REPORT_AUTOMATION = "evaluation_report_automation"

# The report and the training pairs: both follow every new score.
report_automation = dg.AutomationConditionSensorDefinition(
    REPORT_AUTOMATION,
    target=[EVAL_SUMMARY.name, TRAINING_PAIRS.name],
    default_status=dg.DefaultSensorStatus.RUNNING,
    # Short, so that `qc run` ends soon after the last scores; an evaluation reads the instance's records only.
    minimum_interval_seconds=5,
)
