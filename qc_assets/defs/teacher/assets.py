"""The teacher-labels asset: seven labels per document, per shard, each key paid for once."""


import statistics
from datetime import date, datetime, time as clock, timedelta, timezone
from pathlib import Path

import dagster as dg
from pydantic import Field

from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.backends import Budget, TeacherBackend, TeacherConfigError
from qc_assets.defs.teacher.key_budget import KeyBudget, budget_name
from qc_assets.defs.teacher.labeling import LabelingReport, label_shard
from qc_assets.defs.teacher.prices import PriceError, resolve_price
from qc_assets.defs.teacher.replay_teacher import (
    REPLAY_PROMPT_VERSION,
    ReplayColumns,
    ReplayError,
    ReplayTeacher,
    replay_source_name,
)
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import CORPUS, TEACHER_LABELS, TEACHER_QUARANTINE
from qc_assets.settings import Settings, env_name

DEFAULT_OPENAI_MODEL = "deepseek-reasoner"
# DeepSeek's off-peak discount (seed 000's prices) runs 16:30-00:30 UTC.
DISCOUNT_STARTS = clock(16, 30)
DISCOUNT_ENDS = clock(0, 30)


class TeacherResource(dg.ConfigurableResource):
    """Which teacher writes the labels and how hard it may be pushed (QC_TEACHER_*)."""

    backend: str = Field(default="replay", description="`openai` or `replay` (QC_TEACHER_BACKEND).")
    base_url: str = Field(default="https://api.deepseek.com", description="QC_TEACHER_BASE_URL")
    model: str | None = Field(default=None, description="QC_TEACHER_MODEL")
    api_key: str | None = Field(default=None, description="QC_TEACHER_API_KEY, passed as an EnvVar so it is never shown.")
    concurrency: int = Field(default=100, description="QC_TEACHER_CONCURRENCY")
    max_attempts: int = Field(default=6, description="QC_TEACHER_MAX_ATTEMPTS")
    timeout_s: float = Field(default=600.0, description="QC_TEACHER_TIMEOUT_S")
    max_tokens: int = Field(default=8192, description="QC_TEACHER_MAX_TOKENS")
    backoff_s: float = Field(default=1.0, description="First retry's longest wait; doubles per attempt (QC_TEACHER_BACKOFF_S).")
    price: str | None = Field(default=None, description="QC_TEACHER_PRICE")
    max_usd: float | None = Field(default=None, description="QC_TEACHER_MAX_USD: hard spend cap per run.")
    batch_size: int = Field(default=256, description="QC_TEACHER_BATCH_SIZE")
    flush_seconds: float = Field(default=5.0, description="QC_TEACHER_FLUSH_SECONDS")
    replay_source: str = Field(default="", description="QC_TEACHER_REPLAY_SOURCE")
    replay_columns: str = Field(default="doc_id=doc_id,category=category,query=query", description="QC_TEACHER_REPLAY_COLUMNS")
    replay_split: str = Field(default="train", description="QC_TEACHER_REPLAY_SPLIT")
    work_dir: str = Field(description="Journal and caches, under QC_DATA_DIR/teacher.")

    @classmethod
    def from_settings(cls, settings: Settings, secret_inline: bool = False) -> "TeacherResource":
        """In Dagster the key stays an EnvVar, resolved in the run and never shown; `secret_inline` is for the
        CLI, which uses the resource outside Dagster."""
        api_key = None
        if settings.teacher_api_key is not None:
            api_key = (
                settings.teacher_api_key.get_secret_value() if secret_inline else dg.EnvVar(env_name("teacher_api_key"))
            )
        return cls(
            backend=settings.teacher_backend,
            base_url=settings.teacher_base_url,
            model=settings.teacher_model,
            api_key=api_key,
            concurrency=settings.teacher_concurrency,
            max_attempts=settings.teacher_max_attempts,
            timeout_s=settings.teacher_timeout_s,
            max_tokens=settings.teacher_max_tokens,
            backoff_s=settings.teacher_backoff_s,
            price=settings.teacher_price,
            max_usd=settings.teacher_max_usd,
            batch_size=settings.teacher_batch_size,
            flush_seconds=settings.teacher_flush_seconds,
            replay_source=settings.teacher_replay_source,
            replay_columns=settings.teacher_replay_columns,
            replay_split=settings.teacher_replay_split,
            work_dir=str(settings.teacher_dir),
        )

    @property
    def journal_root(self) -> Path:
        return Path(self.work_dir) / "journal"

    def identity(self) -> tuple[str, dict[str, str]]:
        """The teacher name and each category's prompt version that the current settings label under."""
        if self.backend == "openai":
            return self.model or DEFAULT_OPENAI_MODEL, {name: c.prompt_version for name, c in CATEGORIES.items()}
        return self.model or replay_source_name(self.replay_source), {name: REPLAY_PROMPT_VERSION for name in CATEGORIES}

    def open_backend(self) -> TeacherBackend:
        """The configured backend; raises ValueError naming the setting when the configuration cannot work."""
        if self.backend == "openai":
            # The openai package takes seconds to import; every process that loads the graph but labels nothing
            # (the UI, other stages' steps, `qc sql`) would pay for it.
            from qc_assets.defs.teacher.openai_teacher import OpenAITeacher

            model = self.model or DEFAULT_OPENAI_MODEL
            return OpenAITeacher(
                base_url=self.base_url,
                model=model,
                api_key=self.api_key,
                price=resolve_price(self.price, model),
                concurrency=self.concurrency,
                max_attempts=self.max_attempts,
                timeout_s=self.timeout_s,
                max_tokens=self.max_tokens,
                backoff_s=self.backoff_s,
                key_budget=KeyBudget(
                    Path(self.work_dir) / "keys", budget_name(self.base_url, self.api_key), self.concurrency
                ),
            )
        if self.backend == "replay":
            return ReplayTeacher(
                source=self.replay_source,
                columns=ReplayColumns.parse(self.replay_columns),
                split=self.replay_split,
                cache_dir=Path(self.work_dir) / "replay-cache",
                teacher=self.model,
            )
        raise ValueError(f"QC_TEACHER_BACKEND must be openai or replay, got {self.backend!r}")


