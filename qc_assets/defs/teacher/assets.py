"""The teacher-labels asset: seven labels per document, per shard, each key paid for once."""

import statistics
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
from pydantic import Field

from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.backends import Budget, TeacherBackend, TeacherConfigError
from qc_assets.defs.teacher.key_budget import KeyBudget, budget_name
from qc_assets.defs.teacher.labeling import LabelingReport, LabelSinks, ShardRun, label_shard
from qc_assets.defs.teacher.prices import PriceError, UtcWindow, off_peak_window, resolve_price
from qc_assets.defs.teacher.replay_teacher import (
    REPLAY_PROMPT_VERSION,
    ReplayColumns,
    ReplayError,
    ReplayTeacher,
    replay_source_name,
)
from qc_assets.lake.resource import LakeResource, fetch_row
from qc_assets.lake.tables import CORPUS, TEACHER_LABELS, TEACHER_QUARANTINE
from qc_assets.settings import DEFAULT_OPENAI_TEACHER_MODEL, Settings, env_name


class TeacherResource(dg.ConfigurableResource):
    """Which teacher writes the labels and how hard it may be pushed (QC_TEACHER_*)."""

    backend: str = Field(description="`openai` or `replay` (QC_TEACHER_BACKEND).")
    base_url: str = Field(description="QC_TEACHER_BASE_URL")
    model: str | None = Field(description="QC_TEACHER_MODEL")
    api_key: str | None = Field(description="QC_TEACHER_API_KEY, passed as an EnvVar so it is never shown.")
    concurrency: int = Field(description="QC_TEACHER_CONCURRENCY")
    max_attempts: int = Field(description="QC_TEACHER_MAX_ATTEMPTS")
    timeout_s: float = Field(description="QC_TEACHER_TIMEOUT_S")
    max_tokens: int = Field(description="QC_TEACHER_MAX_TOKENS")
    backoff_s: float = Field(description="First retry's longest wait; doubles per attempt (QC_TEACHER_BACKOFF_S).")
    price: str | None = Field(description="QC_TEACHER_PRICE")
    thinking: str | None = Field(description="QC_TEACHER_THINKING: `enabled` or `disabled`.")
    reasoning_effort: str | None = Field(description="QC_TEACHER_REASONING_EFFORT")
    response_format: str | None = Field(
        description="QC_TEACHER_RESPONSE_FORMAT: `json_schema`, `json_object` or `none`."
    )
    window: str | None = Field(description="QC_TEACHER_WINDOW: the discount schedule's UTC window.")
    max_usd: float | None = Field(description="QC_TEACHER_MAX_USD: hard spend cap per run.")
    batch_size: int = Field(description="QC_TEACHER_BATCH_SIZE")
    flush_seconds: float = Field(description="QC_TEACHER_FLUSH_SECONDS")
    replay_source: str = Field(description="QC_TEACHER_REPLAY_SOURCE")
    replay_columns: str = Field(description="QC_TEACHER_REPLAY_COLUMNS")
    replay_split: str = Field(description="QC_TEACHER_REPLAY_SPLIT")
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
            thinking=settings.teacher_thinking,
            reasoning_effort=settings.teacher_reasoning_effort,
            response_format=settings.teacher_response_format,
            window=settings.teacher_window,
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

    def sinks(self, lake: LakeResource) -> LabelSinks:
        """Where a run's answers go: this teacher's journal, then `lake` in batches."""
        return LabelSinks(lake, self.journal_root, self.batch_size, self.flush_seconds)

    @property
    def openai_model(self) -> str:
        return self.model or DEFAULT_OPENAI_TEACHER_MODEL

    def spend_cap(self, run_max_usd: float | None) -> float | None:
        """A run's own cap wins over QC_TEACHER_MAX_USD."""
        return run_max_usd or self.max_usd

    def discount_window(self) -> UtcWindow | None:
        """QC_TEACHER_WINDOW, else the off-peak window of the teacher's price entry, if it has one."""
        if self.window is not None:
            return UtcWindow.parse(self.window)
        return off_peak_window(self.price, self.openai_model)

    def identity(self) -> tuple[str, dict[str, str]]:
        """The teacher name and each category's prompt version that the current settings label under."""
        if self.backend == "openai":
            return self.openai_model, {name: c.prompt_version for name, c in CATEGORIES.items()}
        return self.model or replay_source_name(self.replay_source), {
            name: REPLAY_PROMPT_VERSION for name in CATEGORIES
        }

    def open_backend(self, max_usd: float | None) -> TeacherBackend:
        """The configured backend for a run capped at `max_usd`; raises ValueError naming the setting when the
        configuration cannot work."""
        if self.backend == "openai":
            # The openai package takes seconds to import; every process that loads the graph but labels nothing
            # (the UI, other stages' steps, `qc sql`) would pay for it.
            from qc_assets.defs.teacher.openai_teacher import OpenAITeacher, RequestOptions

            return OpenAITeacher(
                base_url=self.base_url,
                model=self.openai_model,
                api_key=self.api_key,
                price=resolve_price(self.price, self.openai_model, capped=max_usd is not None),
                concurrency=self.concurrency,
                max_attempts=self.max_attempts,
                timeout_s=self.timeout_s,
                max_tokens=self.max_tokens,
                backoff_s=self.backoff_s,
                key_budget=KeyBudget(
                    Path(self.work_dir) / "keys", budget_name(self.base_url, self.api_key), self.concurrency
                ),
                options=RequestOptions.for_endpoint(
                    self.base_url, self.thinking, self.reasoning_effort, self.response_format
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
    lines = ["| category | " + " | ".join(statuses) + " | labeled over cap |", "|---" * (len(statuses) + 2) + "|"]
    for name in CATEGORIES:
        counts = report.by_category.get(name, Counter())
        cells = [*(counts.get(status, 0) for status in statuses), report.over_cap[name]]
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _per_category(counts: Counter) -> str:
    return ", ".join(f"{name} {counts[name]}" for name in CATEGORIES if counts[name])


def report_metadata(report: LabelingReport, labels_in_shard: int) -> dict:
    labeled = report.count("labeled")
    latencies = sorted(report.latencies)
    return {
        "dagster/row_count": labels_in_shard,
        "teacher": report.teacher,
        "keys": report.keys_total,
        "keys_already_labeled": report.keys_already_labeled,
        "labeled": labeled,
        "labeled_over_cap": report.over_cap.total(),
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
        max_usd = teacher.spend_cap(config.max_usd)
        try:
            stop_at = datetime.fromisoformat(config.stop_at) if config.stop_at else None
            backend = teacher.open_backend(max_usd)
        except (ValueError, PriceError, ReplayError) as error:
            raise dg.Failure(description=f"shard {shard}: teacher configuration: {error}") from None
        if stop_at is not None and stop_at.tzinfo is None:
            stop_at = stop_at.replace(tzinfo=UTC)
        budget = Budget(max_usd=max_usd, stop_at=stop_at)
        context.log.info(
            f"labelling shard {shard} with {backend.teacher} ({teacher.backend}); "
            + (f"spend cap ${budget.max_usd:g}" if budget.max_usd else "no spend cap")
            + (f", stop at {stop_at.isoformat()}" if stop_at else "")
        )
        try:
            report = label_shard(
                ShardRun(shard, context.run.run_id),
                documents=documents,
                backend=backend,
                budget=budget,
                sinks=teacher.sinks(lake),
                log=context.log.info,
            )
        except (TeacherConfigError, ReplayError) as error:
            raise dg.Failure(description=f"shard {shard}: {error}") from None
        with lake.get_connection() as connection:
            labels_in_shard = fetch_row(
                connection.execute(
                    "SELECT count(*) FROM teacher_labels WHERE shard = $1 AND teacher = $2", [shard, backend.teacher]
                )
            )[0]
        metadata = report_metadata(report, labels_in_shard)
        context.log.info(
            f"shard {shard}: {report.count('labeled')} labelled, {report.count('quarantined')} quarantined, "
            f"{report.requests} requests, {sum(report.retries.values())} retries, ${report.usage.cost_usd:.4f} "
            f"in {report.seconds:.1f}s"
        )
        if report.over_cap:
            context.log.info(
                f"shard {shard}: {report.over_cap.total()} of {report.count('labeled')} labels are longer than "
                f"their category's cap ({_per_category(report.over_cap)}); kept, with over_cap set in "
                f"lake.{TEACHER_LABELS.name}"
            )
        if report.count("quarantined"):
            context.log.warning(
                f"shard {shard}: {report.count('quarantined')} keys quarantined (see lake.teacher_quarantine); "
                "the next run asks for them again"
            )
        if report.count("absent"):
            context.log.warning(f"shard {shard}: the replay source has no label for {report.count('absent')} keys")
        if report.stopped_because and report.keys_not_asked:
            raise dg.Failure(
                description=(
                    f"shard {shard}: {report.stopped_because}. {report.count('labeled')} labels were written and "
                    f"kept; {report.keys_not_asked} keys were not asked for. Run again to continue."
                ),
                metadata=metadata,
            )
        if report.count("quarantined") and not report.count("labeled"):
            raise dg.Failure(
                description=(
                    f"shard {shard}: no key was labelled and {report.count('quarantined')} were quarantined; see "
                    f"why in lake.{TEACHER_QUARANTINE.name} (the next run asks for them again)"
                ),
                metadata=metadata,
            )
        return dg.MaterializeResult(metadata=metadata)

    return teacher_labels


def hourly_cron(window: UtcWindow) -> str:
    """A tick every hour from the window's start while it is open (16:30-00:30: 16:30, 17:30, ... 23:30)."""
    opens = datetime.combine(date(2000, 1, 1), window.start, tzinfo=UTC)
    ticks = (opens + timedelta(hours=hour) for hour in range(24))
    hours = sorted(tick.hour for tick in ticks if window.contains(tick))
    return f"{window.start.minute} {','.join(map(str, hours))} * * *"


def build_discount_schedule(job, shard_keys: Sequence[str], window: UtcWindow | None) -> dg.ScheduleDefinition:
    @dg.schedule(
        job=job,
        name="teacher_discount_window",
        # Without a window, an hourly tick that skips says why as soon as someone turns the schedule on.
        cron_schedule=hourly_cron(window) if window is not None else "0 * * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Labels every shard inside the {window or 'QC_TEACHER_WINDOW'} discount window; each run stops "
        "starting requests when the window closes, and the next window's runs continue. Off by default: it spends money.",
    )
    def teacher_discount_window(context: dg.ScheduleEvaluationContext):
        moment = context.scheduled_execution_time
        if window is None:
            return dg.SkipReason(
                "no discount window: set QC_TEACHER_WINDOW (UTC, like 16:30-00:30), or a QC_TEACHER_PRICE entry "
                "with an off-peak window"
            )
        occurrence = window.occurrence(moment)
        if occurrence is None:
            return dg.SkipReason(f"{moment.isoformat()} is outside the {window} discount window")
        opened, ends = occurrence
        return [
            dg.RunRequest(
                run_key=f"{opened.date().isoformat()}:{shard}",
                partition_key=shard,
                run_config={"ops": {TEACHER_LABELS.name: {"config": {"stop_at": ends.isoformat()}}}},
                tags={"qc/discount_window": opened.date().isoformat()},
            )
            for shard in shard_keys
        ]

    return teacher_discount_window