class TeacherRunConfig(dg.Config):
    stop_at: str | None = Field(
        default=None, description="ISO time after which no new request starts (the discount-window schedule sets it)."
    )
    max_usd: float | None = Field(default=None, description="Spend cap for this run, instead of QC_TEACHER_MAX_USD.")


def _outcomes_table(report: LabelingReport) -> str:
    statuses = ("labeled", "quarantined", "stopped", "absent")
    lines = ["| category | " + " | ".join(statuses) + " |", "|---" * (len(statuses) + 1) + "|"]
    for name in CATEGORIES:
        counts = report.by_category.get(name, {})
        lines.append(f"| {name} | " + " | ".join(str(counts.get(status, 0)) for status in statuses) + " |")
    return "\n".join(lines)


def report_metadata(report: LabelingReport, labels_in_shard: int) -> dict:
    labeled = report.count("labeled")
    latencies = sorted(report.latencies)
    return {
        "dagster/row_count": labels_in_shard,
        "teacher": report.teacher,
        "keys": report.keys_total,
        "keys_already_labeled": report.keys_already_labeled,
        "labeled": labeled,
        "quarantined": report.count("quarantined"),
        "not_asked": report.keys_not_asked,
        "absent_in_replay_source": report.count("absent"),
        "recovered_from_journal": report.recovered_from_journal,
        "requests": report.requests,
        "retries": sum(report.retries.values()),
        "retries_by_reason": dg.MetadataValue.json(dict(report.retries)),
        "labels_per_second": round(labeled / report.seconds, 2) if report.seconds else 0.0,
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "lowest_concurrency": report.lowest_concurrency,
        "input_tokens": report.usage.input_tokens,
        "cached_input_tokens": report.usage.cached_input_tokens,
        "output_tokens": report.usage.output_tokens,
        "reasoning_tokens": report.usage.reasoning_tokens,
        "cost_usd": round(report.usage.cost_usd, 6),
        "lake_writes": report.lake_writes,
        "seconds": round(report.seconds, 3),
        "cpu_seconds": round(report.cpu_seconds, 3),
        "outcomes_by_category": dg.MetadataValue.md(_outcomes_table(report)),
    }


def read_documents(lake: LakeResource, shard: str, limit: int | None = None) -> list[tuple[str, str]]:
    query = f'SELECT doc_id, text FROM "{CORPUS.name}" WHERE shard = $1 ORDER BY source_row'
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    with lake.get_connection() as connection:
        return connection.execute(query, [shard]).fetchall()


def build_teacher_asset(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=TEACHER_LABELS.name,
        partitions_def=partitions_def,
        deps=[CORPUS.name],
        group_name="teacher",
        kinds={"duckdb", "openai"},
        description=TEACHER_LABELS.description
        + " Rejected outputs go to teacher_quarantine and are asked for again by the next run.",
        metadata={
            "dagster/column_schema": TEACHER_LABELS.dagster_schema(),
            "dagster/table_name": f"lake.{TEACHER_LABELS.name}",
            "quarantine_table": f"lake.{TEACHER_QUARANTINE.name}",
        },
    )
    def teacher_labels(
        context: dg.AssetExecutionContext, config: TeacherRunConfig, teacher: TeacherResource, lake: LakeResource
    ) -> dg.MaterializeResult:
        shard = context.partition_key
        documents = read_documents(lake, shard)
        try:
            stop_at = datetime.fromisoformat(config.stop_at) if config.stop_at else None
            backend = teacher.open_backend()
        except (ValueError, PriceError, ReplayError) as error:
            raise dg.Failure(description=f"shard {shard}: teacher configuration: {error}") from None
        if stop_at is not None and stop_at.tzinfo is None:
            stop_at = stop_at.replace(tzinfo=timezone.utc)
        budget = Budget(max_usd=config.max_usd or teacher.max_usd, stop_at=stop_at)
        context.log.info(
            f"labelling shard {shard} with {backend.teacher} ({teacher.backend}); "
            + (f"spend cap ${budget.max_usd:g}" if budget.max_usd else "no spend cap")
            + (f", stop at {stop_at.isoformat()}" if stop_at else "")
        )
        try:
            report = label_shard(
                shard, documents, backend, lake, teacher.journal_root, budget, context.run.run_id,
                teacher.batch_size, teacher.flush_seconds, context.log.info,
            )
        except (TeacherConfigError, ReplayError) as error:
            raise dg.Failure(description=f"shard {shard}: {error}") from None
        with lake.get_connection() as connection:
            labels_in_shard = connection.execute(
                "SELECT count(*) FROM teacher_labels WHERE shard = $1 AND teacher = $2", [shard, backend.teacher]
            ).fetchone()[0]
        metadata = report_metadata(report, labels_in_shard)
        context.log.info(
            f"shard {shard}: {report.count('labeled')} labelled, {report.count('quarantined')} quarantined, "
            f"{report.requests} requests, {sum(report.retries.values())} retries, ${report.usage.cost_usd:.4f} "
            f"in {report.seconds:.1f}s"
        )
        if report.count("quarantined"):
            context.log.warning(
                f"shard {shard}: {report.count('quarantined')} keys quarantined (see lake.teacher_quarantine); "
                "the next run asks for them again"
            )
        if report.count("absent"):
            context.log.warning(
                f"shard {shard}: the replay source has no label for {report.count('absent')} keys"
            )
        if report.stopped_because and report.keys_not_asked:
            raise dg.Failure(
                description=(
                    f"shard {shard}: {report.stopped_because}. {report.count('labeled')} labels were written and "
                    f"kept; {report.keys_not_asked} keys were not asked for. Run again to continue."
                ),
                metadata=metadata,
            )
        return dg.MaterializeResult(metadata=metadata)

    return teacher_labels


def discount_window_end(moment: datetime) -> datetime | None:
    """The end (UTC) of the DeepSeek discount window that `moment` falls in, or None outside one."""
    utc = moment.astimezone(timezone.utc)
    if utc.time() >= DISCOUNT_STARTS:
        following = utc.date() + timedelta(days=1)
    elif utc.time() < DISCOUNT_ENDS:
        following = utc.date()
    else:
        return None
    return datetime.combine(following, DISCOUNT_ENDS, tzinfo=timezone.utc)


def build_discount_schedule(job, shard_keys: list[str]) -> dg.ScheduleDefinition:
    @dg.schedule(
        job=job,
        name="teacher_discount_window",
        cron_schedule="30 16-23 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Labels every shard inside DeepSeek's 16:30-00:30 UTC discount window; each run stops "
        "starting requests when the window closes, and the next night's runs continue. Off by default: it spends money.",
    )
    def teacher_discount_window(context: dg.ScheduleEvaluationContext):
        ends = discount_window_end(context.scheduled_execution_time)
        if ends is None:
            return dg.SkipReason(
                f"{context.scheduled_execution_time.isoformat()} is outside the 16:30-00:30 UTC discount window"
            )
        night: date = (ends - timedelta(days=1)).date()
        return [
            dg.RunRequest(
                run_key=f"{night.isoformat()}:{shard}",
                partition_key=shard,
                run_config={"ops": {TEACHER_LABELS.name: {"config": {"stop_at": ends.isoformat()}}}},
                tags={"qc/discount_window": night.isoformat()},
            )
            for shard in shard_keys
        ]

    return teacher_discount_window

